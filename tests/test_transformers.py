"""transformers round trip: coopnets checkpoints load in transformers (5.x) after ``import coopnets``.

``AutoConfig``, ``AutoModelForImageClassification``, ``AutoImageProcessor`` and the real
``pipeline("image-classification")``, from a folder and through the Hub protocol (the local
test Hub, tests/hub_server.py, which must serve everything transformers asks for); logits
equal to coopnets' own at the checkpoint's depth and at every depth chosen with
``pipe.model.timm_model.set_depth(k)``; ``id2label`` equal to the label names; checkpoints of
formats 1 and 2 (tests/data) upgraded on load.
"""
from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
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
    out = pipe(image, top_k=None, function_to_apply="none")
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
