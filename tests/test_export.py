"""Standalone export of one depth: same outputs, fewer parameters, traceable, ONNX / TorchScript / safetensors."""
import pytest
import torch

import coopnets
from coopnets import cli
from coopnets.inference.export import check_onnx, save
from coopnets.models.plans import ExitModel

FAMILIES = ["test_resnet", "test_vit", "test_convnext", "test_efficientnet"]


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("plan", ["exits", "blocks"])
def test_export_matches_set_depth(name, plan):
    torch.manual_seed(0)
    if plan == "blocks" and name in ("test_resnet", "test_efficientnet"):
        # one block per stage: nothing to skip, so the blocks plan is refused instead of degenerating to 1 depth
        with pytest.raises(ValueError, match="at least 2 depths"):
            coopnets.wrap(name, num_classes=10, plan=plan)
        return
    model = coopnets.wrap(name, num_classes=10, plan=plan).eval()
    assert model.num_depths >= 2
    x = torch.randn(2, 3, 64, 64)
    full = model.export(model.num_depths)
    for depth in range(1, model.num_depths + 1):
        small = model.export(depth)
        assert not isinstance(small, coopnets.DepthAdaptiveModel)
        with torch.no_grad():
            torch.testing.assert_close(small(x), model.set_depth(depth)(x), atol=1e-5, rtol=1e-4)
        if depth < model.num_depths:
            assert n_params(small) < n_params(full)
    if plan == "exits":
        first = model.export(1)
        assert isinstance(first, ExitModel)
        assert not any(isinstance(m, coopnets.ExitHead) for m in first.backbone.modules())


def test_export_is_a_copy():
    model = coopnets.wrap("test_resnet", num_classes=10).eval()
    small = model.export(2)
    with torch.no_grad():
        next(small.parameters()).add_(1.0)
    assert not torch.equal(next(small.parameters()), next(model.parameters()))


def test_traces_with_torch_export_and_jit():
    model = coopnets.wrap("test_convnext", num_classes=10).eval()
    small, x = model.export(2), torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = small(x)
        torch.testing.assert_close(torch.export.export(small, (x,)).module()(x), want)
        torch.testing.assert_close(torch.jit.trace(small, x)(x), want)


@pytest.mark.parametrize("depth", [0, 5, 2.0, True])
def test_bad_depth(depth):
    model = coopnets.wrap("test_resnet", num_classes=10)
    with pytest.raises(ValueError, match=r"depths 1\.\.4"):
        model.export(depth)


def test_onnx_runs_in_onnxruntime(tmp_path):
    pytest.importorskip("onnxscript")
    model = coopnets.wrap("test_vit", num_classes=10).eval()
    small = model.export(2)
    path = save(small, tmp_path / "d2.onnx", "onnx", torch.randn(1, 3, 64, 64))
    pytest.importorskip("onnxruntime")
    assert check_onnx(path, small, torch.randn(3, 3, 64, 64)) < 1e-4  # dynamic batch


def test_bad_format(tmp_path):
    with pytest.raises(ValueError, match="onnx, safetensors, torchscript"):
        save(torch.nn.Linear(2, 2), tmp_path / "x", "tflite", torch.randn(1, 2))


def test_cli_torchscript_and_safetensors(tmp_path, capsys):
    from safetensors.torch import load_file

    out = tmp_path / "r18_d1.pt"
    assert cli.main(["export", "coop_resnet18", "--num-classes", "10", "--depth", "1",
                     "--format", "torchscript", "--out", str(out), "--img-size", "64"]) == 0
    assert "depth 1/4" in capsys.readouterr().out
    scripted = torch.jit.load(str(out))
    assert scripted(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    st = tmp_path / "r18_d1.safetensors"
    cli.main(["export", "coop_resnet18", "--num-classes", "10", "--depth", "1",
              "--format", "safetensors", "--out", str(st), "--img-size", "64"])
    model = coopnets.create_model("coop_resnet18", num_classes=10)
    assert set(load_file(str(st))) == set(model.export(1).state_dict())


def test_cli_exports_saved_checkpoint_with_its_weights(tmp_path):
    torch.manual_seed(0)
    model = coopnets.wrap("test_resnet", num_classes=3).eval()
    coopnets.save_pretrained(model, tmp_path / "run" / "model")
    out = tmp_path / "d2.pt"
    cli.main(["export", str(tmp_path / "run"), "--depth", "2", "--format", "torchscript",
              "--out", str(out), "--img-size", "64"])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(out))(x), model.forward_depth(x, 2), atol=1e-5, rtol=1e-4)
