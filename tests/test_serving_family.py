"""The model-switching baseline: an ``independent`` sweep served as a family, one model per depth.

A sweep folder of four tiny runs (``depth{d}/model``, each with its own weights and recorded
validation accuracies) is read by :meth:`ModelFamily.from_sweep`: member ``d`` must be run
``d``'s network cut to depth ``d``, the accuracy table must be each run's own depth, and the
memory report must count every member. The controller must choose among the members, and
``coopnets serve SWEEP`` must serve them over HTTP and report them in ``/stats``.
"""
from __future__ import annotations

import io
import json
import shutil
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image

import coopnets
from coopnets.cli import main
from coopnets.inference.profiler import parameter_bytes
from coopnets.serving import DepthController
from coopnets.serving.core import ServeSettings, ServingCore
from coopnets.serving.family import ModelFamily

DATA_CONFIG = {"input_size": (3, 32, 32), "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
               "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "label_names": ["a", "b", "c"]}
#: run d records validation accuracy VAL[d - 1] at its own depth (and other values elsewhere)
VAL = [0.41, 0.62, 0.83, 0.74]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """An ``independent`` sweep's folder: four runs, each its own weights, each recording per-depth validation."""
    root = tmp_path_factory.mktemp("family") / "sweep"
    for d in range(1, 5):
        torch.manual_seed(d)
        model = coopnets.wrap("test_resnet", num_classes=3)
        rows = [{"depth": k, "accuracy": 0.1, "val_accuracy": VAL[d - 1] if k == d else 0.05} for k in range(1, 5)]
        coopnets.save_pretrained(model, root / f"depth{d}" / "model", per_depth=rows, data_config=DATA_CONFIG)
    return root


def run_model(sweep: Path, d: int):
    return coopnets.create_model(f"local-dir:{sweep / f'depth{d}' / 'model'}", pretrained=True).eval()


def test_members_are_each_runs_own_depth(sweep):
    fam = ModelFamily.from_sweep(sweep)
    assert fam.num_depths == 4 and fam.num_classes == 3
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        for d in range(1, 5):
            torch.testing.assert_close(fam.forward_depth(x, d), run_model(sweep, d).forward_depth(x, d))
        assert not torch.allclose(fam.forward_depth(x, 4), run_model(sweep, 1).forward_depth(x, 4))
    assert fam.recorded.values == VAL  # each run's validation accuracy at the depth it trained
    assert all(s > 0 for s in fam.load_s)
    assert fam.pretrained_cfg["label_names"] == ["a", "b", "c"]


def test_memory_counts_every_member_and_nothing_deeper(sweep):
    fam = ModelFamily.from_sweep(sweep)
    members = [parameter_bytes(m) for m in fam.members]
    assert fam.parameter_bytes() == sum(members)
    assert [e["parameter_bytes"] for e in fam.describe()["family"]] == members
    assert members == sorted(members) and members[0] < members[-1]  # each member stops at its own depth
    one = run_model(sweep, 4)
    assert members[-1] <= parameter_bytes(one)  # the largest member has no exit heads it does not run
    assert fam.parameter_bytes() > parameter_bytes(one)  # four networks hold more than one


def test_the_controller_chooses_a_member_per_batch(sweep):
    fam = ModelFamily.from_sweep(sweep)
    ctl = DepthController.for_model(fam, slo_ms=1e5, max_batch_size=2, profile_batch_sizes=[1, 2], repeats=1)
    assert [o.accuracy for o in ctl.options] == VAL
    x = torch.randn(2, 3, 32, 32)
    logits, depths, decision = ctl.run(x, waited_ms=[0.0, 0.0])
    assert decision.option.depth == 3 and depths.tolist() == [3, 3]  # the most accurate member fits
    with torch.inference_mode():
        torch.testing.assert_close(logits, fam.forward_depth(x, 3))
    late = ctl.decide(2, [1e5, 1e5])  # no slack: the cheapest member
    assert late.option.depth == 1 and not late.fits


def test_a_broken_sweep_is_refused_with_what_to_do(sweep, tmp_path):
    with pytest.raises(coopnets.hub.CheckpointError, match="not an `independent` sweep"):
        ModelFamily.from_sweep(tmp_path)
    partial = tmp_path / "partial"
    shutil.copytree(sweep, partial)
    shutil.rmtree(partial / "depth4")
    with pytest.raises(coopnets.hub.CheckpointError, match="holds 3 runs but its model has 4 depths"):
        ModelFamily.from_sweep(partial)
    assert not ModelFamily.is_sweep(sweep / "depth1") and ModelFamily.is_sweep(sweep)


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (90, 20, 200)).save(buf, format="PNG")
    return buf.getvalue()


def test_serving_core_reports_the_family(sweep):
    import asyncio
    import time

    fam = ModelFamily.from_sweep(sweep)
    core = ServingCore(fam, ServeSettings(slo_ms=5e4, max_batch_size=2), profile_repeats=1)
    try:
        reply = asyncio.run(core.predict(png(), arrived=time.perf_counter()))
        assert reply.status == 200 and reply.payload["depth"] == 3 and reply.payload["label"] in ("a", "b", "c")
        info = core.info
        assert info["parameter_bytes"] == fam.parameter_bytes()
        assert [m["name"] for m in info["family"]] == [f"test_resnet@depth{d}" for d in range(1, 5)]
    finally:
        core.close()


def test_coopnets_serve_serves_a_sweep_folder(sweep, tmp_path):
    import harness

    server = harness.ServeProcess(str(sweep), ["--engine", "local", "--slo-ms", "50000", "--max-batch-size", "2"],
                                  tmp_path / "serve.log", timeout_s=240)
    try:
        req = urllib.request.Request(f"{server.url}/predict", data=png(), method="POST")
        with urllib.request.urlopen(req, timeout=60) as r:
            reply = json.loads(r.read())
        assert reply["depth"] == 3  # the member with the best recorded validation accuracy
        with urllib.request.urlopen(f"{server.url}/stats", timeout=60) as r:
            stats = json.loads(r.read())
        assert len(stats["model"]["family"]) == 4
        assert stats["model"]["parameter_bytes"] == sum(m["parameter_bytes"] for m in stats["model"]["family"])
    finally:
        server.close()
    assert "served as a family of 4 separately trained models" in (tmp_path / "serve.log").read_text()


def test_cli_refuses_an_unfinished_sweep_in_one_line(sweep, tmp_path, capsys):
    import harness

    partial = tmp_path / "partial"
    shutil.copytree(sweep, partial)
    shutil.rmtree(partial / "depth4")
    assert main(["serve", str(partial), "--engine", "local", "--port", str(harness.free_port())]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "holds 3 runs but its model has 4 depths" in lines[0] and "--resume" in lines[0]
