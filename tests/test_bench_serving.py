"""``benchmarks/serving.py``: the open-loop scheduler, the metrics on known numbers, and a tiny in-process run.

The generic pieces (schedule, open loop, metrics, contention) are :mod:`coopnets.bench`'s, shared
with ``coopnets bench serve`` (``tests/test_bench_serve.py`` tests them over HTTP); here they
run with callback submits into in-process servers, as the benchmark's in-process mode does.
The HTTP mode (``coopnets serve`` subprocesses) is not run here: it needs Ray and about a
minute per server; ``tests/test_serve_http.py`` covers the server itself.
"""
from __future__ import annotations

import json
import math
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import coopnets
from coopnets.bench import latencies_ms, percentile, poisson_schedule, recovery_time, run_open_loop, summarize, window_p99
from coopnets.bench.images import digits_split_indices
from coopnets.train.data import digits_splits

import serving as bench

DURATIONS = dict.fromkeys(bench.PHASES, 0.4)


# --- the schedule -----------------------------------------------------------------------------
def test_schedule_is_seeded_poisson_per_phase():
    phases = bench.build_phases(300, DURATIONS, burst_factor=3.0, warmup_s=0.2)
    a, b = poisson_schedule(phases, 50, seed=3), poisson_schedule(phases, 50, seed=3)
    assert np.array_equal(a.times, b.times) and np.array_equal(a.item, b.item)
    assert not np.array_equal(a.times[:20], poisson_schedule(phases, 50, seed=4).times[:20])
    assert np.all(np.diff(a.times) > 0) and a.times[0] >= 0 and a.times[-1] < phases[-1].end
    counts = {p.name: int((a.phase == i).sum()) for i, p in enumerate(phases)}
    assert counts["burst"] > 2 * counts["quiet"]  # 360 expected vs 120
    for i, p in enumerate(phases):  # every arrival lies in its own phase
        t = a.times[a.phase == i]
        assert np.all((t >= p.start) & (t < p.end))
    # a phase's arrivals do not depend on another phase's rate
    other = bench.build_phases(300, {**DURATIONS, "burst": 0.4}, burst_factor=5.0, warmup_s=0.2)
    c = poisson_schedule(other, 50, seed=3)
    for i in (0, 1, 3, 4):  # warm-up, quiet, contention, recovery
        assert np.array_equal(c.times[c.phase == i], a.times[a.phase == i])


class FakeServer:
    """One worker thread that answers requests in arrival order, ``service_s`` each (a real queue)."""

    def __init__(self, service_s: float) -> None:
        self.service_s = service_s
        self.queue: list = []
        self.cond = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self.work, daemon=True)
        self.thread.start()

    def submit(self, i, scheduled, done):
        with self.cond:
            self.queue.append(done)
            self.cond.notify()

    def work(self):
        while True:
            with self.cond:
                while not self.queue and not self.closed:
                    self.cond.wait()
                if not self.queue:
                    return
                done = self.queue.pop(0)
            time.sleep(self.service_s)
            done({"pred": 1, "depth": 1})

    def close(self):
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join(10)


def test_open_loop_keeps_the_schedule_and_counts_latency_from_it():
    times = np.arange(60) * 0.005  # 200 requests/s for 0.3 s
    fast, slow = FakeServer(0.0), FakeServer(0.010)  # the slow one serves 100 requests/s
    try:
        out_fast, _ = run_open_loop(times, fast.submit, drain_s=5)
        out_slow, _ = run_open_loop(times, slow.submit, drain_s=5)
    finally:
        fast.close()
        slow.close()
    for out in (out_fast, out_slow):  # sends follow the schedule, however slow the answers
        lag = np.array([o.sent for o in out]) - times
        assert np.median(lag) < 0.01 and np.all(lag > -1e-3)
    lat_fast = latencies_ms(times, out_fast)
    lat_slow = latencies_ms(times, out_slow)
    assert np.all(np.isfinite(lat_slow)) and np.all(lat_slow >= 10.0 - 0.5)
    # overload: the queue grows, so latency from the scheduled arrival grows (about 5 ms per request)
    assert lat_slow[-10:].mean() > lat_slow[:10].mean() + 150
    assert np.median(lat_fast) < 20


def test_a_late_sender_is_charged_to_the_requests():
    """A submit that blocks (a closed-loop client would) makes the sender late: the lag is in the latency."""
    times = np.arange(30) * 0.002

    def blocking(i, scheduled, done):
        time.sleep(0.008)
        done({"pred": 0, "depth": 1})

    out, _ = run_open_loop(times, blocking, drain_s=5)
    lat = latencies_ms(times, out)
    assert lat[-1] > lat[0] + 100  # 30 x 6 ms behind by the end, though each answer took 8 ms


def test_unanswered_requests_count_as_late_and_drain_is_bounded():
    times = np.array([0.0, 0.01])

    def only_first(i, scheduled, done):
        if i == 0:
            done({"pred": 3, "depth": 2})

    start = time.perf_counter()
    out, _ = run_open_loop(times, only_first, drain_s=0.3)
    assert time.perf_counter() - start < 3
    lat = latencies_ms(times, out)
    assert math.isfinite(lat[0]) and math.isinf(lat[1])
    s = summarize(lat, [True, True], slo_ms=1e4, depths=[o.depth for o in out])
    assert s["attainment"] == 0.5 and s["effective_accuracy"] == 0.5 and s["p99_ms"] == math.inf


def test_events_run_at_their_times():
    seen = []
    t0 = time.perf_counter()
    run_open_loop([0.0], lambda i, t, done: done({}), events=[(0.2, lambda: seen.append(time.perf_counter()))],
                        drain_s=2, lead_s=0.0)
    assert len(seen) == 1 and 0.15 < seen[0] - t0 < 1.0


# --- metrics ----------------------------------------------------------------------------------
def test_metrics_on_known_numbers():
    lat = [10.0, 50.0, 99.0, 100.0, 101.0, 500.0, math.inf, 20.0]
    correct = [True, True, False, True, True, True, True, False]
    s = summarize(lat, correct, slo_ms=100.0, depths=[1, 2, 2, 3, 3, 3, 0, 1])
    assert s["requests"] == 8 and s["answered"] == 7
    assert s["attainment"] == 5 / 8  # 10, 50, 99, 100 (<= SLO), 20
    assert s["effective_accuracy"] == 3 / 8  # on time and correct: 10, 50, 100
    assert s["accuracy"] == 5 / 7
    assert s["p50_ms"] == 99.0 and s["p99_ms"] == math.inf
    assert s["depth_histogram"] == {1: 2, 2: 2, 3: 3}
    assert percentile(list(range(1, 201)), 0.99) == 198
    assert percentile([], 0.5) != percentile([], 0.5)  # NaN

    t = [0.2, 0.4, 0.6, 1.5, 2.2, 2.4, 3.9]
    w = window_p99(t, [300, 20, 30, 250, 40, 50, 60], start=0.0, end=4.0)
    assert [(x["start"], x["n"], x["p99_ms"]) for x in w][:3] == [(0.0, 3, 300), (1.0, 1, 250), (2.0, 2, 50)]
    assert w[3]["n"] == 1
    assert recovery_time(w, slo_ms=100, step=0.0) == 2.0
    assert recovery_time(w[2:], slo_ms=100, step=2.0) == 0.0
    assert recovery_time(window_p99([0.5, 1.5], [10, 200], 0, 2), 100, 0.0) == math.inf
    assert recovery_time(window_p99([0.5, 2.5], [200, 20], 0, 3), 100, 0.0) == 1.0  # empty window skipped

    d1 = SimpleNamespace(decide_ms=0.02, run_ms=10.0, batch_size=4)
    d2 = SimpleNamespace(decide_ms=0.04, run_ms=30.0, batch_size=8)
    o = bench.decision_overhead([d1, d1, d2, None, d2])
    assert o["batches"] == 2 and o["overhead"] == pytest.approx(0.06 / 40) and o["mean_batch_size"] == 6

    lat_ratios = {1: {"full_over_depth1": {"median": 2.5}}, 8: {"full_over_depth1": {"median": 1.9}}}
    assert not bench.check_depths([0.80, 0.99], lat_ratios)["met"]  # 1.9x at batch 8
    assert bench.check_depths([0.80, 0.99], {1: lat_ratios[1]})["met"]
    assert not bench.check_depths([0.97, 0.99], {1: lat_ratios[1]})["met"]  # 2 points


def test_targets_are_computed_from_the_results():
    def phases(att, eff, acc=0.9, overhead=0.001):
        return {n: {"attainment": att, "effective_accuracy": eff, "accuracy": acc, "overhead": overhead} for n in bench.PHASES}

    steps_ok = {"quiet->burst": {"recovery_s": 1.0}}
    modes = {"inprocess": {"policies": {
        "depth1": {"phases": phases(1.0, 0.80, 0.80), "steps": steps_ok},
        "depth2": {"phases": {**phases(1.0, 0.95, 0.95), "burst": {"attainment": 0.3, "effective_accuracy": 0.3,
                                                                  "accuracy": 0.95}}, "steps": steps_ok},
        "controller": {"phases": phases(0.995, 0.94, 0.945), "steps": {"quiet->burst": {"recovery_s": math.inf}}},
    }}}
    rows = {r["target"]: r for r in bench.evaluate_targets(modes, num_depths=2, slo_ms=100)
            if r["policy"] in ("controller", "depth2")}
    assert rows["load: full depth attains < 50 % in the burst"]["met"]
    assert rows["SLO attainment >= 99 % in every phase"]["met"]
    assert not rows["effective accuracy >= every fixed depth and the static budget, every phase"]["met"]  # 0.94 < 0.95
    assert rows["quiet: accuracy within 1 point of full depth"]["met"]  # 94.5 vs 95
    assert not rows["recovery: 1-s p99 back under the SLO within 2 s of each load step"]["met"]
    assert rows["decision overhead < 1 % of batch time"]["met"]


def test_policy_names():
    assert bench.policy_names(["depth2", "controller+ee"], 3) == ["depth2", "controller+ee"]
    with pytest.raises(SystemExit, match="unknown policy"):
        bench.policy_names(["depth9"], 3)


# --- a tiny in-process run --------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """An untrained 4-depth ``test_resnet`` checkpoint with the digits data config at 16 px."""
    torch.manual_seed(0)
    model = coopnets.wrap("test_resnet", num_classes=10)
    rows = [{"depth": d, "accuracy": 0.5 + d / 10, "batch_size": 1, "device": "cpu"} for d in range(1, 5)]
    path = tmp_path_factory.mktemp("bench-serving") / "ckpt"
    coopnets.save_pretrained(model, path, per_depth=rows, data_config=digits_splits(img_size=16).pretrained_cfg_fields())
    return path


def test_untrained_checkpoint_is_refused(tiny_checkpoint, tmp_path):
    threads = torch.get_num_threads()
    with pytest.raises(SystemExit, match="do not differ enough"):
        bench.main(["--checkpoint", str(tiny_checkpoint), "--modes", "inprocess", "--latency-repeats", "2",
                    "--out", str(tmp_path)])
    assert torch.get_num_threads() == threads


def test_tiny_inprocess_run(tiny_checkpoint, tmp_path):
    threads = torch.get_num_threads()
    res = bench.main(["--checkpoint", str(tiny_checkpoint), "--modes", "inprocess", "--no-depth-check",
                      "--policies", "depth1", "depth4", "static", "controller", "controller+ee",
                      "--durations", "0.5", "0.5", "0.5", "0.5", "--warmup-s", "0.3", "--calibration-s", "0.5",
                      "--drain-s", "3", "--slo-ms", "200", "--latency-repeats", "2", "--out", str(tmp_path)])
    assert torch.get_num_threads() == threads
    mode = res["modes"]["inprocess"]
    assert list(mode["policies"]) == ["depth1", "depth4", "static", "controller", "controller+ee"]
    assert mode["base_rate"] > 0 and mode["capacity"] > mode["base_rate"]
    probes = mode["base_rate_probes"]  # open-loop probes of full depth at the candidate base rate
    assert probes and probes[0]["rate"] == pytest.approx(0.65 * mode["capacity"]) and probes[-1]["rate"] == mode["base_rate"]
    assert mode["policies"]["static"]["same_run_as"] == f"depth{res['static']['depth']}"
    for name, pol in mode["policies"].items():
        total = sum(pol["phases"][n]["requests"] for n in bench.PHASES)
        assert total > 0 and total == sum(pol["phases"][n]["answered"] for n in bench.PHASES)
        for n in bench.PHASES:
            s = pol["phases"][n]
            assert 0 <= s["effective_accuracy"] <= s["attainment"] <= 1
            assert sum(s["depth_histogram"].values()) == s["answered"]
            assert s["batches"] > 0 and s["overhead"] >= 0
        if name.startswith("depth"):
            assert all(set(pol["phases"][n]["depth_histogram"]) == {int(name[5:])} for n in bench.PHASES)
        # the busy process ran during the contention phase: judged by the CPU time it got, not by wall time
        # (a busy shared machine delays the events thread and the child's start, not its accounting)
        busy = pol["contention_process"]
        assert len(busy) == 1 and busy[0]["phase"] == "contention"
        assert busy[0]["cpu_s"] > 0 and 0 < busy[0]["core_share"] <= 1.05
    ee = [o["name"] for o in mode["policies"]["controller+ee"]["options"]]
    assert any(n.startswith("early_exit") for n in ee)
    assert not any(n.startswith("early_exit") for n in (o["name"] for o in mode["policies"]["controller"]["options"]))
    # the requests are labelled test images: accuracy is measured, per request
    assert 360 == len(digits_split_indices()["test"])
    md = (tmp_path / "serving.md").read_text()
    assert "## Targets" in md and "python benchmarks/serving.py" in md and "serving_inprocess.png" in md
    data = json.loads((tmp_path / "serving.json").read_text())
    assert data["targets"] and data["modes"]["inprocess"]["policies"]["depth1"]["phases"]["quiet"]["windows"]
    assert (tmp_path / "serving_inprocess.png").stat().st_size > 10_000
