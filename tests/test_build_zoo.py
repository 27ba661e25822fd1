"""hub/build_zoo.py end to end against the local Hub: a pretrained timm tag -> cooperative fine-tune with a
fixed pretrained Leader -> measured checkpoint -> push -> manifest record -> ``coop_<name>.<tag>`` loads
through the manifest and reproduces the card's accuracy."""
from __future__ import annotations

import importlib
import importlib.util
import json
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from huggingface_hub import HfApi

import coopnets
from coopnets.hub import manifest
from coopnets.models import coop_resnet
from coopnets.train import load_data
from coopnets.train.build import make_loader
from coopnets.train.trainer import evaluate

from hub_server import hub, hub_server  # noqa: F401  (pytest fixtures)

SPEC = importlib.util.spec_from_file_location("build_zoo", Path(__file__).parents[1] / "hub" / "build_zoo.py")
build_zoo = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(build_zoo)

SMALL = ["--", "--limit-train", "64", "--limit-eval", "48", "--batch-size", "32", "--profile-repeats", "1",
         "--no-progress", "--lr", "0.01"]


def publish_timm_weights(repo: str, arch: str) -> dict:
    """A timm-format pretrained weight file on the local Hub (what timm downloads for ``arch.tag``)."""
    torch.manual_seed(7)
    weights = timm.create_model(arch).state_dict()
    api = HfApi()
    api.create_repo(repo, exist_ok=True)
    config = {"architecture": arch, "num_classes": 1000, "pretrained_cfg": timm.models.get_pretrained_cfg(arch).to_dict()}
    api.upload_file(path_or_fileobj=safetensors.torch.save(weights), path_in_repo="model.safetensors", repo_id=repo)
    api.upload_file(path_or_fileobj=json.dumps(config).encode(), path_in_repo="config.json", repo_id=repo)
    return weights


def reregister_zoo() -> None:
    """Re-read the manifest into timm's registry (zoo tags are registered at import, as timm's own)."""
    manifest.load_manifest.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm warns that it overwrites the entries
        importlib.reload(coop_resnet)


@pytest.mark.slow
def test_build_zoo_dry_run_then_publish_and_load_through_the_manifest(hub, tmp_path, monkeypatch, capsys):
    source = publish_timm_weights("timm/resnet18.a1_in1k", "resnet18")
    path = tmp_path / "manifest.json"
    path.write_text('{"checkpoints": []}\n')
    monkeypatch.setattr(manifest, "MANIFEST_PATH", path)
    base = ["coop_resnet18", "--from", "resnet18.a1_in1k", "--epochs", "1", "--img-size", "32", "--manifest", str(path)]
    try:
        # dry run: trained, measured and carded, nothing pushed, the manifest untouched
        assert build_zoo.main([*base, "--out", str(tmp_path / "dry"), "--dry-run", *SMALL]) == 0
        record = json.loads((tmp_path / "dry" / "zoo_record.json").read_text())
        assert record["model"] == "coop_resnet18" and record["tag"] == "a1_in1k"
        assert record["training"]["source_tag"] == "resnet18.a1_in1k"
        assert "fixed_leader=True" in record["training"]["command"] and "--pretrained" in record["training"]["command"]
        assert len(record["per_depth"]) == 4 and all(r["flops"] > 0 for r in record["per_depth"])
        assert json.loads(path.read_text()) == {"checkpoints": []}
        card = (tmp_path / "dry" / "model" / "README.md").read_text()
        assert "resnet18.a1_in1k" in card and "create_transform" in card

        # the Teammates started from the tag's weights (the run saved the Leader unchanged: it is fixed)
        leader = safetensors.torch.load_file(str(tmp_path / "dry" / "leader.safetensors"))
        assert all(torch.equal(leader[k], source[k]) for k in source if not k.startswith("fc."))

        # publish: pushed, recorded with the pinned commit, loadable as a zoo tag
        assert build_zoo.main([*base, "--out", str(tmp_path / "pub"), "--repo-id", "org/coop_resnet18.a1_in1k", *SMALL]) == 0
        (recorded,) = json.loads(path.read_text())["checkpoints"]
        assert manifest.is_pinned(recorded["hf_hub_id"]) and recorded["hf_hub_id"].startswith("org/coop_resnet18.a1_in1k@")
        reregister_zoo()
        assert "coop_resnet18.a1_in1k" in coopnets.list_models(pretrained=True)
        model = coopnets.create_model("coop_resnet18.a1_in1k", pretrained=True).eval()
        data = load_data("digits", None, 32).limited(64, 48)
        got = evaluate(model, make_loader(data.test, 32, 0), torch.device("cpu"))
        assert got == pytest.approx([r["accuracy"] for r in recorded["per_depth"]], abs=1e-9)
    finally:
        monkeypatch.undo()
        reregister_zoo()
    assert "coop_resnet18.a1_in1k" not in coopnets.list_models(pretrained=True)


def test_build_zoo_refuses_bad_sources_in_one_line(tmp_path, capsys):
    for argv, needle in (
        (["coop_nope", "--from", "resnet18.a1_in1k"], "not a zoo entry"),
        (["coop_resnet18", "--from", "resnet18"], "pretrained tag"),
        (["coop_resnet18", "--from", "resnet50.a1_in1k"], "different backbone"),
        (["coop_resnet18", "--from", "resnet18.a1_in1k"], "--repo-id"),
    ):
        assert build_zoo.main([*argv, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0]
    assert not (tmp_path / "x").exists()
