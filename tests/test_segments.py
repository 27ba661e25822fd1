"""Generic segments: real early exit on backbones without a hand-written stage layout."""
import pytest
import torch

import coopnets
from coopnets.inference.early_exit import EarlyExit, confidence_score
from coopnets.models.runners import segments as seg_mod
from coopnets.models.runners import SegmentRunner, build_segments

# no StageLayout for these: byobnet (FX), nfnet (FX), vit_relpos (torch.export fallback)
FAMILIES = ["test_byobnet", "test_nfnet", "test_vit_relpos"]
SIZE = (3, 64, 64)


def median_thresholds(all_logits):
    out = []
    for logits in all_logits[:-1]:
        s = confidence_score(logits, "confidence").sort().values
        i = len(s) // 2
        out.append(float((s[i - 1] + s[i]) / 2))
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request):
    torch.manual_seed(0)
    model = coopnets.wrap(request.param, num_classes=10).eval()
    size = tuple(model.pretrained_cfg["input_size"]) if model.pretrained_cfg.get("fixed_input_size") else SIZE
    x = torch.randn(8, *size)
    with torch.inference_mode():
        all_logits = model.forward_exits(x)
    return model, x, all_logits


def test_segments_early_exit_matches_simulation(setup):
    model, x, all_logits = setup
    ee = EarlyExit(model, "confidence", median_thresholds(all_logits), image_size=x.shape[1:])
    assert ee.runner(x.shape[1:]).kind == "segments"
    real, sim = ee(x), ee.simulate(all_logits, x.shape[1:])
    assert torch.equal(real.exit_depths, sim.exit_depths)
    torch.testing.assert_close(real.logits, sim.logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(real.flops, sim.flops)
    assert len(set(real.exit_depths.tolist())) > 1
    costs = real.depth_flops
    assert all(a < b for a, b in zip(costs, costs[1:]))


def test_compaction_reduces_work(setup):
    """Later segments see only the samples still running."""
    model, x, all_logits = setup
    ee = EarlyExit(model, "confidence", median_thresholds(all_logits), image_size=x.shape[1:])
    runner = ee.runner(x.shape[1:])
    ee.depth_flops(x.shape[1:])  # the cost measurement runs every segment once, before the hooks
    seen = []
    hooks = [s.register_forward_pre_hook(lambda mod, args, k=k: seen.append((k, _batch(args))))
             for k, s in enumerate(runner.segments)]
    try:
        out = ee(x)
    finally:
        for h in hooks:
            h.remove()
    for k, n in seen:
        assert n == int((out.exit_depths > k).sum()), (k, n)
    assert seen[-1][1] < len(x) or len(seen) < runner.num_exits + 1


def _batch(args):
    return next(a.shape[0] for a in args if isinstance(a, torch.Tensor) and a.ndim >= 2 and a.shape[0] <= 8)


def test_everyone_leaves_at_exit_1_runs_only_segment_1():
    model = coopnets.wrap("test_byobnet", num_classes=10).eval()
    x = torch.randn(4, *SIZE)
    ee = EarlyExit(model, "confidence", 0.0, image_size=SIZE)
    ee.depth_flops(SIZE)
    calls = []
    for k, s in enumerate(ee.runner(SIZE).segments):
        s.register_forward_pre_hook(lambda mod, args, k=k: calls.append(k))
    out = ee(x)
    assert calls == [0] and out.exit_depths.tolist() == [1] * 4
    torch.testing.assert_close(out.logits, model.forward_depth(x, 1), atol=1e-4, rtol=1e-4)


def test_runner_features_equal_forward_intermediates():
    model = coopnets.wrap("test_efficientnet_gn", num_classes=10).eval()
    runner = build_segments(model.backbone, model.depth_plan.config.exit_indices, SIZE)
    x = torch.randn(3, *SIZE)
    with torch.no_grad():
        final, feats = model.backbone.forward_intermediates(x, indices=model.depth_plan.config.exit_indices, stop_early=False)
        env = runner.start(x)
        for k, want in enumerate(feats):
            env, got = runner.advance(env, k)
            torch.testing.assert_close(got, want)
        torch.testing.assert_close(runner.finish(env), model.backbone.forward_head(final))


def test_unsplittable_backbone_says_why(monkeypatch):
    def refuse(backbone, indices, size, name):
        raise ValueError(f"{name} cannot run segment by segment: torch.fx cannot trace it.")

    monkeypatch.setattr(seg_mod, "_trace", refuse)
    with pytest.raises(ValueError, match="no hand-written stage layout .* cannot run segment by segment") as info:
        EarlyExit(coopnets.wrap("test_byobnet", num_classes=10), image_size=SIZE)
    assert "Use plan='exits'" not in str(info.value)


def test_segments_are_built_once_per_model_and_size():
    """A second EarlyExit, calibrate's cost table and the plan share one runner (and its cached FLOPs)."""
    model = coopnets.wrap("test_byobnet", num_classes=10).eval()
    first = EarlyExit(model, image_size=SIZE)
    costs = first.depth_flops(SIZE)
    calls = []
    original = seg_mod._trace
    try:
        seg_mod._trace = lambda *a: calls.append(a) or original(*a)
        second = EarlyExit(model, "entropy", 0.5, image_size=SIZE)
        assert second.runner(SIZE) is first.runner(SIZE) is model.depth_plan.early_exit_runner(SIZE)
        assert isinstance(second.runner(SIZE), SegmentRunner)
        assert coopnets.inference.budget.depth_costs(model, SIZE) == costs
    finally:
        seg_mod._trace = original
    assert calls == []
