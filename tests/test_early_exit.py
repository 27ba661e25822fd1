"""Early exit with compaction equals the same policy simulated on all exits' logits."""
import pytest
import torch

import coopnets
from coopnets.inference.early_exit import EarlyExit, check_thresholds, confidence_score, simulate

FAMILIES = ["test_resnet", "test_vit", "test_convnext", "test_efficientnet"]


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request):
    torch.manual_seed(0)
    model = coopnets.wrap(request.param, num_classes=10).eval()
    x = torch.randn(12, 3, 64, 64)
    with torch.inference_mode():
        all_logits = model.forward_exits(x)
    return model, x, all_logits


def spread_thresholds(all_logits, criterion, quantile):
    """Per-exit thresholds midway between two sorted scores, so a share of samples leaves and none sits on the edge."""
    out = []
    for logits in all_logits[:-1]:
        s = confidence_score(logits, criterion).sort().values
        i = min(int(quantile * len(s)), len(s) - 2)
        mid = float((s[i] + s[i + 1]) / 2)
        out.append(mid if criterion == "confidence" else -mid)
    return out


@pytest.mark.parametrize("criterion,quantile", [("confidence", 0.3), ("confidence", 0.7), ("entropy", 0.5)])
def test_compaction_matches_simulation(setup, criterion, quantile):
    model, x, all_logits = setup
    ee = EarlyExit(model, criterion, spread_thresholds(all_logits, criterion, quantile))
    real, sim = ee(x), ee.simulate(all_logits, x.shape[1:])
    assert torch.equal(real.exit_depths, sim.exit_depths)
    assert torch.equal(real.predictions, sim.predictions)
    torch.testing.assert_close(real.logits, sim.logits, atol=1e-5, rtol=1e-4)
    assert torch.equal(real.flops, sim.flops)
    assert len(set(real.exit_depths.tolist())) > 1, "thresholds should split the batch across depths"


@pytest.mark.parametrize("patience", [1, 2])
def test_patience_matches_simulation(setup, patience):
    model, x, all_logits = setup
    ee = EarlyExit(model, "patience", patience)
    real, sim = ee(x), ee.simulate(all_logits)
    assert torch.equal(real.exit_depths, sim.exit_depths)
    assert torch.equal(real.predictions, sim.predictions)
    assert bool((real.exit_depths >= patience + 1).all())


def test_patience_rule_on_known_logits():
    a, b = torch.tensor([[5.0, 0.0]]), torch.tensor([[0.0, 5.0]])
    assert simulate([a, b, b, a], "patience", 1).exit_depths.tolist() == [3]
    assert simulate([a, a, a, b], "patience", 2).exit_depths.tolist() == [3]
    assert simulate([a, b, a, b], "patience", 1).exit_depths.tolist() == [4]


def test_flops_accounting(setup):
    model, x, _ = setup
    ee = EarlyExit(model, "confidence", 1.0)  # nobody leaves early
    out = ee(x)
    costs = out.depth_flops
    assert costs == sorted(costs) and len(costs) == model.num_depths
    assert out.exit_depths.tolist() == [model.num_depths] * len(x)
    assert out.total_flops == len(x) * costs[-1]
    everyone = EarlyExit(model, "confidence", 0.0)(x)  # everyone leaves at exit 1
    assert everyone.exit_depths.tolist() == [1] * len(x)
    assert everyone.total_flops == len(x) * costs[0]
    assert everyone.flops_saving == pytest.approx(costs[-1] / costs[0])
    torch.testing.assert_close(everyone.logits, model.forward_depth(x, 1), atol=1e-5, rtol=1e-4)


def test_bad_input():
    with pytest.raises(ValueError, match="confidence, entropy, patience"):
        check_thresholds("margin", 0.5, 3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        check_thresholds("confidence", 1.5, 3)
    with pytest.raises(ValueError, match=">= 0"):
        check_thresholds("entropy", -0.1, 3)
    with pytest.raises(ValueError, match="int >= 1"):
        check_thresholds("patience", 0, 3)
    with pytest.raises(ValueError, match="int >= 1"):
        check_thresholds("patience", 1.5, 3)
    with pytest.raises(ValueError, match="exactly 3"):
        check_thresholds("confidence", [0.5, 0.5], 3)


def test_blocks_plan_rejected_and_no_layout_uses_segments():
    with pytest.raises(ValueError, match="plan='exits'"):
        EarlyExit(coopnets.wrap("test_convnext", num_classes=10, plan="blocks"))
    byob = coopnets.wrap("test_byobnet", num_classes=10)
    assert EarlyExit(byob, image_size=(3, 64, 64)).runner((3, 64, 64)).kind == "segments"
    assert byob.depth_plan.runner.kind == "intermediates"  # a forward at one depth stays timm's own
    resnet = coopnets.wrap("test_resnet", num_classes=10)
    assert EarlyExit(resnet).runner((3, 64, 64)) is resnet.depth_plan.runner  # one runner drives everything
    assert resnet.depth_plan.runner.kind == "layout"
