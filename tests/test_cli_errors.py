"""Every CLI command turns an expected failure into one line on stderr naming the problem, exit code 2,
no traceback and nothing written (issue 13, item 2)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import constants

import coopnets
from coopnets.cli import main

from hub_server import hub, hub_server  # noqa: F401  (pytest fixtures)


def fails(capsys, argv, *words: str) -> str:
    """Run ``coopnets argv``: exit code 2, exactly one stderr error line naming the problem, no traceback
    (one-line warnings about the checkpoint may come before it)."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if f"coopnets {argv[0]}: warning: " not in line]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"coopnets {argv[0]}: error: ") and "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    return coopnets.save_pretrained(coopnets.wrap("test_resnet", num_classes=3), tmp_path / "run" / "model").parent


def export(source, out, depth="2"):
    return ["export", str(source), "--depth", depth, "--format", "torchscript", "--out", str(out)]


def test_export_bad_depth_names_the_valid_depths_and_writes_nothing(checkpoint, tmp_path, capsys):
    fails(capsys, export(checkpoint, tmp_path / "out" / "d.pt", depth="9"), "depths 1..4")
    assert not (tmp_path / "out").exists()


def test_export_missing_path(tmp_path, capsys):
    fails(capsys, export(tmp_path / "nope", tmp_path / "d.pt"), "does not exist", "run folder")


def test_export_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "weights.pt").write_bytes(b"not a checkpoint")
    fails(capsys, export(tmp_path / "weights.pt", tmp_path / "d.pt"), "is a file, not a checkpoint")
    (tmp_path / "timm").mkdir()
    (tmp_path / "timm" / "config.json").write_text(json.dumps({"architecture": "resnet18"}))
    fails(capsys, export(tmp_path / "timm", tmp_path / "d.pt"), "not a coopnets checkpoint")
    assert not (tmp_path / "d.pt").exists()


def test_export_unknown_name_lists_the_valid_sources(tmp_path, capsys):
    fails(capsys, export("coop_nonet", tmp_path / "d.pt"), "unknown model 'coop_nonet'", "hf-hub:ORG/NAME", "zoo model name")


def test_export_missing_repo(hub, tmp_path, capsys):
    fails(capsys, export("hf-hub:org/nope", tmp_path / "d.pt"), "repository 'org/nope' not found")


def test_export_offline_without_a_cached_copy(hub, tmp_path, capsys, monkeypatch):
    coopnets.push_to_hub(coopnets.wrap("test_resnet", num_classes=3), "org/tiny")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    fails(capsys, export("hf-hub:org/tiny", tmp_path / "d.pt"), "HF_HUB_OFFLINE=1", "not in the local cache")


def test_export_hub_checkpoint_uses_its_own_input_size(hub, tmp_path, capsys):
    model = coopnets.wrap("test_resnet", num_classes=3)
    folder = coopnets.save_pretrained(model, tmp_path / "ckpt", data_config={"input_size": (3, 24, 24)})
    coopnets.push_to_hub(folder, "org/tiny24")
    assert main(export("hf-hub:org/tiny24", tmp_path / "d.pt")) == 0
    assert "input (1, 3, 24, 24)" in capsys.readouterr().out


def test_push_missing_path_and_not_a_checkpoint(tmp_path, capsys):
    fails(capsys, ["push", str(tmp_path / "nope"), "--repo-id", "org/x"], "does not exist")
    (tmp_path / "empty").mkdir()
    fails(capsys, ["push", str(tmp_path / "empty"), "--repo-id", "org/x"], "no checkpoint in")


def test_push_refused_token(hub, checkpoint, capsys):
    hub.read_only = True
    fails(capsys, ["push", str(checkpoint), "--repo-id", "org/x", "--token", "hf_bad"], "publishing to org/x", "hf auth login")
    assert "org/x" not in hub.repos


def test_push_offline(hub, checkpoint, capsys, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    fails(capsys, ["push", str(checkpoint), "--repo-id", "org/x"], "offline mode is on (HF_HUB_OFFLINE=1)")
    assert "org/x" not in hub.repos


def test_demo_unknown_model_lists_the_zoo(capsys):
    fails(capsys, ["demo", "--model", "coop_nonet"], "Unknown coopnets model 'coop_nonet'", "coop_resnet18")
