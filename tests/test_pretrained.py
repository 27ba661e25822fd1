"""Checkpoints: format, model card, local-dir / Hub round trips through the real
huggingface_hub client against the local test Hub (tests/hub_server.py), caching,
offline use, strict loading errors, the zoo manifest and ``coopnets push``."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Dict, List

import pytest
import safetensors.torch
import timm
import torch
from huggingface_hub import HfApi, ModelCard, constants

import coopnets
from coopnets.cli import main as cli_main
from coopnets.hub import manifest
from coopnets.models.exit_head import head_kind_for
from coopnets.hub import CheckpointError, checkpoint_config, push_to_hub, save_pretrained

from hub_server import hub, hub_server  # noqa: F401  (pytest fixtures)

TINY = dict(num_classes=10, layers=[1, 1, 1, 1], channels=[8, 16, 32, 64], stem_width=8)
TRAINING = {"method": "cooperative", "dataset": "digits", "epochs": 3, "seed": 0, "command": "coopnets train --model coop_resnet18"}
X = torch.randn(2, 3, 32, 32)


def tiny(**kwargs) -> coopnets.DepthAdaptiveModel:
    """coop_resnet18 shrunk to ~0.1M parameters (non-default backbone kwargs on purpose)."""
    return coopnets.create_model("coop_resnet18", **{**TINY, **kwargs}).eval()


def rows(num_depths: int = 4) -> List[Dict]:
    return [{"depth": d, "accuracy": 0.5 + d / 10, "params": 1000 * d, "flops": 10**6 * d,
             "latency_ms": 0.25 * d, "batch_size": 1, "device": "cpu"} for d in range(1, num_depths + 1)]


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def same_outputs(a: coopnets.DepthAdaptiveModel, b: coopnets.DepthAdaptiveModel) -> bool:
    with torch.no_grad():
        return all(torch.allclose(a.eval().forward_depth(X, d), b.eval().forward_depth(X, d)) for d in range(1, a.num_depths + 1))


# --- format and card ----------------------------------------------------------------------
def test_checkpoint_folder_holds_timm_config_coop_section_and_card(tmp_path):
    model = tiny()
    folder = save_pretrained(model, tmp_path / "ckpt", per_depth=rows(), training=TRAINING, repo_id="org/tiny")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]

    config = json.loads((folder / "config.json").read_text())
    assert (config["architecture"], config["num_classes"], config["num_features"]) == ("coop_resnet18", 10, 64)
    assert config["model_args"]["channels"] == [8, 16, 32, 64] and config["model_args"]["exit_indices"] == [1, 2, 3]
    assert "hf_hub_id" not in config["pretrained_cfg"] and config["pretrained_cfg"]["num_classes"] == 10
    coop = config["coopnets"]
    args = config["model_args"]
    assert (args["plan"], coop["num_depths"], args["exit_indices"]) == ("exits", 4, [1, 2, 3])
    assert args["head"] == head_kind_for("resnet18")  # the resolved kind, never "auto"
    assert coop["format_version"] == 3 and coop["backbone"] == "resnet18"
    assert "num_classes" not in args  # at the root only: timm and transformers pass it from there
    assert not {"plan", "exit_indices", "head", "block_depths", "backbone_kwargs"} & set(coop)  # structure recorded once
    assert coop["per_depth"] == rows() and coop["training"] == TRAINING

    weights = safetensors.torch.load_file(str(folder / "model.safetensors"))
    assert weights.keys() == model.state_dict().keys()

    card = ModelCard.load(folder / "README.md")
    metrics = card.data.to_dict()["model-index"][0]["results"][0]["metrics"]
    assert [(m["name"], m["value"]) for m in metrics] == [(f"Top-1 accuracy at depth {d} of 4", 0.5 + d / 10) for d in range(1, 5)]
    assert card.data.datasets == ["digits"]
    text = card.text
    assert 'coopnets.create_model("hf-hub:org/tiny", pretrained=True)' in text and "m.set_depth(3)" in text
    assert "| 2 | 70.00% | 2.00K | 2.00M | 0.50 |" in text and "Measured on cpu, batch size 1." in text
    assert "`coopnets train --model coop_resnet18`" in text


def test_card_training_table_shows_scalars_not_raw_dicts(tmp_path):
    training = {**TRAINING, "wall_time_s": 44.075557, "val_accuracy": {"teammate_a": [0.9, 0.95]}}
    text = ModelCard.load(save_pretrained(tiny(), tmp_path / "c", training=training) / "README.md").text
    assert "| wall_time_s | 44.08 |" in text
    assert "teammate_a" not in text and "val_accuracy" not in text


def test_per_depth_rows_are_validated_and_made_plain_json():
    with pytest.raises(ValueError, match="distinct integer 'depth' values in 1..4"):
        checkpoint_config(tiny(), per_depth=[{"depth": 5}])
    config = checkpoint_config(tiny(), per_depth=[{"depth": 1, "accuracy": torch.tensor(0.75)}], training={"out": Path("runs/x")})
    assert config["coopnets"]["per_depth"] == [{"depth": 1, "accuracy": 0.75}] and config["coopnets"]["training"] == {"out": "runs/x"}
    with pytest.raises(ValueError, match="not JSON-serializable"):
        checkpoint_config(tiny(), training={"fn": print})


def test_save_never_leaves_half_written_output_or_damages_a_good_folder(tmp_path, monkeypatch):
    good = save_pretrained(tiny(), tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in good.iterdir()}

    def crash(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(tiny(num_classes=3), good)
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary folders left

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="notes.txt"):
        save_pretrained(tiny(), tmp_path / "other")


# --- local round trips ----------------------------------------------------------------------
def test_local_dir_round_trip_with_coopnets_and_timm(tmp_path):
    model = tiny()
    folder = save_pretrained(model, tmp_path / "ckpt")
    for loaded in (coopnets.create_model(f"local-dir:{folder}", pretrained=True),
                   timm.create_model(f"local-dir:{folder}", pretrained=True)):
        assert isinstance(loaded, coopnets.DepthAdaptiveModel)
        assert same_weights(model, loaded) and same_outputs(model, loaded)
    assert not same_weights(model, coopnets.create_model(f"local-dir:{folder}", pretrained=False))


def test_wrapped_non_zoo_backbone_with_blocks_plan_round_trips(tmp_path):
    model = coopnets.wrap("test_convnext", num_classes=3, plan="blocks")
    assert model.num_depths >= 2
    folder = save_pretrained(model, tmp_path / "ckpt")
    loaded = coopnets.create_model(f"local-dir:{folder}", pretrained=True)
    assert loaded.plan == "blocks" and loaded.depth_plan.config.block_depths == model.depth_plan.config.block_depths
    assert same_weights(model, loaded) and same_outputs(model, loaded)


def test_wrapped_backbone_checkpoints_load_in_timm_and_coopnets_from_a_folder_and_the_hub(hub, tmp_path):
    """coopnets.wrap(<timm model>) checkpoints record architecture coop_<backbone>, which timm resolves on demand
    after ``import coopnets`` (issue 28): timm's local-dir:/hf-hub: and coopnets build it the same way, as a zoo entry."""
    model = coopnets.wrap("test_resnet", num_classes=3, channels=[8, 16, 24, 32]).eval()
    folder = save_pretrained(model, tmp_path / "ckpt")
    assert json.loads((folder / "config.json").read_text())["architecture"] == "coop_test_resnet"
    card = (folder / "README.md").read_text()
    assert "works too after `import coopnets`" in card and "pipeline(\"image-classification\"" in card  # timm and transformers
    push_to_hub(model, "org/wrapped")
    for name in (f"local-dir:{folder}", "hf-hub:org/wrapped"):
        for create in (timm.create_model, coopnets.create_model):
            loaded = create(name, pretrained=True)
            assert isinstance(loaded, coopnets.DepthAdaptiveModel) and loaded.pretrained_cfg["architecture"] == "coop_test_resnet"
            assert same_weights(model, loaded) and same_outputs(model, loaded)
    # the name itself works as a zoo name does, and is a coopnets architecture, outside the zoo listing
    assert coopnets.is_model("coop_test_resnet") and "coop_test_resnet" not in coopnets.list_models()
    for create in (timm.create_model, coopnets.create_model):
        built = create("coop_test_resnet", num_classes=3, channels=[8, 16, 24, 32]).model_args()
        assert {k: built[k] for k in model.model_args()} == model.model_args()  # (+ in_chans, as zoo entries record)
    assert not hub.unrouted, hub.unrouted


def test_a_wrapped_backbone_this_timm_lacks_is_one_line_naming_it_and_the_timm_version(tmp_path, capsys):
    folder = save_pretrained(coopnets.wrap("test_resnet", num_classes=3), tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    config["architecture"] = config["pretrained_cfg"]["architecture"] = "coop_test_resnt"
    config["coopnets"]["backbone"] = "test_resnt"
    (folder / "config.json").write_text(json.dumps(config))
    message = (rf"Unknown timm backbone 'test_resnt' of coopnets architecture 'coop_test_resnt': timm {timm.__version__} "
               r"has no model 'test_resnt'. Did you mean: test_resnet.*\? Load it with a timm version that has 'test_resnt'")
    with pytest.raises(CheckpointError, match=rf"local-dir:.*ckpt: {message}"):
        coopnets.create_model(f"local-dir:{folder}", pretrained=True)
    with pytest.raises(RuntimeError, match=message):  # timm's type for unknown names
        timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert cli_main(["export", str(folder), "--depth", "1", "--out", str(tmp_path / "m.onnx")]) == 2
    (err,) = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]  # (after a warning: no data config)
    assert "Unknown timm backbone 'test_resnt'" in err and f"timm {timm.__version__}" in err
    with pytest.raises(RuntimeError, match=r"Unknown model \(nonet\)"):  # other names: timm's own answer
        timm.create_model("nonet")


def test_truncated_or_mismatched_local_weights_are_clear_errors(tmp_path):
    folder = save_pretrained(tiny(), tmp_path / "ckpt")
    weights = folder / "model.safetensors"
    good = weights.read_bytes()

    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match=r"local-dir:.*ckpt: model.safetensors is truncated or corrupted"):
        coopnets.create_model(f"local-dir:{folder}", pretrained=True)

    state = safetensors.torch.load(good)
    state["exits.9.fc.weight"] = torch.zeros(1)
    del state["exits.0.fc.weight"]
    safetensors.torch.save_file(state, str(weights))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): exits.0.fc.weight; unexpected keys \(1\): exits.9.fc.weight"):
        coopnets.create_model(f"local-dir:{folder}", pretrained=True)


# --- through the local Hub --------------------------------------------------------------------
def test_push_then_download_with_create_model_timm_and_revisions(hub):
    v1 = tiny()
    info1 = push_to_hub(v1, "org/tiny", per_depth=rows(), training=TRAINING)
    assert ("POST", "/api/repos/create") in hub.requests and ("POST", "/api/models/org/tiny/commit/main") in hub.requests
    assert set(hub.repos["org/tiny"].commits[info1.oid]) >= {"model.safetensors", "config.json", "README.md"}

    loaded = coopnets.create_model("hf-hub:org/tiny", pretrained=True)
    assert same_weights(v1, loaded) and same_outputs(v1, loaded)
    snapshot = Path(constants.HF_HUB_CACHE) / "models--org--tiny" / "snapshots" / info1.oid
    assert sorted(p.name for p in snapshot.iterdir()) == ["config.json", "model.safetensors"]
    assert same_weights(v1, timm.create_model("hf-hub:org/tiny", pretrained=True))

    torch.manual_seed(1)
    v2 = tiny()
    push_to_hub(v2, "org/tiny", per_depth=rows(), training=TRAINING)  # existing repo: create_repo(exist_ok=True)
    assert same_weights(v2, coopnets.create_model("hf-hub:org/tiny", pretrained=True))
    assert same_weights(v1, coopnets.create_model(f"hf-hub:org/tiny@{info1.oid}", pretrained=True))


def test_zoo_entry_pretrained_resolves_hf_hub_id_and_checks_the_config(hub):
    model = tiny()
    push_to_hub(model, "org/tiny")
    overlay = {"pretrained_cfg_overlay": {"hf_hub_id": "org/tiny"}}
    assert same_weights(model, coopnets.create_model("coop_resnet18", pretrained=True, **TINY, **overlay))

    with pytest.raises(CheckpointError, match=r"hf-hub:org/tiny does not match .*exit_indices: checkpoint \[1, 2, 3\], model \[2, 3\]"):
        coopnets.create_model("coop_resnet18", pretrained=True, **{**TINY, "exit_indices": [2, 3]}, **overlay)
    with pytest.raises(CheckpointError, match=r"num_classes: checkpoint 10, model 5.*reset_classifier"):
        coopnets.create_model("coop_resnet18", pretrained=True, **{**TINY, "num_classes": 5}, **overlay)
    with pytest.raises(CheckpointError, match=r"shape mismatches .*create_model\('hf-hub:org/tiny', pretrained=True\)"):
        coopnets.create_model("coop_resnet18", pretrained=True, **{**TINY, "channels": [8, 16, 32, 128]}, **overlay)


def test_offline_loads_from_cache_and_explains_a_cache_miss(hub, monkeypatch, tmp_path):
    model = tiny()
    push_to_hub(model, "org/tiny")
    coopnets.create_model("hf-hub:org/tiny", pretrained=True)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    seen = len(hub.requests)
    assert same_weights(model, coopnets.create_model("hf-hub:org/tiny", pretrained=True))
    assert len(hub.requests) == seen  # served from the cache, no request

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(CheckpointError, match=r"hf-hub:org/tiny: config.json is not in the local cache .*HF_HUB_OFFLINE=1"):
        coopnets.create_model("hf-hub:org/tiny", pretrained=True)


def test_missing_repo_revision_and_file_are_clear_errors(hub, tmp_path):
    with pytest.raises(CheckpointError, match=r"repository 'org/nope' not found"):
        coopnets.create_model("hf-hub:org/nope", pretrained=True)

    push_to_hub(tiny(), "org/tiny")
    with pytest.raises(CheckpointError, match=r"revision '0{40}' does not exist in org/tiny"):
        coopnets.create_model("hf-hub:org/tiny@" + "0" * 40, pretrained=True)

    api = HfApi(token="hf_test_token")
    api.create_repo("org/config-only")
    config = tmp_path / "config.json"
    config.write_text(json.dumps(checkpoint_config(tiny())))
    api.upload_file(path_or_fileobj=str(config), path_in_repo="config.json", repo_id="org/config-only")
    with pytest.raises(CheckpointError, match=r"hf-hub:org/config-only: the repo has no model.safetensors"):
        coopnets.create_model("hf-hub:org/config-only", pretrained=True)


def test_corrupted_download_is_rejected_and_removed_from_the_cache(hub):
    model = tiny()
    push_to_hub(model, "org/tiny")
    hub.corrupt.add(("org/tiny", "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"downloaded model.safetensors is corrupted .*removed from the cache; run again"):
        coopnets.create_model("hf-hub:org/tiny", pretrained=True)
    cached = [p.name for p in (Path(constants.HF_HUB_CACHE) / "models--org--tiny").rglob("*") if p.is_file()]
    assert "model.safetensors" not in cached and not any(".incomplete" in n for n in cached)

    hub.corrupt.clear()
    assert same_weights(model, coopnets.create_model("hf-hub:org/tiny", pretrained=True))


# --- zoo tags and publishing -------------------------------------------------------------------
def test_zoo_lists_only_manifest_checkpoints_and_unpublished_weights_are_explained():
    recorded = {f"{r['model']}.{r['tag']}" for r in manifest.load_manifest() if manifest.is_pinned(r["hf_hub_id"])}
    assert set(coopnets.list_models(pretrained=True)) == recorded
    with pytest.raises(CheckpointError, match=r"coop_resnet18 has no published coopnets weights.*coopnets push RUN_DIR --repo-id ORG/NAME"):
        coopnets.create_model("coop_resnet18", pretrained=True, **TINY)


@pytest.fixture
def temp_manifest(tmp_path, monkeypatch):
    path = tmp_path / "manifest.json"
    monkeypatch.setattr(manifest, "MANIFEST_PATH", path)
    manifest.load_manifest.cache_clear()
    yield path
    manifest.load_manifest.cache_clear()


def test_manifest_accepts_only_measured_runs(temp_manifest):
    unmeasured = checkpoint_config(tiny(), per_depth=[{"depth": 1, "params": 5}], training={"dataset": "digits"})
    with pytest.raises(ValueError, match="lacks 'command'.*measured accuracy for each of the 4 depths"):
        manifest.checkpoint_record(unmeasured, "coop_resnet18", "digits", "org/tiny@abc")

    measured = checkpoint_config(tiny(), per_depth=rows(), training=TRAINING)
    pinned = "org/tiny@" + "0123456789" * 4
    manifest.add_checkpoint(manifest.checkpoint_record(measured, "coop_resnet18", "digits", pinned), temp_manifest)
    cfgs = manifest.pretrained_cfgs_for("coop_resnet18")
    assert list(cfgs) == ["coop_resnet18.digits"] and cfgs["coop_resnet18.digits"]["hf_hub_id"] == pinned
    assert manifest.load_manifest()[0]["per_depth"] == rows() and manifest.load_manifest()[0]["training"]["seed"] == 0


def test_only_records_pinned_to_a_pushed_commit_become_pretrained_tags(temp_manifest):
    from coopnets.models._builder import zoo_cfgs

    measured = checkpoint_config(tiny(), per_depth=rows(), training=TRAINING)
    for tag, hf_hub_id in (("pinned", "org/tiny@" + "ab" * 20), ("branch", "org/tiny@main"), ("unpushed", "org/tiny"),
                           ("short", "org/tiny@abc")):
        manifest.add_checkpoint(manifest.checkpoint_record(measured, "coop_resnet18", tag, hf_hub_id), temp_manifest)
    assert list(manifest.pretrained_cfgs_for("coop_resnet18")) == ["coop_resnet18.pinned"]
    # the tags timm registers for the family, hence what list_models(pretrained=True) lists
    assert sorted(zoo_cfgs("coop_resnet18")["coop_resnet18"].tags) == ["", "pinned"]


def test_push_cli_and_publish_tool_publish_a_training_run(hub, tmp_path, temp_manifest, capsys):
    run_dir = tmp_path / "run"
    model = tiny()
    save_pretrained(model, run_dir / "model", per_depth=rows(), training=TRAINING)

    assert cli_main(["push", str(run_dir), "--repo-id", "org/run"]) == 0
    assert "create_model('hf-hub:org/run@" in capsys.readouterr().out
    assert same_weights(model, coopnets.create_model("hf-hub:org/run", pretrained=True))
    card = hub.repos["org/run"].commits[hub.repos["org/run"].branches["main"]]["README.md"].decode()
    assert 'create_model("hf-hub:org/run", pretrained=True)' in card  # card re-rendered for the repo

    assert cli_main(["push", str(tmp_path / "empty"), "--repo-id", "org/run"]) == 2
    assert "does not exist" in capsys.readouterr().err

    spec = importlib.util.spec_from_file_location("hub_publish", Path(__file__).parents[1] / "hub" / "publish.py")
    publish = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(publish)
    assert publish.main([str(run_dir), "--repo-id", "org/zoo", "--tag", "digits", "--manifest", str(temp_manifest)]) == 0
    (record,) = json.loads(temp_manifest.read_text())["checkpoints"]
    assert record["hf_hub_id"] == f"org/zoo@{hub.repos['org/zoo'].branches['main']}"
    assert same_weights(model, coopnets.create_model(f"hf-hub:{record['hf_hub_id']}", pretrained=True))

    hub.read_only = True
    assert cli_main(["push", str(run_dir), "--repo-id", "org/new"]) == 2
    err = capsys.readouterr().err
    assert "publishing to org/new" in err and "hf auth login" in err


# --- a checkpoint says how to feed it --------------------------------------------------------
DIGIT_CLASSES = 4


def digits_folder(root: Path, per_class=(40, 10, 15)) -> Path:
    """An ImageFolder of scikit-learn digits 0..3 saved as 8x8 RGB PNGs (train/val/test)."""
    from sklearn.datasets import load_digits

    from coopnets.train.data import digit_image

    data = load_digits()
    for cls in range(DIGIT_CLASSES):
        images = data.images[data.target == cls]
        start = 0
        for split, n in zip(("train", "val", "test"), per_class):
            (root / split / str(cls)).mkdir(parents=True)
            for i, d in enumerate(images[start:start + n]):
                digit_image(d).save(root / split / str(cls) / f"{i}.png")
            start += n
    return root


def accuracy_per_depth(model: coopnets.DepthAdaptiveModel, folder: Path, transform) -> List[float]:
    """Top-1 accuracy of ``model`` at every depth on the raw PNGs of an ImageFolder split."""
    from PIL import Image

    files = sorted(folder.glob("*/*.png"))
    x = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    y = torch.tensor([int(f.parent.name) for f in files])
    with torch.no_grad():
        return [float((model.eval().forward_depth(x, d).argmax(-1) == y).float().mean()) for d in range(1, model.num_depths + 1)]


@pytest.mark.slow
def test_trained_checkpoint_records_its_preprocessing_and_timm_reproduces_its_test_accuracy(hub, tmp_path):
    """Train on an ImageFolder at 24 px, push the run's model/, download it with timm and preprocess the raw
    test images with timm's data pipeline from the model's own config: the run's per-depth test accuracy."""
    from timm.data import create_transform, resolve_data_config

    from coopnets.train import TrainConfig, train

    data = digits_folder(tmp_path / "digits")
    run = tmp_path / "run"
    train(TrainConfig(out=str(run), model="coop_resnet18", method="multi_exit", data_dir=str(data), img_size=24,
                      epochs=3, batch_size=16, lr=0.05, progress=False, profile_repeats=1, seed=0), echo=False)
    recorded = [r["accuracy"] for r in json.loads((run / "model" / "config.json").read_text())["coopnets"]["per_depth"]]
    assert cli_main(["push", str(run), "--repo-id", "org/digits-folder"]) == 0

    m = timm.create_model("hf-hub:org/digits-folder", pretrained=True)
    cfg = resolve_data_config({}, model=m)
    assert tuple(cfg["input_size"]) == (3, 24, 24) and m.pretrained_cfg["label_names"] == ["0", "1", "2", "3"]
    assert m.pretrained_cfg["num_classes"] == DIGIT_CLASSES
    got = accuracy_per_depth(m, data / "test", create_transform(**cfg))
    assert max(recorded) > 1 / DIGIT_CLASSES + 0.2, recorded  # it learned something, so the check means something
    assert all(abs(a - b) <= 0.01 for a, b in zip(got, recorded)), (got, recorded)


def test_digits_checkpoint_card_says_how_to_prepare_an_8x8_digit(tmp_path):
    """The digits run's config reproduces its tensors from raw 8x8 digits through timm's pipeline; the card says how."""
    from sklearn.datasets import load_digits
    from timm.data import create_transform, resolve_data_config

    from coopnets.train.data import digit_image, digits_splits

    splits = digits_splits(img_size=16)
    model = coopnets.wrap("test_resnet", num_classes=10)
    folder = save_pretrained(model, tmp_path / "ckpt", training={"dataset": "digits"}, data_config=splits.pretrained_cfg_fields())
    loaded = coopnets.create_model(f"local-dir:{folder}", pretrained=True)
    transform = create_transform(**resolve_data_config({}, model=loaded))
    raw = load_digits().images
    x = torch.stack([transform(digit_image(d)) for d in raw[:50]])
    resized = torch.nn.functional.interpolate(torch.tensor(raw[:50], dtype=torch.float32).unsqueeze(1) / 16, size=(16, 16),
                                              mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    mean, std = splits.data_config["mean"][0], splits.data_config["std"][0]  # one statistic, all 3 channels
    assert (x - (resized - mean) / std).abs().max() < 0.02  # 8-bit rounding of the PNG-style image only
    text = (folder / "README.md").read_text()
    assert "resolve_data_config({}, model=m)" in text and "create_transform(**cfg)" in text
    assert 'Image.fromarray((d * 255 / 16).round().astype("uint8")).convert("RGB")' in text
    assert "input size 3x16x16" in text and "Classes (10): 0, 1," in text


def test_checkpoint_config_checks_the_data_config_against_the_model():
    with pytest.raises(ValueError, match=r"data_config keys must be among .*'label_names'.*got \['img_size'\]"):
        checkpoint_config(tiny(), data_config={"img_size": 16})
    with pytest.raises(ValueError, match=r"num_classes'\] is 3 but the model has 10"):
        checkpoint_config(tiny(), data_config={"num_classes": 3})


# --- older formats ------------------------------------------------------------------------
DATA = Path(__file__).with_name("data")


@pytest.mark.parametrize("name", ["checkpoint_v1_coop_resnet18", "checkpoint_v1_blocks_coop_resnet18"])
def test_format_version_1_checkpoints_still_load(name):
    """Folders written by coopnets 0.1 (structure in model_args and again in the coopnets section) load
    as saved: same architecture, plan and logits at every depth as when they were written."""
    folder = DATA / name
    assert json.loads((folder / "config.json").read_text())["coopnets"]["format_version"] == 1
    expected = torch.load(DATA / f"{name}.expected.pt", weights_only=True)
    for create in (coopnets.create_model, timm.create_model):
        with pytest.warns(UserWarning) as caught:
            loaded = create(f"local-dir:{folder}", pretrained=True)
        (warning,) = caught  # one warning, naming what is missing
        assert "does not record how its training data was fed" in str(warning.message) and "label_names" in str(warning.message)
        loaded.eval()
        assert loaded.num_depths == len(expected["logits"])
        with torch.no_grad():
            for d, want in enumerate(expected["logits"], 1):
                assert torch.allclose(loaded.forward_depth(expected["x"], d), want, atol=1e-5)
