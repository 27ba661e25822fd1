"""transformers round trip: coopnets checkpoints load in transformers (5.x) after ``import coopnets``.

``AutoConfig``, ``AutoModelForImageClassification``, ``AutoImageProcessor`` and the real
``pipeline("image-classification")``, from a folder and through the Hub protocol (the local
test Hub, tests/hub_server.py, which must serve everything transformers asks for); logits
equal to coopnets' own at the checkpoint's depth and at every depth chosen with
``pipe.model.timm_model.set_depth(k)``; ``id2label`` equal to the label names; checkpoints of
formats 1 and 2 (tests/data) upgraded on load. Every checkpoint coopnets writes (zoo entries and
``coopnets.wrap(<any timm model>)``, formats 1-3) loads in transformers and in timm's ``hf-hub:`` /
``local-dir:``, ``coop_<backbone>`` registered on demand (issue 28).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path
from typing import List, Tuple

import numpy as np
import pytest
import timm
import torch
from huggingface_hub import HfApi
from PIL import Image
from timm.data import create_transform, resolve_data_config

import coopnets
from coopnets.hub import push_to_hub, save_pretrained
from coopnets.hub import transformers_compat

from hub_server import hub, hub_server  # noqa: F401  (pytest fixtures)

transformers = pytest.importorskip("transformers")

TINY = dict(layers=[1, 1, 1, 1], channels=[8, 16, 32, 64], stem_width=8)
LABELS = ["cat", "dog", "bird"]
DATA_CONFIG = {"input_size": (3, 32, 32), "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
               "mean": (0.5, 0.4, 0.3), "std": (0.25, 0.2, 0.3), "label_names": LABELS}
DATA = Path(__file__).with_name("data")


def tiny_model() -> coopnets.DepthAdaptiveModel:
    torch.manual_seed(3)
    return coopnets.create_model("coop_resnet18", num_classes=len(LABELS), **TINY).eval()


def images(n: int = 3, size: int = 40):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size + 7, 3), dtype=np.uint8)) for _ in range(n)]


def coopnets_logits(model: coopnets.DepthAdaptiveModel, image: Image.Image, depth: int) -> torch.Tensor:
    """coopnets' own logits at ``depth``, fed through timm's pipeline from the model's own data config."""
    x = create_transform(**resolve_data_config({}, model=model))(image.convert("RGB")).unsqueeze(0)
    with torch.no_grad():
        return model.forward_depth(x, depth)[0]


def pipeline_logits(pipe, image: Image.Image) -> torch.Tensor:
    """The pipeline's raw logits per class index (``function_to_apply="none"``, every class)."""
    label2id = pipe.model.config.label2id
    out = pipe(image, top_k=len(label2id), function_to_apply="none")  # top_k=None gives at most 5
    logits = torch.empty(len(out))
    for row in out:
        logits[label2id[row["label"]]] = row["score"]
    return logits


def test_pipeline_through_the_test_hub_matches_coopnets_at_every_depth(hub):
    """The issue's acceptance test: transformers' real pipeline on a pushed checkpoint, served by the test Hub."""
    model = tiny_model()
    push_to_hub(model, "org/tiny-pets", data_config=DATA_CONFIG, training={"dataset": "pets"})
    loaded = coopnets.create_model("hf-hub:org/tiny-pets", pretrained=True).eval()

    pipe = transformers.pipeline("image-classification", model="org/tiny-pets")
    assert isinstance(pipe.model.timm_model, coopnets.DepthAdaptiveModel)
    assert pipe.model.config.id2label == dict(enumerate(LABELS))
    assert pipe.model.timm_model.depth == model.num_depths  # the checkpoint's depth: full, as coopnets loads it
    for image in images():
        want = coopnets_logits(loaded, image, model.num_depths)
        torch.testing.assert_close(pipeline_logits(pipe, image), want, atol=1e-5, rtol=1e-5)
        assert pipe(image, top_k=1)[0]["label"] == LABELS[int(want.argmax())]
    for depth in range(1, model.num_depths):
        pipe.model.timm_model.set_depth(depth)
        for image in images(2):
            torch.testing.assert_close(pipeline_logits(pipe, image), coopnets_logits(loaded, image, depth), atol=1e-5, rtol=1e-5)

    # the task comes from the card's pipeline_tag (GET /api/models/<repo>), as on the Hub
    inferred = transformers.pipeline(model="org/tiny-pets")
    assert inferred.task == "image-classification"
    assert not hub.unrouted, hub.unrouted  # the test Hub served everything transformers asked for


def test_auto_classes_from_a_folder_and_the_hub_equal_coopnets(hub, tmp_path):
    model = tiny_model()
    folder = save_pretrained(model, tmp_path / "pets", data_config=DATA_CONFIG)
    HfApi().create_repo("org/pets")
    HfApi().upload_folder(folder_path=str(folder), repo_id="org/pets")
    x = torch.randn(2, 3, 32, 32)
    for source in (str(folder), "org/pets"):
        config = transformers.AutoConfig.from_pretrained(source)
        assert type(config).__name__ == "TimmWrapperConfig" and config.architecture == "coop_resnet18"
        assert config.id2label == dict(enumerate(LABELS)) and config.num_labels == 3
        processor = transformers.AutoImageProcessor.from_pretrained(source)
        assert list(processor.data_config["input_size"]) == [3, 32, 32] and list(processor.data_config["mean"]) == [0.5, 0.4, 0.3]
        hf = transformers.AutoModelForImageClassification.from_pretrained(source).eval()
        with torch.no_grad():
            assert torch.equal(hf(pixel_values=x).logits, model(x))  # full depth: the checkpoint's depth
            hf.timm_model.set_depth(2)
            assert torch.equal(hf(pixel_values=x).logits, model.forward_depth(x, 2))
        pixel_values = processor(images(1)[0], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            loaded = coopnets.create_model(f"local-dir:{folder}", pretrained=True).eval()  # the recorded preprocessing
            torch.testing.assert_close(hf(pixel_values=pixel_values).logits[0], coopnets_logits(loaded, images(1)[0], 2))
    assert not hub.unrouted, hub.unrouted


@pytest.mark.parametrize("name, labels", [("checkpoint_v1_coop_resnet18", None), ("checkpoint_v1_blocks_coop_resnet18", None),
                                          ("checkpoint_v2_coop_resnet18", ["cat", "dog", "bird"])])
def test_format_1_and_2_checkpoints_load_in_transformers_upgraded_on_load(name, labels, hub):
    """Folders written before format 3 (num_classes also in model_args, label names only in pretrained_cfg)
    load from disk and from the Hub as they are: same logits at every depth as when written."""
    folder = DATA / name
    on_disk = json.loads((folder / "config.json").read_text())
    assert on_disk["coopnets"]["format_version"] in (1, 2) and "num_classes" in on_disk["model_args"]
    expected = torch.load(DATA / f"{name}.expected.pt", weights_only=True)
    repo = f"org/{name}"
    HfApi().create_repo(repo)
    HfApi().upload_folder(folder_path=str(folder), repo_id=repo)  # published as is: no coopnets in between
    for source in (str(folder), repo):
        hf = transformers.AutoModelForImageClassification.from_pretrained(source).eval()
        want = labels or [f"LABEL_{i}" for i in range(on_disk["num_classes"])]  # format 1 recorded no names
        assert list(hf.config.id2label.values()) == want
        with torch.no_grad():
            for depth, logits in enumerate(expected["logits"], 1):
                hf.timm_model.set_depth(depth)
                torch.testing.assert_close(hf(pixel_values=expected["x"]).logits, logits, atol=1e-5, rtol=1e-5)
    assert json.loads((folder / "config.json").read_text()) == on_disk  # nothing on disk was changed
    if labels:
        pipe = transformers.pipeline("image-classification", model=str(folder))
        assert {r["label"] for r in pipe(images(1, 32)[0], top_k=None)} == set(labels)


def test_format_2_checkpoint_loads_in_coopnets_and_timm_with_its_labels():
    import timm

    folder = DATA / "checkpoint_v2_coop_resnet18"
    expected = torch.load(DATA / "checkpoint_v2_coop_resnet18.expected.pt", weights_only=True)
    for create in (coopnets.create_model, timm.create_model):
        loaded = create(f"local-dir:{folder}", pretrained=True).eval()
        assert loaded.pretrained_cfg["label_names"] == ["cat", "dog", "bird"] and loaded.num_classes == 3
        with torch.no_grad():
            for depth, logits in enumerate(expected["logits"], 1):
                torch.testing.assert_close(loaded.forward_depth(expected["x"], depth), logits, atol=1e-5, rtol=1e-5)


def test_the_upgrade_hook_patches_transformers_once_and_leaves_other_configs_alone(monkeypatch):
    from transformers.models.timm_wrapper.configuration_timm_wrapper import TimmWrapperConfig

    assert TimmWrapperConfig.from_dict._coopnets_upgrade  # transformers was imported after coopnets: the hook ran

    seen = []

    class FakeConfig:
        @classmethod
        def from_dict(cls, config_dict, **kwargs):
            seen.append(config_dict)
            return cls

    fake = types.ModuleType(transformers_compat.TARGET)
    fake.TimmWrapperConfig = FakeConfig
    monkeypatch.setitem(__import__("sys").modules, transformers_compat.TARGET, fake)
    transformers_compat.install()  # already imported: patched at once
    transformers_compat.install()  # and only once
    old = {"architecture": "coop_resnet18", "num_classes": 2, "model_args": {"num_classes": 2, "plan": "exits"},
           "pretrained_cfg": {"label_names": ["a", "b"]}, "coopnets": {"format_version": 2}}
    plain = {"architecture": "resnet18", "num_classes": 2, "model_args": {"num_classes": 2}, "pretrained_cfg": {}}
    FakeConfig.from_dict(old)
    FakeConfig.from_dict(plain)
    assert seen[0]["model_args"] == {"plan": "exits"} and seen[0]["label_names"] == ["a", "b"]
    assert old["model_args"] == {"num_classes": 2, "plan": "exits"}  # the caller's dict is not changed
    assert seen[1] is plain


# --- every checkpoint coopnets writes, in every loader (issue 28) ---------------------------------------
#: format 3, written now: a zoo entry and coopnets.wrap(<timm model>) over each kind of runner and plan
WRITTEN = {
    "zoo-coop_resnet18": lambda: coopnets.create_model("coop_resnet18", num_classes=3, **TINY),
    "wrap-test_resnet": lambda: coopnets.wrap("test_resnet", num_classes=3),
    "wrap-mobilenetv3_small_100": lambda: coopnets.wrap("mobilenetv3_small_100", num_classes=3),
    "wrap-test_convnext-blocks": lambda: coopnets.wrap("test_convnext", num_classes=3, plan="blocks"),
    "wrap-test_vit": lambda: coopnets.wrap("test_vit", num_classes=3, img_size=32),
}
#: formats 1 and 2, written by earlier coopnets versions (tests/data, with their expected logits)
SAVED = ["checkpoint_v1_coop_resnet18", "checkpoint_v1_blocks_coop_resnet18", "checkpoint_v2_coop_resnet18",
         "checkpoint_v1_wrapped_test_resnet", "checkpoint_v2_wrapped_test_resnet"]


def checkpoint(name: str, tmp_path: Path) -> Tuple[Path, torch.Tensor, List[torch.Tensor]]:
    """The folder of checkpoint ``name``, an input batch and coopnets' logits for it at every depth."""
    if name in SAVED:
        expected = torch.load(DATA / f"{name}.expected.pt", weights_only=True)
        return DATA / name, expected["x"], list(expected["logits"])
    torch.manual_seed(5)
    model = WRITTEN[name]().eval()
    folder = save_pretrained(model, tmp_path / name, data_config=DATA_CONFIG)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        return folder, x, [model.forward_depth(x, d) for d in range(1, model.num_depths + 1)]


@pytest.mark.parametrize("name", [*WRITTEN, *SAVED])
def test_every_checkpoint_loads_in_transformers_and_timm_with_coopnets_logits_at_every_depth(name, hub, tmp_path):
    """The issue's acceptance test: zoo and wrapped checkpoints of formats 1-3, from a folder and through the test
    Hub, in AutoModelForImageClassification, pipeline("image-classification") and timm's local-dir:/hf-hub:,
    after ``import coopnets`` only; logits equal to coopnets' own at every depth set with ``set_depth(k)``."""
    folder, x, expected = checkpoint(name, tmp_path)
    if name in WRITTEN:  # the depths differ, so each check means something (the v1 blocks fixture's zero-init
        assert not torch.allclose(expected[0], expected[-1])  # residual blocks make its depths agree)
    repo = f"org/{name}"
    HfApi().create_repo(repo)
    HfApi().upload_folder(folder_path=str(folder), repo_id=repo)  # published as is: no coopnets in between
    image = images(1)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # format 1 records no preprocessing: coopnets says so
        own = coopnets.create_model(f"local-dir:{folder}", pretrained=True).eval()
        for source, timm_name in ((str(folder), f"local-dir:{folder}"), (repo, f"hf-hub:{repo}")):
            hf = transformers.AutoModelForImageClassification.from_pretrained(source).eval()
            from_timm = timm.create_model(timm_name, pretrained=True).eval()
            pipe = transformers.pipeline("image-classification", model=source)
            assert all(isinstance(m, coopnets.DepthAdaptiveModel) for m in (hf.timm_model, from_timm, pipe.model.timm_model))
            for depth, want in enumerate(expected, 1):
                hf.timm_model.set_depth(depth)
                from_timm.set_depth(depth)
                pipe.model.timm_model.set_depth(depth)
                with torch.no_grad():
                    torch.testing.assert_close(hf(pixel_values=x).logits, want, atol=1e-5, rtol=1e-5)
                    torch.testing.assert_close(from_timm(x), want, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(pipeline_logits(pipe, image), coopnets_logits(own, image, depth), atol=1e-5, rtol=1e-5)
    assert not hub.unrouted, hub.unrouted


def test_wrapped_architectures_are_registered_on_demand_in_a_fresh_interpreter(tmp_path):
    """``coop_mobilenetv3_small_100`` (what ``coopnets train --model mobilenetv3_small_100`` records) is unknown to
    timm until transformers or timm resolves it after ``import coopnets``; then it is registered with timm (outside
    coopnets' zoo listing). A backbone this timm lacks is one line naming it and the timm version."""
    torch.manual_seed(5)
    model = coopnets.wrap("mobilenetv3_small_100", num_classes=3).eval()
    folder = save_pretrained(model, tmp_path / "run" / "model", data_config=DATA_CONFIG)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.save({"x": x, "logits": [model.forward_depth(x, d) for d in range(1, model.num_depths + 1)]}, tmp_path / "want.pt")
    broken = tmp_path / "broken"
    broken.mkdir()
    config = json.loads((folder / "config.json").read_text())
    config["architecture"] = config["pretrained_cfg"]["architecture"] = "coop_mobilenetv3_smal_100"
    config["coopnets"]["backbone"] = "mobilenetv3_smal_100"
    (broken / "config.json").write_text(json.dumps(config))
    (broken / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    script = f"""
import timm, torch, transformers
import coopnets
folder, broken, want = {str(folder)!r}, {str(broken)!r}, torch.load({str(tmp_path / "want.pt")!r}, weights_only=True)
assert coopnets.is_model("coop_mobilenetv3_small_100")  # a coopnets architecture: coop_<timm backbone>
assert not timm.is_model("coop_mobilenetv3_small_100")  # not registered with timm yet
hf = transformers.AutoModelForImageClassification.from_pretrained(folder).eval()
assert timm.is_model("coop_mobilenetv3_small_100")  # registered when transformers asked timm for it
assert "coop_mobilenetv3_small_100" not in coopnets.list_models()  # the zoo listing
m = timm.create_model("local-dir:" + folder, pretrained=True).eval()
with torch.no_grad():
    for depth, logits in enumerate(want["logits"], 1):
        hf.timm_model.set_depth(depth)
        m.set_depth(depth)
        torch.testing.assert_close(hf(pixel_values=want["x"]).logits, logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(m(want["x"]), logits, atol=1e-5, rtol=1e-5)
for load in (lambda: transformers.AutoModelForImageClassification.from_pretrained(broken),
             lambda: timm.create_model("local-dir:" + broken, pretrained=True),
             lambda: coopnets.create_model("local-dir:" + broken, pretrained=True)):
    try:
        load()
    except RuntimeError as e:
        print(type(e).__name__ + ": " + str(e))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 3, done.stdout
    for line in lines:  # transformers passes coopnets' error on as it is; coopnets adds the checkpoint's location
        assert "Unknown timm backbone 'mobilenetv3_smal_100' of coopnets architecture 'coop_mobilenetv3_smal_100'" in line
        assert f"timm {timm.__version__} has no model 'mobilenetv3_smal_100'" in line
        assert "Did you mean: mobilenetv3_small_100" in line
    assert lines[0].startswith("UnknownBackboneError") and lines[2].startswith(f"CheckpointError: local-dir:{broken}")


def test_a_cli_training_run_of_a_timm_backbone_loads_in_transformers_and_timm(tmp_path):
    """The issue's report: ``coopnets train --model mobilenetv3_small_100`` writes ``architecture:
    coop_mobilenetv3_small_100``; RUN/model loads in transformers and timm after ``import coopnets``."""
    from coopnets.cli import main as coopnets_main

    run = tmp_path / "run"
    assert coopnets_main(["train", "--model", "mobilenetv3_small_100", "--img-size", "16", "--limit-train", "32",
                          "--limit-eval", "16", "--batch-size", "16", "--epochs", "1", "--method", "multi_exit",
                          "--profile-repeats", "1", "--no-progress", "--out", str(run)]) == 0
    folder = run / "model"
    assert json.loads((folder / "config.json").read_text())["architecture"] == "coop_mobilenetv3_small_100"
    own = coopnets.create_model(f"local-dir:{folder}", pretrained=True).eval()
    hf = transformers.AutoModelForImageClassification.from_pretrained(str(folder)).eval()
    from_timm = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert hf.config.id2label == dict(enumerate(own.pretrained_cfg["label_names"]))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        for depth in range(1, own.num_depths + 1):
            hf.timm_model.set_depth(depth)
            from_timm.set_depth(depth)
            want = own.forward_depth(x, depth)
            torch.testing.assert_close(hf(pixel_values=x).logits, want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(from_timm(x), want, atol=1e-5, rtol=1e-5)
