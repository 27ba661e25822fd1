"""Hub API parity with huggingface_hub's names and correct checkpoint metadata (issue 20, items 2 and 3).

Loading takes ``revision`` (as well as ``@REV``), ``token``, ``force_download``,
``local_files_only`` and ``cache_dir``; pushing takes ``private``, ``commit_message``,
``commit_description``, ``create_pr`` and ``data_config``; ``hub/build_zoo.py`` and
``hub/publish.py`` check everything before anything is published; ``pool_size`` is the
backbone's; the card title names the model; ONNX files carry their preprocessing, label
names and depth; weight files get the umask's permissions. All against the local test Hub.
"""
from __future__ import annotations

import importlib.util
import json
import os
import warnings
from pathlib import Path
from typing import Dict, List

import pytest
import timm
import torch
from huggingface_hub import ModelCard, constants

import coopnets
from coopnets import cli
from coopnets.hub import CheckpointError, checkpoint_config, push_to_hub, save_pretrained, write_safetensors
from coopnets.hub.format import parse_config
from coopnets.hub import manifest

from hub_server import hub, hub_server  # noqa: F401  (pytest fixtures)

TINY = dict(num_classes=3, layers=[1, 1, 1, 1], channels=[8, 16, 32, 64], stem_width=8)
LABELS = ["cat", "dog", "bird"]
DATA_CONFIG = {"input_size": (3, 32, 32), "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
               "mean": (0.5, 0.4, 0.3), "std": (0.25, 0.2, 0.3), "num_classes": 3, "label_names": LABELS}
TRAINING = {"method": "cooperative", "dataset": "pets", "epochs": 1, "seed": 0, "command": "coopnets train --model coop_resnet18"}
HUB_DIR = Path(__file__).parents[1] / "hub"


def tiny(seed: int = 0) -> coopnets.DepthAdaptiveModel:
    torch.manual_seed(seed)
    return coopnets.create_model("coop_resnet18", **TINY).eval()


def rows(n: int = 4) -> List[Dict]:
    return [{"depth": d, "accuracy": 0.5 + d / 10, "params": 1000 * d, "device": "cpu", "batch_size": 1} for d in range(1, n + 1)]


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def downloads(hub, name: str) -> int:
    """How many times ``name`` was downloaded (GET of its ``resolve`` URL)."""
    return sum(1 for method, path in hub.requests if method == "GET" and "/resolve/" in path and path.endswith(f"/{name}"))


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"hub_{name}", HUB_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- loading: huggingface_hub's arguments --------------------------------------------------
def test_revision_argument_is_the_same_as_at_rev_and_contradictions_are_refused(hub):
    v1 = tiny(1)
    first = push_to_hub(v1, "org/tiny", data_config=DATA_CONFIG)
    push_to_hub(tiny(2), "org/tiny", data_config=DATA_CONFIG)
    assert same_weights(v1, coopnets.create_model("hf-hub:org/tiny", pretrained=True, revision=first.oid))
    assert same_weights(v1, coopnets.create_model(f"hf-hub:org/tiny@{first.oid}", pretrained=True, revision=first.oid))
    overlay = {"pretrained_cfg_overlay": {"hf_hub_id": "org/tiny"}}  # a zoo entry's pretrained tag
    assert same_weights(v1, coopnets.create_model("coop_resnet18", pretrained=True, revision=first.oid, **TINY, **overlay))
    with pytest.raises(ValueError, match=r"already names revision 'main'; revision='v2' contradicts it"):
        coopnets.create_model("hf-hub:org/tiny@main", pretrained=True, revision="v2")
    with pytest.raises(CheckpointError, match=r"revision 'nope' does not exist in org/tiny"):
        coopnets.create_model("hf-hub:org/tiny", pretrained=True, revision="nope")


def test_token_reaches_the_hub_for_a_private_repo(hub, monkeypatch, tmp_path):
    model = tiny()
    push_to_hub(model, "org/secret", private=True, data_config=DATA_CONFIG)
    assert hub.repos["org/secret"].private
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    with pytest.raises(CheckpointError, match=r"repository 'org/secret' not found .*private"):
        coopnets.create_model("hf-hub:org/secret", pretrained=True)
    assert same_weights(model, coopnets.create_model("hf-hub:org/secret", pretrained=True, token="hf_test_token"))


def test_force_download_local_files_only_and_cache_dir(hub, tmp_path):
    model = tiny()
    push_to_hub(model, "org/tiny", data_config=DATA_CONFIG)
    with pytest.raises(CheckpointError, match=r"config.json is not in the local cache .*local_files_only=True was given"):
        coopnets.create_model("hf-hub:org/tiny", pretrained=True, local_files_only=True)
    coopnets.create_model("hf-hub:org/tiny", pretrained=True)
    before = downloads(hub, "model.safetensors")
    seen = len(hub.requests)
    assert same_weights(model, coopnets.create_model("hf-hub:org/tiny", pretrained=True, local_files_only=True))
    assert len(hub.requests) == seen  # nothing asked of the Hub
    coopnets.create_model("hf-hub:org/tiny", pretrained=True)
    assert downloads(hub, "model.safetensors") == before  # cached: not downloaded again
    coopnets.create_model("hf-hub:org/tiny", pretrained=True, force_download=True)
    assert downloads(hub, "model.safetensors") == before + 1

    other = tmp_path / "other-cache"
    assert same_weights(model, coopnets.create_model("hf-hub:org/tiny", pretrained=True, cache_dir=other))
    assert (other / "models--org--tiny").is_dir()
    # timm's own hf-hub: path passes the same arguments on to coopnets' weight download
    assert same_weights(model, timm.create_model("hf-hub:org/tiny", pretrained=True, force_download=True, token="hf_test_token"))


# --- pushing: huggingface_hub's arguments and the data config ------------------------------
def test_push_records_preprocessing_and_labels_and_takes_commit_arguments(hub, tmp_path):
    info = push_to_hub(tiny(), "org/pets", per_depth=rows(), training=TRAINING, data_config=DATA_CONFIG,
                       commit_message="First pets model", commit_description="digits of pets")
    repo = hub.repos["org/pets"]
    assert repo.messages[info.oid] == ("First pets model", "digits of pets") and not repo.private
    config = json.loads(repo.commits[info.oid]["config.json"])
    assert config["label_names"] == LABELS and config["pretrained_cfg"]["label_names"] == LABELS
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32] and config["pretrained_cfg"]["mean"] == [0.5, 0.4, 0.3]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every preprocessing field is recorded: no "does not record" warning
        loaded = coopnets.create_model("hf-hub:org/pets", pretrained=True)
    assert loaded.pretrained_cfg["label_names"] == LABELS

    # a folder (e.g. a run's model/ saved without data_config) gets them at push time
    folder = save_pretrained(tiny(), tmp_path / "run" / "model", per_depth=rows(), training=TRAINING)
    info = push_to_hub(folder, "org/pets2", data_config=DATA_CONFIG)
    config = json.loads(hub.repos["org/pets2"].commits[info.oid]["config.json"])
    assert config["label_names"] == LABELS and config["pretrained_cfg"]["interpolation"] == "bilinear"
    with pytest.raises(ValueError, match="names 2 classes but the model has 3"):
        push_to_hub(folder, "org/pets2", data_config={"label_names": ["a", "b"]})


def test_create_pr_opens_a_pull_request_and_leaves_main_alone(hub):
    base = push_to_hub(tiny(1), "org/tiny", data_config=DATA_CONFIG)
    proposal = tiny(2)
    info = push_to_hub(proposal, "org/tiny", create_pr=True, commit_message="Better weights", data_config=DATA_CONFIG)
    assert info.pr_revision == "refs/pr/1" and info.pr_url.endswith("/org/tiny/discussions/1")
    assert hub.repos["org/tiny"].branches["main"] == base.oid
    assert same_weights(proposal, coopnets.create_model("hf-hub:org/tiny", pretrained=True, revision=info.pr_revision))
    assert same_weights(tiny(1), coopnets.create_model("hf-hub:org/tiny", pretrained=True))
    seen = len(hub.requests)
    with pytest.raises(ValueError, match="create_pr=True opens a pull request against the default branch"):
        push_to_hub(proposal, "org/tiny", create_pr=True, revision="dev")
    assert len(hub.requests) == seen  # refused before anything was sent


def test_push_cli_create_pr_and_commit_description_open_a_pull_request(hub, tmp_path, capsys):
    """``coopnets push`` takes push_to_hub's ``create_pr`` and ``commit_description``: a pull request with
    the run's checkpoint is opened (its commit carries the message and description), ``main`` is unchanged."""
    base = push_to_hub(tiny(1), "org/tiny", data_config=DATA_CONFIG)
    run = tmp_path / "run"
    save_pretrained(tiny(2), run / "model", per_depth=rows(), training=TRAINING, data_config=DATA_CONFIG)
    assert cli.main(["push", str(run), "--repo-id", "org/tiny", "--create-pr", "--commit-message", "Better weights",
                     "--commit-description", "3 more epochs on pets"]) == 0
    out = capsys.readouterr().out
    repo = hub.repos["org/tiny"]
    assert repo.branches["main"] == base.oid and repo.pull_requests == {1: "Better weights"}
    pr_head = repo.branches["refs/pr/1"]
    assert repo.messages[pr_head] == ("Better weights", "3 more epochs on pets")
    assert "/org/tiny/discussions/1" in out and "the default branch is unchanged" in out
    assert f"create_model('hf-hub:org/tiny@{pr_head}', pretrained=True)" in out
    assert same_weights(tiny(2), coopnets.create_model("hf-hub:org/tiny", pretrained=True, revision="refs/pr/1"))
    assert same_weights(tiny(1), coopnets.create_model("hf-hub:org/tiny", pretrained=True))

    # a plain push takes the description too
    assert cli.main(["push", str(run), "--repo-id", "org/other", "--commit-description", "first run"]) == 0
    other = hub.repos["org/other"]
    assert other.messages[other.branches["main"]] == ("Upload coopnets checkpoint", "first run")

    seen = len(hub.requests)
    assert cli.main(["push", str(run), "--repo-id", "org/tiny", "--create-pr", "--revision", "dev"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--revision dev: --create-pr opens a pull request against the default branch" in err
    assert len(hub.requests) == seen  # refused before anything was sent
    assert not hub.unrouted, hub.unrouted  # the test Hub served every call, the pull request's included


# --- metadata --------------------------------------------------------------------------------
def test_card_title_names_the_model(hub, tmp_path):
    def title(folder: Path) -> str:
        return ModelCard.load(folder / "README.md").text.split("\n# ", 1)[1].split("\n", 1)[0]

    assert title(save_pretrained(tiny(), tmp_path / "run" / "model", training=TRAINING)) == "coop_resnet18.pets"
    assert title(save_pretrained(tiny(), tmp_path / "untrained" / "model")) == "coop_resnet18"
    assert title(save_pretrained(tiny(), tmp_path / "my_pets_r18")) == "my_pets_r18"
    card = ModelCard.load(save_pretrained(tiny(), tmp_path / "r" / "model", training=TRAINING) / "README.md")
    assert card.data.model_name == "coop_resnet18.pets"
    push_to_hub(tmp_path / "run" / "model", "org/coop_resnet18.pets")
    text = hub.repos["org/coop_resnet18.pets"].commits[hub.repos["org/coop_resnet18.pets"].branches["main"]]["README.md"].decode()
    assert "\n# coop_resnet18.pets\n" in text
    assert 'pipeline("image-classification", model="org/coop_resnet18.pets")' in text  # the transformers snippet
    assert "pipe.model.timm_model.set_depth(3)" in text


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_weight_files_get_the_umask_permissions(tmp_path, umask):
    old = os.umask(umask)
    try:
        folder = save_pretrained(tiny(), tmp_path / "ckpt")
        other = write_safetensors(tiny().state_dict(), tmp_path / "teammate.safetensors")  # the trainer's other nets
        assert cli.main(["export", "coop_resnet18", "--num-classes", "3", "--depth", "2", "--format", "safetensors",
                         "--out", str(tmp_path / "d2.safetensors"), "--img-size", "32"]) == 0
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    for path in (folder / "model.safetensors", folder / "config.json", other, tmp_path / "d2.safetensors"):
        assert path.stat().st_mode & 0o777 == want, (path, oct(path.stat().st_mode))
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask


def test_pool_size_is_the_backbones():
    for name in coopnets.list_models():
        backbone = name[len("coop_"):]
        assert timm.models.get_pretrained_cfg(name).pool_size == timm.models.get_pretrained_cfg(backbone).pool_size, name
    assert timm.models.get_pretrained_cfg("coop_vit_small_patch16_224").pool_size is None  # tokens: no spatial pool
    vit = checkpoint_config(coopnets.create_model("coop_vit_small_patch16_224", num_classes=2, depth=4, embed_dim=24, num_heads=2))
    assert vit["pretrained_cfg"]["pool_size"] is None
    # a ViT checkpoint saved before (format 2, pool_size [7, 7]) is corrected on load; a ResNet's stays
    for backbone, want in (("vit_small_patch16_224", None), ("resnet18", [7, 7])):
        old = {"architecture": f"coop_{backbone}", "num_classes": 2, "pretrained_cfg": {"pool_size": [7, 7]},
               "model_args": {"num_classes": 2, "plan": "exits"}, "coopnets": {"format_version": 2, "backbone": backbone}}
        assert parse_config(json.dumps(old), "old")["pretrained_cfg"]["pool_size"] == want


def test_onnx_file_records_preprocessing_labels_and_depth(tmp_path, capsys):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    folder = save_pretrained(tiny(), tmp_path / "run" / "model", data_config=DATA_CONFIG)
    out = tmp_path / "d2.onnx"
    assert cli.main(["export", str(tmp_path / "run"), "--depth", "2", "--format", "onnx", "--out", str(out)]) == 0
    meta = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    assert {k: json.loads(meta[k]) for k in ("input_size", "mean", "std", "crop_pct", "label_names", "depth", "num_depths")} == {
        "input_size": [3, 32, 32], "mean": [0.5, 0.4, 0.3], "std": [0.25, 0.2, 0.3], "crop_pct": 1.0,
        "label_names": LABELS, "depth": 2, "num_depths": 4}
    assert (meta["interpolation"], meta["crop_mode"], meta["architecture"]) == ("bilinear", "center", "coop_resnet18")
    assert meta["source"] == str(tmp_path / "run") and folder.is_dir()


# --- publishing tools check everything first ---------------------------------------------------
@pytest.fixture
def temp_manifest(tmp_path, monkeypatch):
    path = tmp_path / "manifest.json"
    path.write_text('{"checkpoints": []}\n')
    monkeypatch.setattr(manifest, "MANIFEST_PATH", path)
    manifest.load_manifest.cache_clear()
    yield path
    manifest.load_manifest.cache_clear()


def fake_train(structure: Dict, training: Dict = TRAINING):
    """Stands in for ``coopnets.train.train``: writes a measured run's model/ with the given structure."""
    def train(config):
        model = coopnets.create_model("coop_resnet18", num_classes=10, **structure)
        data_config = {**DATA_CONFIG, "num_classes": 10, "label_names": [str(i) for i in range(10)]}
        save_pretrained(model, Path(config.out) / "model", per_depth=rows(model.num_depths), training=dict(training),
                        data_config=data_config)
        return {"test_split": "test"}
    return train


def test_build_zoo_checks_everything_before_publishing(hub, tmp_path, temp_manifest, monkeypatch, capsys):
    build_zoo = load_tool("build_zoo")
    argv = ["coop_resnet18", "--from", "resnet18.a1_in1k", "--img-size", "32", "--manifest", str(temp_manifest),
            "--repo-id", "org/coop_resnet18.a1_in1k"]
    for structure, training, needle in (
        ({"exit_indices": [2, 3]}, TRAINING, "is not the zoo entry's"),                    # changed structure
        ({}, {k: v for k, v in TRAINING.items() if k != "seed"}, "training record lacks 'seed'"),  # incomplete record
    ):
        monkeypatch.setattr(build_zoo, "train", fake_train(structure, training))
        assert build_zoo.main([*argv, "--out", str(tmp_path / needle[:6])]) == 2
        assert needle in capsys.readouterr().err
        assert not hub.repos and not [r for r in hub.requests if r[0] == "POST"]  # nothing published
        assert json.loads(temp_manifest.read_text()) == {"checkpoints": []}

    temp_manifest.write_text("{broken")
    monkeypatch.setattr(build_zoo, "train", fake_train({}))
    assert build_zoo.main([*argv, "--out", str(tmp_path / "broken")]) == 2
    assert "not a readable manifest" in capsys.readouterr().err and not hub.repos

    temp_manifest.write_text('{"checkpoints": []}\n')
    assert build_zoo.main([*argv, "--out", str(tmp_path / "good")]) == 0
    (record,) = json.loads(temp_manifest.read_text())["checkpoints"]
    assert record["hf_hub_id"] == f"org/coop_resnet18.a1_in1k@{hub.repos['org/coop_resnet18.a1_in1k'].branches['main']}"


def test_publish_checks_the_record_before_pushing(hub, tmp_path, temp_manifest):
    publish = load_tool("publish")
    save_pretrained(tiny(), tmp_path / "run" / "model", per_depth=rows(2), training=TRAINING)
    with pytest.raises(ValueError, match="measured accuracy for each of the 4 depths"):
        publish.main([str(tmp_path / "run"), "--repo-id", "org/zoo", "--tag", "pets", "--manifest", str(temp_manifest)])
    assert not hub.repos
