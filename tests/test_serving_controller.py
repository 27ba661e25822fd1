"""The serving depth controller: decisions on a latency table, online adaptation, runs, threads, the batcher."""
from __future__ import annotations

import threading
import time

import pytest
import torch

import coopnets
from coopnets.serving import DepthController, DynamicBatcher, LatencyModel, ServingOption

ACC = [0.6, 0.7, 0.8, 0.9]
SIZE = (3, 32, 32)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here on one intra-op thread (``one_torch_thread`` in conftest.py)."""


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return coopnets.wrap("test_resnet", num_classes=10).eval()


class FrozenLatency(LatencyModel):
    """A latency table that ignores measurements, so decisions are deterministic."""

    def observe(self, option_name, batch_size, measured_ms):
        pass


def depth_options(acc=ACC):
    return [ServingOption(f"depth{d}", d, a) for d, a in enumerate(acc, 1)]


def table(options, scale=1.0):
    """Depth d takes 4 * d * scale ms at batch size 8 and d * scale ms at batch size 1."""
    return {o.name: {1: scale * o.depth, 8: 4.0 * scale * o.depth} for o in options}


def make_controller(model, latency_cls=LatencyModel, slo_ms=20.0, scale=1.0, **kw):
    opts = depth_options()
    return DepthController(model, opts, latency_cls(table(opts, scale)), slo_ms=slo_ms * scale, **kw)


# --- decisions on a fake latency table ------------------------------------------------
@pytest.mark.parametrize("waited, expected", [([0.0, 3.0], 4), ([7.0, 2.0], 3), ([11.0], 2), ([15.0], 1)])
def test_picks_the_deepest_depth_that_fits_the_slack(model, waited, expected):
    ctl = make_controller(model)
    d = ctl.decide(8, waited * 4)
    assert d.option.depth == expected
    assert d.slack_ms == pytest.approx(20.0 - max(waited))
    assert d.fits and d.predicted_ms == pytest.approx(4.0 * expected)
    assert ctl.stats()["misses"] == 0


def test_nothing_fits_runs_the_shallowest_and_counts_a_miss(model):
    ctl = make_controller(model)
    d = ctl.decide(8, [17.0] * 8)  # 3 ms left, depth 1 needs 4
    assert d.option.depth == 1 and not d.fits
    ctl.decide(8, [0.0] * 8)
    s = ctl.stats()
    assert s["misses"] == 1 and s["decisions"] == 2 and s["options"] == {"depth1": 1, "depth4": 1}


def test_equal_accuracy_prefers_the_faster_option(model):
    opts = [ServingOption("slow", 2, 0.8), ServingOption("fast", 1, 0.8), ServingOption("deep", 3, 0.9)]
    lat = LatencyModel({"slow": {8: 10.0}, "fast": {8: 5.0}, "deep": {8: 30.0}})
    assert DepthController(model, opts, lat, slo_ms=20.0).decide(8, [0.0]).option.name == "fast"


def test_backlog_look_ahead_leaves_time_for_the_next_batch(model):
    ctl = make_controller(model)
    assert ctl.decide(8, [0.0] * 8).option.depth == 4
    # the 8 queued behind have waited 6 ms: after this batch they need depth 1's 4 ms within 14
    assert ctl.decide(8, [0.0] * 8, backlog_waited_ms=[6.0] * 8).option.depth == 2


def test_reserve_next_leaves_time_for_requests_arriving_during_the_run(model):
    # 18 ms of slack: depth 4 (16 ms) fits, but a request arriving just after it starts would
    # then have 2 ms left for its own batch (depth 1 needs 4): reserve it, run depth 3 (12 ms)
    assert make_controller(model, slo_ms=18.0).decide(8, [0.0] * 8).option.depth == 3
    assert make_controller(model, slo_ms=18.0, reserve_next=False).decide(8, [0.0] * 8).option.depth == 4
    # no room for both: the look-ahead gives way, this batch still gets what fits it
    assert make_controller(model, slo_ms=18.0).decide(8, [8.0] * 8).option.depth == 2


def test_unseen_batch_sizes_interpolate_and_extrapolate():
    lat = LatencyModel({"a": {1: 2.0, 8: 9.0}})
    assert lat.predict("a", 4) == pytest.approx(5.0)
    assert lat.predict("a", 16) == pytest.approx(17.0)
    for _ in range(40):  # batch size 8 runs 2x its prior, batch size 2 as profiled
        lat.observe("a", 8, 18.0)
        lat.observe("a", 2, lat.prior("a", 2))

    def ratio(n):
        return lat.predict("a", n) / lat.prior("a", n)

    assert ratio(2) == pytest.approx(1.0, rel=0.05) and ratio(8) == pytest.approx(2.0, rel=0.05)
    assert 1.2 < ratio(5) < 1.7 and ratio(16) == pytest.approx(ratio(8))  # between neighbours; beyond: the last


# --- online adaptation ------------------------------------------------------------------
def test_contention_moves_shallower_within_a_few_batches_and_back_after(model):
    ctl = make_controller(model, slo_ms=22.0)
    lat = ctl.latency
    chosen = []
    for i in range(60):
        slowdown = 3.0 if 5 <= i < 30 else 1.0
        d = ctl.decide(8, [4.0] * 8)  # 18 ms of slack: depth 4 (16 ms) normally, depth 1 (12 ms) at 3x
        chosen.append(d.option.depth)
        lat.observe(d.option.name, 8, slowdown * lat.prior(d.option.name, 8))
    assert chosen[:6] == [4] * 6
    assert chosen[8:30] == [1] * 22  # learned within 3 batches of the step
    assert lat.global_factor < 1.1 and chosen[-10:] == [4] * 10  # learned back down
    back = chosen.index(4, 30)
    assert back - 30 <= 20


def test_learning_from_one_option_moves_every_option():
    lat = LatencyModel({"depth1": {8: 4.0}, "depth4": {8: 16.0}})
    for _ in range(6):
        lat.observe("depth1", 8, 12.0)
    assert lat.predict("depth4", 8) > 2.7 * 16.0
    for _ in range(15):
        lat.observe("depth1", 8, 4.0)
    assert lat.predict("depth4", 8) == pytest.approx(16.0, rel=0.1)


def test_margin_grows_with_noise():
    lat = LatencyModel({"a": {8: 10.0}})
    assert lat.margin == 1.0
    for i in range(64):
        lat.observe("a", 8, 10.0 * (1.5 if i % 4 == 0 else 0.9))
    assert lat.margin > 1.2 and lat.upper("a", 8) > lat.predict("a", 8)


# --- running ----------------------------------------------------------------------------
def test_run_returns_forward_depth_logits_of_the_decided_depth(model):
    ctl = make_controller(model, FrozenLatency)
    x = torch.randn(8, *SIZE)
    for waited, depth in (([0.0], 4), ([7.0], 3), ([11.0], 2), ([15.0], 1)):
        logits, depths, decision = ctl.run(x, waited * 8)
        assert decision.option.depth == depth and depths.tolist() == [depth] * 8
        with torch.inference_mode():
            torch.testing.assert_close(logits, model.forward_depth(x, depth))
        assert decision.run_ms > 0
    assert model.depth == model.num_depths  # never set_depth
    s = ctl.stats()
    assert s["runs"] == 4 and s["depth_histogram"] == {1: 8, 2: 8, 3: 8, 4: 8}


def test_run_feeds_the_latency_model(model):
    ctl = make_controller(model)
    ctl.run(torch.randn(4, *SIZE), [0.0] * 4)
    assert ctl.latency.observations == 1


def test_decision_costs_under_one_percent_of_a_batch(model):
    ctl = DepthController.for_model(model, slo_ms=1e4, accuracies=ACC, input_size=(3, 64, 64), max_batch_size=8,
                                    repeats=1)
    x = torch.randn(8, 3, 64, 64)
    for _ in range(30):
        ctl.run(x, [0.0] * 8)
    s = ctl.stats()
    assert s["decide_overhead"] < 0.01, s


def test_concurrent_callers_each_get_their_own_depth(model):
    ctl = make_controller(model, FrozenLatency, scale=100.0)  # 100 ms between options: waiting on the lock is noise
    waits = {4: 0.0, 3: 700.0, 2: 1100.0, 1: 1500.0}
    errors, results = [], {}

    def caller(depth):
        torch.manual_seed(depth)
        try:
            for _ in range(5):
                x = torch.randn(8, *SIZE)
                logits, depths, decision = ctl.run(x, [waits[depth]] * 8)
                chosen = decision.option.depth  # waiting on the lock counts as waiting: under load it may be shallower
                with torch.inference_mode():
                    expected = model.forward_depth(x, chosen)
                results.setdefault(depth, []).append(chosen)
                assert depths.tolist() == [chosen] * 8
                torch.testing.assert_close(logits, expected)
        except BaseException as e:  # surfaced in the main thread
            errors.append(e)

    threads = [threading.Thread(target=caller, args=(d,)) for d in waits]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert all(max(chosen) <= d for d, chosen in results.items())  # never deeper than its own slack allows
    assert len({c for chosen in results.values() for c in chosen}) > 1  # the threads really ran different depths
    assert model.depth == model.num_depths


def test_fixed_depth_baseline(model):
    ctl = DepthController.for_model(model, slo_ms=1.0, depth=2, input_size=SIZE, max_batch_size=2, repeats=1)
    assert [o.name for o in ctl.options] == ["depth2"]
    _, depths, decision = ctl.run(torch.randn(2, *SIZE), [0.0, 0.0])
    assert depths.tolist() == [2, 2] and decision.option.name == "depth2"


def test_calibration_adds_early_exit_options_that_run_early_exit(model):
    data = [(torch.randn(16, *SIZE), torch.randint(0, 10, (16,))) for _ in range(2)]
    ctl = DepthController.for_model(model, slo_ms=1e4, calibration=data, max_batch_size=4, repeats=1)
    ee = [o for o in ctl.options if o.early_exit]
    assert ee and all(0.0 <= o.accuracy <= 1.0 and len(o.thresholds) == model.num_depths - 1 for o in ee)
    assert {o.name for o in ctl.options} <= set(ctl.latency.options)
    fixed = DepthController(model, ctl.options, ctl.latency, slo_ms=1e4, fixed=ee[0].name)
    x = data[0][0][:4]
    logits, depths, decision = fixed.run(x, [0.0] * 4)
    ref = coopnets.EarlyExit(model, "confidence", list(ee[0].thresholds))(x)
    assert decision.option is ee[0]
    torch.testing.assert_close(logits, ref.logits)
    assert depths.tolist() == ref.exit_depths.tolist()


# --- accuracies from a checkpoint ------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_accuracies_come_from_the_checkpoints_per_depth_table(model, tmp_path):
    accs = [0.5, 0.62, 0.7, 0.81]
    rows = [{"depth": d, "accuracy": a, "batch_size": 1, "device": "cpu"} for d, a in enumerate(accs, 1)]
    path = coopnets.save_pretrained(model, tmp_path / "ckpt", per_depth=rows)
    loaded = coopnets.create_model(f"local-dir:{path}", pretrained=True)
    ctl = DepthController.for_model(loaded, slo_ms=50.0, accuracies=(), input_size=SIZE, max_batch_size=2, repeats=1)
    assert [(o.name, o.accuracy) for o in ctl.options] == [("depth1", 0.5), ("depth2", 0.62), ("depth3", 0.7),
                                                           ("depth4", 0.81)]
    partial = coopnets.save_pretrained(model, tmp_path / "partial", per_depth=rows[:2])
    with pytest.raises(ValueError, match=r"depth\(s\) \[3, 4\].*accuracies="):
        DepthController.for_model(coopnets.create_model(f"local-dir:{partial}", pretrained=True), slo_ms=50.0)


def test_no_recorded_table_asks_for_accuracies(model):
    with pytest.raises(ValueError, match="accuracies="):
        DepthController.for_model(model, slo_ms=50.0)
    with pytest.raises(ValueError, match="one value per depth"):
        DepthController.for_model(model, slo_ms=50.0, accuracies=[0.5])


# --- the batcher --------------------------------------------------------------------------------
def test_batcher_resolves_every_request_in_batches_of_at_most_max(model):
    ctl = make_controller(model, FrozenLatency, slo_ms=1e5)
    batcher = DynamicBatcher(ctl, max_batch_size=8, batch_wait_timeout_s=0.0, start=False)
    xs = [torch.randn(*SIZE) for _ in range(20)]
    futures = [batcher.submit(x) for x in xs]
    batcher.start()
    results = [f.result(timeout=60) for f in futures]
    batcher.close()
    assert batcher.stats()["batch_sizes"] == {8: 2, 4: 1}
    with torch.inference_mode():
        for x, r in zip(xs, results):  # each answer is its own request's, in order
            torch.testing.assert_close(r.logits, model.forward_depth(x[None], r.depth)[0], rtol=1e-4, atol=1e-4)
    assert batcher.stats()["requests"] == 20 and batcher.stats()["slo_attainment"] == 1.0


def test_batcher_measures_latency_from_the_arrival_timestamp(model):
    ctl = make_controller(model, FrozenLatency, slo_ms=1000.0)
    with DynamicBatcher(ctl, max_batch_size=4) as batcher:
        before = time.perf_counter()
        r = batcher(torch.randn(*SIZE), arrival=before - 0.5, timeout=60)
        after = time.perf_counter()
    assert 500.0 <= r.latency_ms <= (after - before + 0.5) * 1e3
    assert r.decision.slack_ms <= 500.0 and r.on_time


def test_batcher_waits_for_a_fuller_batch_and_survives_errors(model):
    ctl = make_controller(model, FrozenLatency, slo_ms=1e5)
    with DynamicBatcher(ctl, max_batch_size=4, batch_wait_timeout_s=0.3) as batcher:
        futures = [batcher.submit(torch.randn(*SIZE)) for _ in range(3)]
        [f.result(timeout=60) for f in futures]
        assert batcher.stats()["batch_sizes"] == {3: 1}
        bad = batcher.submit(torch.randn(3, 16, 16))
        good = batcher.submit(torch.randn(*SIZE))  # same batch as the bad one: both fail
        with pytest.raises(RuntimeError):
            bad.result(timeout=60)
        assert good.exception(timeout=60) is not None
        assert batcher(torch.randn(*SIZE), timeout=60).logits.shape == (10,)
    assert batcher.stats()["errors"] == 2


def test_the_chosen_option_keeps_up_with_the_arrival_rate(model):
    """With plenty of slack per batch, a deep option whose throughput is below the arrival rate would let the
    queue grow without bound: the controller takes the most accurate option that keeps up instead."""
    ctl = make_controller(model, FrozenLatency, scale=10.0)
    assert ctl.decide(8, [0.0] * 8).option.depth == model.num_depths  # no arrivals reported: no constraint
    capacity = {o.name: ctl._capacity(o) for o in ctl.options}
    deep, next_deep = capacity[f"depth{model.num_depths}"], capacity[f"depth{model.num_depths - 1}"]
    rate = (deep + next_deep) / 2 / 1.15  # more than full depth can serve, less than the next one
    now = time.perf_counter()
    for i in range(int(rate * ctl.arrivals.window_s)):
        ctl.observe_arrival(now - i / rate)
    decision = ctl.decide(8, [0.0] * 8)
    assert decision.option.depth == model.num_depths - 1 and decision.fits
    for _ in range(int(rate * ctl.arrivals.window_s) * 100):  # far more than anything can serve: the most capable
        ctl.observe_arrival()
    assert ctl.decide(8, [0.0] * 8).option == max(ctl.options, key=ctl._capacity)
