"""FLOPs-budget calibration (MSDNet budgeted batch) and latency-budget depth selection."""
import pytest
import torch

import coopnets
from coopnets.inference.budget import (
    budget_curve, calibrate, depth_for_latency, format_budget_table, geometric_exit_distribution, set_depth_for_budget,
)


@pytest.fixture(scope="module")
def model_and_data():
    torch.manual_seed(0)
    model = coopnets.wrap("test_vit", num_classes=10).eval()
    data = [(torch.randn(16, 3, 64, 64), torch.randint(0, 10, (16,))) for _ in range(3)]
    return model, data


def test_geometric_distribution_meets_target():
    costs = [1.0, 2.0, 4.0, 8.0]
    for target in (1.5, 3.0, 6.0):
        p, q = geometric_exit_distribution(costs, target)
        assert sum(p) == pytest.approx(1.0)
        assert sum(a * c for a, c in zip(p, costs)) == pytest.approx(target, rel=1e-6)
        assert all(b == pytest.approx(a * q) for a, b in zip(p, p[1:]))
    with pytest.raises(ValueError, match="outside"):
        geometric_exit_distribution(costs, 9.0)


@pytest.mark.parametrize("criterion", ["confidence", "entropy"])
def test_calibrate_meets_budget_and_matches_real_run(model_and_data, criterion):
    model, data = model_and_data
    costs = coopnets.EarlyExit(model).depth_flops((3, 64, 64))
    target = 0.6 * costs[0] + 0.4 * costs[-1]
    cal = calibrate(model, data, target_flops=target, criterion=criterion)
    assert len(cal.thresholds) == model.num_depths - 1
    # rounding the geometric quotas to whole samples (48 here) moves the cost a little
    assert cal.expected_flops == pytest.approx(target, rel=0.05)
    assert 0.0 < cal.exit_fractions[0] < 1.0
    x = torch.cat([d[0] for d in data])
    labels = torch.cat([d[1] for d in data])
    real = cal.early_exit(model)(x)
    assert real.total_flops / len(x) == pytest.approx(cal.expected_flops)
    assert (real.predictions == labels).float().mean().item() == pytest.approx(cal.accuracy)


def test_budget_curve_is_monotone(model_and_data):
    model, data = model_and_data
    rows = budget_curve(model, data, flops_ratios=(0.6, 0.8, 1.0))
    spent = [r.expected_flops for r in rows]
    assert spent == sorted(spent)
    assert rows[-1].exit_fractions[-1] == 1.0  # the full budget lets everyone run to the end
    assert format_budget_table(rows).count("\n") == len(rows) + 1


def test_calibrate_rejects_patience(model_and_data):
    model, data = model_and_data
    with pytest.raises(ValueError, match="confidence, entropy"):
        calibrate(model, data, target_flops=1.0, criterion="patience")


def test_depth_for_latency(model_and_data):
    model, _ = model_and_data
    depth, measured = depth_for_latency(model, latency_ms=1e6, input_size=(3, 64, 64), repeats=1, warmup=0)
    assert depth == model.num_depths and len(measured) == 1
    assert set_depth_for_budget(model, latency_ms=1e6, input_size=(3, 64, 64), repeats=1).depth == model.num_depths
    with pytest.raises(ValueError, match="No depth fits 1e-06 ms"):
        set_depth_for_budget(model, latency_ms=1e-6, input_size=(3, 64, 64), repeats=1)
