"""Budgets in milliseconds measured on this machine, costs that charge every exit head a sample passed, and the
``--zoo`` run of benchmarks/latency.py. No assertion reads a wall clock except lower bounds set by sleeps."""
import json
import time

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import coopnets
import latency  # benchmarks/ is on pytest's pythonpath (pyproject.toml)
from coopnets.inference.budget import budget_curve, calibrate, format_budget_table, set_depth_for_budget
from coopnets.inference.early_exit import EarlyExit

SIZE = (3, 32, 32)
SLEEP_S = 0.1  # an exit head's sleep: far above what the tiny backbone takes at batch 2, however busy


def tiny() -> coopnets.DepthAdaptiveModel:
    return coopnets.wrap("test_resnet", num_classes=3).eval()


def data(batches: int = 4, n: int = 16):
    return [(torch.randn(n, *SIZE), torch.randint(0, 3, (n,))) for _ in range(batches)]


def count_flops(fn, *args) -> int:
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        fn(*args)
    return int(counter.get_total_flops())


class LinearHead(nn.Module):
    """An exit head of known FLOPs: average pool (not counted) + a linear layer, 2 x channels x classes."""

    def __init__(self, channels: int, classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean((2, 3)))


class SlowHead(nn.Module):
    """An exit head that takes at least SLEEP_S seconds (a sleep is never shorter, however busy the machine)."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(SLEEP_S)
        return self.head(x)


def test_flops_of_leaving_at_k_charge_every_head_passed():
    model = tiny()
    runner = model.depth_plan.early_exit_runner(SIZE)
    x = torch.zeros(1, *SIZE)
    num_exits = model.num_depths - 1
    with torch.inference_mode():
        maps = [runner.map_at(x, k) for k in range(num_exits)]
    for k, fmap in enumerate(maps):
        model.exits[k] = LinearHead(fmap.shape[1], 3).eval()
    heads = [2 * fmap.shape[1] * 3 for fmap in maps]  # known: one linear layer per head
    assert [count_flops(model.exits[k], m) for k, m in enumerate(maps)] == heads
    backbone_to = [count_flops(runner.map_at, x, k) for k in range(num_exits)]
    costs = EarlyExit(model).depth_flops(SIZE)
    assert costs == [backbone_to[k] + sum(heads[: k + 1]) for k in range(num_exits)] + \
        [count_flops(model.backbone, x) + sum(heads)]
    # a fixed-depth forward pays its own head only; leaving early at k also paid heads 1..k-1
    for d in range(1, model.num_depths):
        assert costs[d - 1] - count_flops(model.forward_depth, x, d) == sum(heads[: d - 1])


def test_cached_flops_follow_a_head_change():
    model = tiny()
    before = EarlyExit(model).depth_flops(SIZE)
    model.reset_classifier(1000)
    after = EarlyExit(model).depth_flops(SIZE)
    assert after != before
    assert after == EarlyExit(coopnets.wrap("test_resnet", num_classes=1000).eval()).depth_flops(SIZE)


def test_target_ms_meets_its_budget_on_the_costs_it_measured(one_torch_thread):
    model = tiny()
    num_exits = model.num_depths - 1
    for k in range(num_exits):
        model.exits[k] = SlowHead(model.exits[k])
    batches = data()
    target = 2 * SLEEP_S * 1e3  # above depth 1 (one head), below full depth (every head)
    cal = calibrate(model, batches, target_ms=target, batch_size=2, repeats=3)
    assert (cal.unit, cal.batch_size, cal.target) == ("ms", 2, target)
    assert len(cal.depth_costs) == model.num_depths and cal.depth_costs == sorted(cal.depth_costs)
    # leaving at depth d paid every exit head 1..d, each at least one sleep
    assert all(c >= min(d, num_exits) * SLEEP_S * 1e3 for d, c in enumerate(cal.depth_costs, 1))
    assert cal.expected_cost == pytest.approx(sum(f * c for f, c in zip(cal.exit_fractions, cal.depth_costs)))
    assert cal.expected_cost == pytest.approx(target, rel=0.05)  # quotas round to whole samples (64 here)
    assert 0.0 < cal.exit_fractions[0] < 1.0
    real = cal.early_exit(model)(torch.cat([x for x, _ in batches]))
    assert real.exit_fractions() == pytest.approx(cal.exit_fractions)
    assert real.total_flops / 64 == pytest.approx(cal.expected_flops)


def test_budget_curve_in_ms_measures_once(one_torch_thread):
    rows = budget_curve(tiny(), data(2, 8), ms_ratios=(0.9, 1.0), batch_size=8, repeats=2)
    assert [r.unit for r in rows] == ["ms", "ms"] and rows[0].depth_costs == rows[1].depth_costs
    assert rows[-1].exit_fractions[-1] == 1.0
    assert format_budget_table(rows).startswith("| budget (ms) | expected ms |")


def test_leave_at_is_everyone_forced_out_at_that_depth():
    model = tiny()
    x = torch.randn(6, *SIZE)
    probe = EarlyExit(model)
    num_exits = model.num_depths - 1
    for d in range(1, model.num_depths + 1):
        forced = EarlyExit(model, "confidence", [1.0] * min(d - 1, num_exits) + [0.0] * (num_exits - d + 1))(x)
        assert forced.exit_depths.tolist() == [d] * len(x)
        torch.testing.assert_close(probe.leave_at(x, d), forced.logits, atol=1e-5, rtol=1e-4)
    steps = {}
    probe.leave_at(x, model.num_depths, timings=steps)
    assert list(steps) == ["start", *(f"{s} {k}" for k in range(num_exits) for s in ("advance", "head")), "finish"]
    assert len(probe.step_latency(SIZE, batch_size=2, repeats=1, warmup=0)) == len(probe.step_flops(SIZE))


@pytest.mark.parametrize("call,match", [
    (lambda m, d: calibrate(m, d), "exactly one budget.*neither"),
    (lambda m, d: calibrate(m, d, target_flops=1e6, target_ms=5.0), "exactly one budget.*both"),
    (lambda m, d: calibrate(m, d, target_ms=-1.0), r"target_ms must be a number > 0"),
    (lambda m, d: calibrate(m, d, target_ms="fast"), r"target_ms must be a number > 0"),
    (lambda m, d: calibrate(m, d, target_ms=1e9, batch_size=4, repeats=1),
     r"target_ms=1e\+09 is outside .*: \[.* \(everyone leaves at depth 1\), .* \(full depth\)\]"),
    (lambda m, d: calibrate(m, d, target_ms=5.0, batch_size=0), "batch_size must be an int >= 1"),
    (lambda m, d: budget_curve(m, d, flops_ratios=(0.5,), ms_ratios=(0.5,)), "not both"),
    (lambda m, d: budget_curve(m, d, ms_ratios=(0.0,)), "ms_ratios must be numbers > 0"),
    (lambda m, d: EarlyExit(m).leave_at(d[0][0], 0), r"depth must be an int in \[1, 4\]"),
    (lambda m, d: set_depth_for_budget(m, latency_ms=0), "latency_ms must be a number > 0"),
])
def test_bad_budgets_are_one_line_errors(call, match):
    with pytest.raises(ValueError, match=match) as info:
        call(tiny(), data(1, 4))
    assert "\n" not in str(info.value)


def test_latency_zoo_run_writes_its_tables(tmp_path, monkeypatch, one_torch_thread):
    monkeypatch.setitem(latency.TARGETS, "share_over_flops", -1.0)  # every depth misses: the per-step figures run
    threads = torch.get_num_threads()
    argv = ["--zoo", "--quick", "--models", "coop_test_resnet", "--early-exit-models", "coop_test_resnet",
            "--img-size", "32", "--early-exit-img-size", "32", "--early-exit-batch", "8", "--batch-sizes", "1", "2",
            "--threads", "1", "--repeats", "2", "--warmup", "0", "--out", str(tmp_path)]
    assert latency.main(argv) == 0
    assert torch.get_num_threads() == threads
    assert all((tmp_path / f"latency_zoo.{ext}").is_file() for ext in ("md", "json", "png"))
    md = (tmp_path / "latency_zoo.md").read_text()
    for head in ("| model | depth | FLOPs share | limit | b1 t1 | b2 t1 | target |",
                 "| step | MFLOPs | act MB | weights MB | FLOPs/B (b1) | FLOPs/B (b2) | b1 t1 | b2 t1 |",
                 "| model | batch | exit fractions | FLOPs saving | fair bound | full ms | early-exit ms | speed-up |",
                 "| model | batch | budget ms | expected ms | early-exit ms | exit fractions |"):
        assert head in md
    assert "coop_test_resnet depth 1 (b1 t1): latency share" in md and "**missed**" in md
    results = json.loads((tmp_path / "latency_zoo.json").read_text())
    entry = results["zoo"]["models"][0]
    assert [(r["batch"], r["threads"]) for r in entry["runs"]] == [(1, 1), (2, 1)]
    assert all(len(r["share"]) == entry["num_depths"] - 1 and r["missed"] for r in entry["runs"])
    assert len(entry["stages"]["steps"]) == len(entry["stages"]["flops"]) == 2 * entry["num_depths"]
    e = results["early_exit"][0]
    assert e["fair_bound"] > 0 and e["vs_bound"] > 0 and len(e["leave_ms"]) == entry["num_depths"]
    ms = e["ms_budget"]
    assert ms["depth_costs_ms"][0] <= ms["expected_ms"] <= ms["depth_costs_ms"][-1]
    again = tmp_path / "again"
    assert latency.main(["--from-json", str(tmp_path / "latency_zoo.json"), "--out", str(again)]) == 0
    assert (again / "latency_zoo.md").read_text() == md
