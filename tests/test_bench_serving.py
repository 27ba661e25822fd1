"""``benchmarks/serving.py``: phases, repeats, targets and policies on known numbers; a tiny in-process run; a
tiny end-to-end HTTP run (local engine) with the overload experiment.

The generic pieces (schedule, open loop, client, metrics, contention) are :mod:`coopnets.bench`'s, shared
with ``coopnets bench serve`` (``tests/test_bench_serve.py`` tests them over HTTP); here they run with
callback submits into in-process servers, as the benchmark's in-process mode does. The replica-death
experiment (Ray Serve, about half a minute to start) is not run here: its helpers are tested on known
numbers and on a process of this test's own. No assertion bounds wall-clock time tightly: the machine
may be busy.
"""
from __future__ import annotations

import doctest
import json
import math
import os
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import coopnets
from coopnets.bench import latencies_ms, percentile, poisson_schedule, recovery_time, run_open_loop, summarize, window_p99
from coopnets.bench.images import digits_split_indices
from coopnets.cli.errors import run_entry
from coopnets.train.data import digits_splits

import serving as bench

DURATIONS = dict.fromkeys(bench.PHASES, 0.4)


def test_doctests():
    assert doctest.testmod(bench).failed == 0


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


def test_repeats_have_their_own_seeds_and_are_interleaved():
    phases = bench.build_phases(100, DURATIONS)
    s0, s1 = (poisson_schedule(phases, 50, bench.repeat_seed(7, r)) for r in (0, 1))
    assert not np.array_equal(s0.times[:10], s1.times[:10])
    order = bench.interleaved(3, {"inprocess": ["depth2", "controller"], "http": ["depth2"]})
    assert [r for r, _, _ in order] == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # repeat 1 of every policy, then repeat 2...
    assert order[:3] == [(0, "inprocess", "depth2"), (0, "inprocess", "controller"), (0, "http", "depth2")]


def test_overload_phases_are_multiples_of_full_depths_capacity():
    args = SimpleNamespace(overload_factors=[5.0, 10.0], overload_s=[8.0, 30.0], overload_after_s=0.0, warmup_s=1.0)
    phases = bench.overload_phases(capacity=40.0, base_rate=20.0, args=args)
    assert [(p.name, p.rate, p.duration) for p in phases] == [("warmup", 20.0, 1.0), ("5x", 200.0, 8.0),
                                                              ("10x", 400.0, 30.0)]


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
    fast, slow = FakeServer(0.0), FakeServer(0.010)  # the slow one serves 100 requests/s at best
    try:
        out_fast, _ = run_open_loop(times, fast.submit, drain_s=5)
        out_slow, _ = run_open_loop(times, slow.submit, drain_s=5)
    finally:
        fast.close()
        slow.close()
    for out in (out_fast, out_slow):  # sends follow the schedule, however slow the answers
        lag = np.array([o.sent for o in out]) - times
        assert np.all(lag > -1e-3)
    lat_slow = latencies_ms(times, out_slow)
    assert np.all(np.isfinite(lat_slow)) and np.all(lat_slow >= 10.0 - 0.5)
    # overload: the queue grows, so latency from the scheduled arrival grows (at least 5 ms per request)
    assert lat_slow[-10:].mean() > lat_slow[:10].mean() + 150


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
    assert time.perf_counter() - start < 20  # the drain ends the run (not a hang)
    lat = latencies_ms(times, out)
    assert math.isfinite(lat[0]) and math.isinf(lat[1])
    s = summarize(lat, [True, True], slo_ms=1e4, depths=[o.depth for o in out])
    assert s["attainment"] == 0.5 and s["effective_accuracy"] == 0.5 and s["p99_ms"] == math.inf


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
    assert percentile(list(range(1, 201)), 0.99) == 198

    t = [0.2, 0.4, 0.6, 1.5, 2.2, 2.4, 3.9]
    w = window_p99(t, [300, 20, 30, 250, 40, 50, 60], start=0.0, end=4.0)
    assert recovery_time(w, slo_ms=100, step=0.0) == 2.0
    assert recovery_time(window_p99([0.5, 1.5], [10, 200], 0, 2), 100, 0.0) == math.inf

    d1 = SimpleNamespace(decide_ms=0.02, run_ms=10.0, batch_size=4)
    d2 = SimpleNamespace(decide_ms=0.04, run_ms=30.0, batch_size=8)
    o = bench.decision_overhead([d1, d1, d2, None, d2])
    assert o["batches"] == 2 and o["overhead"] == pytest.approx(0.06 / 40) and o["mean_batch_size"] == 6

    lat_ratios = {1: {"full_over_depth1": {"median": 2.5}}, 8: {"full_over_depth1": {"median": 1.9}}}
    assert not bench.check_depths([0.80, 0.99], lat_ratios)["met"]  # 1.9x at batch 8
    assert bench.check_depths([0.80, 0.99], {1: lat_ratios[1]})["met"]
    assert not bench.check_depths([0.97, 0.99], {1: lat_ratios[1]})["met"]  # 2 points


def _run(att, eff, shed=0, expired=0, recovery=0.0, overhead=0.001):
    """One analysed run: the same figures in every phase."""
    return {"phases": {n: {"attainment": att, "admitted_attainment": att, "effective_accuracy": eff, "accuracy": eff,
                           "overhead": overhead, "rate": 10.0, "shed": shed, "expired": expired, "requests": 100,
                           "p99_ms": 50.0, "depth_histogram": {1: 100}, **({"recovery_s": recovery} if n != "quiet" else {})}
                       for n in bench.PHASES}}


def test_repeats_are_summarised_with_intervals():
    s = bench.summarize_repeats([_run(0.99, 0.9, shed=2), _run(1.0, 0.92, shed=4), _run(0.98, 0.94, expired=1)])
    q = s["quiet"]
    assert q["attainment"]["mean"] == pytest.approx(0.99) and q["attainment"]["n"] == 3
    assert q["attainment"]["lo"] < 0.99 < q["attainment"]["hi"] <= 1.0  # a share's interval stays within [0, 1]
    assert q["shed"]["mean"] == 2 and q["total"]["shed"] == 6 and q["total"]["expired"] == 1
    assert q["per_repeat"]["effective_accuracy"] == [0.9, 0.92, 0.94]
    assert q["depth_histogram"] == {1: 300} and q["p99_ms"]["median"] == 50.0
    assert q["recovery_s"]["n"] == 0 and s["burst"]["recovery_s"]["median"] == 0.0


def test_targets_are_computed_from_the_results():
    def policy(*runs):
        return {"summary": bench.summarize_repeats(runs)}

    burst_full = _run(1.0, 0.95)
    burst_full["phases"]["burst"].update(attainment=0.3, effective_accuracy=0.3)
    res = {"modes": {"http": {"policies": {
        "depth1": policy(_run(1.0, 0.80), _run(1.0, 0.80)),
        "depth2": policy(burst_full, burst_full),
        "controller": policy(_run(0.995, 0.946, recovery=math.inf), _run(0.995, 0.946, recovery=math.inf)),
        "controller+ee": policy(_run(0.97, 0.96, shed=3), _run(1.0, 0.96)),
    }}},
        "overload": {"policy": "controller", "phases": {
            "5x": {"admitted_attainment_from_send": 0.995, "admitted_attainment": 0.9, "shed": 900, "late": 4},
            "after": {"admitted_attainment_from_send": 0.5, "admitted_attainment": 0.5, "shed": 0, "late": 9}},
            "rss": {"start_mib": 500.0, "max_mib": 600.0, "end_mib": 510.0, "growth_mib": 100.0}},
        "replica_kill": {"policy": "controller", "requests": 100, "connection_failures": 0, "hung": 0,
                         "errors_by_status": {"500": 2}, "back_s": 3.0, "attainment_before": 1.0}}
    rows = {(r["target"], r["policy"]): r for r in bench.evaluate_targets(res, num_depths=2)}
    assert rows[("load: full depth attains < 50 % in the burst", "depth2")]["met"]
    att = "SLO attainment >= 99 % of all requests in every phase"
    assert rows[(att, "controller")]["met"]
    assert not rows[(att, "controller+ee")]["met"]  # 98.5 % on average
    assert "worst repeat 97.0" in rows[(att, "controller+ee")]["figure"] and "shed 3" in rows[(att, "controller+ee")]["figure"]
    best = "effective accuracy within 0.5 points of the best fixed depth in hindsight, every phase"
    assert rows[(best, "controller")]["met"]  # 94.6 vs depth2's 95.0 in quiet: -0.4 points
    assert rows[(best, "controller+ee")]["met"]
    assert "burst 94.6" in rows[(best, "controller")]["figure"] and "vs depth1 80.0" in rows[(best, "controller")]["figure"]
    assert not rows[("recovery: 1-s p99 back under the SLO within 2 s of each load step (median of repeats)",
                     "controller")]["met"]
    assert rows[("overload: >= 99 % of the admitted requests on time", "controller")]["met"]  # 'after' is not overload
    assert not rows[("overload: memory flat (max at most 64 MiB above the start)", "controller")]["met"]
    kill = rows[("replica death: no connection reset, none unanswered past deadline + 1 s", "controller")]
    assert kill["met"] and "500" in kill["figure"]


def test_best_fixed_depth_in_hindsight_is_per_phase():
    a, b = _run(1.0, 0.80), _run(1.0, 0.95)
    b["phases"]["burst"]["effective_accuracy"] = 0.3
    pol = {"depth1": {"summary": bench.summarize_repeats([a])}, "depth2": {"summary": bench.summarize_repeats([b])},
           "static": {"summary": bench.summarize_repeats([b]), "same_run_as": "depth2"},
           "controller": {"summary": bench.summarize_repeats([_run(1.0, 0.99)])}}
    assert bench.best_fixed(pol, "quiet") == (pytest.approx(0.95), "depth2")
    assert bench.best_fixed(pol, "burst") == (pytest.approx(0.80), "depth1")


# --- policies ---------------------------------------------------------------------------------
def test_policy_names_and_their_servers(tmp_path):
    assert bench.policy_names(["depth2", "controller+ee"], 3) == ["depth2", "controller+ee"]
    with pytest.raises(SystemExit, match="unknown policy"):
        bench.policy_names(["depth9"], 3)
    args = SimpleNamespace(slo_ms=100.0, max_batch_size=8, batch_wait_ms=5.0, torch_threads=1, server_args="--no-shed")
    ee = bench.serve_args("controller+ee", 2, args, tmp_path)
    assert ee[ee.index("--calibration-data") + 1] == str(tmp_path) and "--no-early-exit" not in ee and "--depth" not in ee
    assert ee[-1] == "--no-shed"  # --server-args go to every server
    assert "--no-early-exit" in bench.serve_args("controller", 2, args, tmp_path)
    static = bench.serve_args("static", 2, args, tmp_path, engine="ray", replicas=2)
    assert static[static.index("--depth") + 1] == "2" and "--torch-threads" not in static
    assert static[static.index("--num-replicas") + 1] == "2"
    plan = bench.plan_runs("http", ["depth1", "controller"], 2, 2, base_given=False)
    assert plan["runs"] == ["depth2", "depth1", "controller"]  # full depth first: its capacity sets the base rate


def test_bad_flags_one_line_exit_2(capsys, tmp_path):
    for argv, words in ((["--repeats", "0"], "--repeats 0"), (["--overload-s", "3"], "one length per"),
                        (["--replica-kill-at-s", "30"], "--replica-kill-at-s 30")):
        code = run_entry(lambda: bench.main(argv + ["--out", str(tmp_path)]) and 0, prog="benchmarks/serving.py")
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and words in err, err
    assert not any(tmp_path.iterdir())


def test_replica_processes_are_found_by_title_and_memory_is_sampled():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "ray::ServeReplica:app:Model"],
                             stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while "ServeReplica" not in bench.process_title(child.pid) and time.monotonic() < deadline:
            time.sleep(0.02)  # until the child has exec'd
        assert bench.replica_pids([os.getpid(), child.pid]) == [child.pid]
        assert "ServeReplica" in bench.process_title(child.pid)
        sampler = bench.RssSampler(lambda: [os.getpid(), child.pid], period_s=0.05).start()
        time.sleep(0.3)
        sampler.stop()
    finally:
        child.kill()
        child.wait(10)
    assert len(sampler.samples) >= 2 and not sampler.error
    assert all(mib > 1 and n == 2 for _, mib, n in sampler.samples)
    assert math.isnan(bench.vm_rss_mib(child.pid))  # gone


# --- tiny runs ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """An untrained 4-depth ``test_resnet`` checkpoint with the digits data config at 16 px."""
    torch.manual_seed(0)
    model = coopnets.wrap("test_resnet", num_classes=10)
    rows = [{"depth": d, "accuracy": 0.5 + d / 10, "batch_size": 1, "device": "cpu"} for d in range(1, 5)]
    path = tmp_path_factory.mktemp("bench-serving") / "ckpt"
    coopnets.save_pretrained(model, path, per_depth=rows, data_config=digits_splits(img_size=16).pretrained_cfg_fields())
    return path


TAG = "test_resnet_16px"


def test_untrained_checkpoint_is_refused(tiny_checkpoint, tmp_path):
    threads = torch.get_num_threads()
    with pytest.raises(SystemExit, match="do not differ enough"):
        bench.main(["--checkpoint", str(tiny_checkpoint), "--modes", "inprocess", "--latency-repeats", "2",
                    "--out", str(tmp_path)])
    assert torch.get_num_threads() == threads


def test_tiny_inprocess_run(tiny_checkpoint, tmp_path):
    threads = torch.get_num_threads()
    res = bench.main(["--checkpoint", str(tiny_checkpoint), "--modes", "inprocess", "--no-depth-check",
                      "--policies", "depth1", "depth4", "static", "controller", "controller+ee", "--repeats", "1",
                      "--durations", "0.5", "0.5", "0.5", "0.5", "--warmup-s", "0.3", "--calibration-s", "0.5",
                      "--probe-s", "1", "--drain-s", "3", "--slo-ms", "200", "--latency-repeats", "2", "--out", str(tmp_path)])
    assert torch.get_num_threads() == threads
    ck = res["checkpoints"][TAG]
    assert ck["overload"] is None and ck["replica_kill"] is None  # HTTP-mode experiments
    mode = ck["modes"]["inprocess"]
    assert list(mode["policies"]) == ["depth1", "depth4", "static", "controller", "controller+ee"]
    assert mode["base_rate"] > 0 and mode["capacity"] > mode["base_rate"]
    probes = mode["base_rate_probes"]  # open-loop probes of full depth at the candidate base rate
    assert probes and probes[0]["rate"] == pytest.approx(0.65 * mode["capacity"]) and probes[-1]["rate"] == mode["base_rate"]
    assert mode["policies"]["static"]["same_run_as"] == f"depth{ck['static']['depth']}"
    for name, pol in mode["policies"].items():
        assert len(pol["repeats"]) == 1 and pol["repeats"][0]["seed"] == 0
        run = pol["repeats"][0]
        total = sum(run["phases"][n]["requests"] for n in bench.PHASES)
        assert total > 0 and total == sum(run["phases"][n]["answered"] for n in bench.PHASES)  # no shedding here
        for n in bench.PHASES:
            s = run["phases"][n]
            assert 0 <= s["effective_accuracy"] <= s["attainment"] <= 1 and s["shed"] == s["expired"] == 0
            assert sum(s["depth_histogram"].values()) == s["answered"]
            assert s["batches"] > 0 and s["overhead"] >= 0
            assert pol["summary"][n]["attainment"]["mean"] == s["attainment"]
        if name.startswith("depth"):
            assert all(set(run["phases"][n]["depth_histogram"]) == {int(name[5:])} for n in bench.PHASES)
        # the busy process ran during the contention phase: judged by the CPU time it got, not by wall time
        busy = run["contention_process"]
        assert len(busy) == 1 and busy[0]["phase"] == "contention"
        assert busy[0]["cpu_s"] > 0 and busy[0]["core_share"] > 0  # no upper bound: start and stop lag the phase on a busy machine
    ee = [o["name"] for o in mode["policies"]["controller+ee"]["options"]]
    assert any(n.startswith("early_exit") for n in ee)
    assert not any(n.startswith("early_exit") for n in (o["name"] for o in mode["policies"]["controller"]["options"]))
    assert 360 == len(digits_split_indices()["test"])  # the requests are labelled test images
    md = (tmp_path / "serving.md").read_text()
    assert "## Targets" in md and "python benchmarks/serving.py" in md and f"serving_{TAG}_inprocess.png" in md
    data = json.loads((tmp_path / "serving.json").read_text())
    assert data["checkpoints"][TAG]["targets"]
    assert data["checkpoints"][TAG]["modes"]["inprocess"]["policies"]["depth1"]["repeats"][0]["phases"]["quiet"]["windows"]
    assert (tmp_path / f"serving_{TAG}_inprocess.png").stat().st_size > 10_000


def test_tiny_http_run_with_overload(tiny_checkpoint, tmp_path):
    """``coopnets serve --engine local`` per policy, over HTTP, then the overload experiment: the report's files,
    shed and expired counted apart per policy, and the server's memory samples."""
    res = bench.main(["--checkpoint", str(tiny_checkpoint), "--modes", "http", "--no-depth-check",
                      "--policies", "depth4", "controller+ee", "--repeats", "1", "--http-base-rate", "60",
                      "--no-capacity-per-depth", "--durations", "1", "1", "1", "1", "--warmup-s", "0.5",
                      "--drain-s", "3", "--slo-ms", "300", "--latency-repeats", "2",
                      "--overload", "--overload-factors", "1.5", "2", "--overload-s", "1", "1", "--overload-after-s",
                      "0.5", "--no-replica-kill", "--out", str(tmp_path)])
    ck = res["checkpoints"][TAG]
    assert ck["replica_kill"] is None
    for name in ("serving.md", "serving.json", f"serving_{TAG}_http.png", f"serving_{TAG}_overload.png"):
        assert (tmp_path / name).stat().st_size > 1000, name
    data = json.loads((tmp_path / "serving.json").read_text())["checkpoints"][TAG]
    pols = data["modes"]["http"]["policies"]
    assert list(pols) == ["depth4", "controller+ee"]
    for name, pol in pols.items():
        run = pol["repeats"][0]
        assert "--engine local" in run["server_command"]
        assert ("--calibration-data" in run["server_command"]) == (name == "controller+ee")
        for n in bench.PHASES:
            s = run["phases"][n]
            assert isinstance(s["shed"], int) and isinstance(s["expired"], int)  # counted apart
            assert s["requests"] == s["answered"] + s["shed"] + s["expired"] + s["errors"] + s["unanswered"]
            assert 0 <= s["attainment"] <= 1 and (s["admitted_attainment"] is None or 0 <= s["admitted_attainment"] <= 1)
            assert set(pol["summary"][n]["total"]) >= {"shed", "expired"}
        assert sum(run["phases"][n]["answered"] for n in bench.PHASES) > 0
    ov = data["overload"]
    assert ov["policy"] == "controller" and list(ov["phases"]) == ["1.5x", "2x", "after"]
    assert ov["capacity"] == pytest.approx(60 / 0.75)  # estimated from the given base rate / --http-load-fraction
    assert ov["phases"]["2x"]["rate"] == pytest.approx(2 * ov["capacity"])
    for s in ov["phases"].values():
        assert {"shed", "expired", "late", "late_from_send", "admitted_attainment_from_send", "sent_rate"} <= set(s)
    rss = ov["rss"]
    assert len(rss["mib"]) >= 3 and len(rss["t"]) == len(rss["mib"]) and all(m > 10 for m in rss["mib"])
    assert rss["start_mib"] > 10 and rss["max_mib"] >= rss["start_mib"] and rss["end_mib"] > 10
    md = (tmp_path / "serving.md").read_text()
    assert f"{TAG}: overload" in md and "Server memory" in md and "admitted" in md


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """An `independent` sweep's folder of four untrained 16-px runs (one per depth), the model family."""
    root = tmp_path_factory.mktemp("bench-serving-family") / "sweep"
    for d in range(1, 5):
        torch.manual_seed(d)
        model = coopnets.wrap("test_resnet", num_classes=10)
        rows = [{"depth": k, "accuracy": 0.5, "val_accuracy": 0.3 + d / 10 if k == d else 0.1} for k in range(1, 5)]
        coopnets.save_pretrained(model, root / f"depth{d}" / "model", per_depth=rows,
                                 data_config=digits_splits(img_size=16).pretrained_cfg_fields())
    return root


def test_tiny_http_run_against_a_model_family(tiny_checkpoint, tiny_sweep, tmp_path):
    """The family is served by `coopnets serve SWEEP` under the same schedule as the one network's controller; the
    memory report counts every member, and the comparison's table and targets are written."""
    res = bench.main(["--checkpoint", str(tiny_checkpoint), "--family", str(tiny_sweep), "--modes", "http",
                      "--no-depth-check", "--policies", "controller", "family", "--repeats", "1", "--http-base-rate",
                      "30", "--durations", "1", "1", "1", "1", "--warmup-s", "0.5", "--drain-s", "3", "--slo-ms", "300",
                      "--latency-repeats", "2", "--no-overload", "--no-replica-kill", "--out", str(tmp_path)])
    ck = res["checkpoints"][TAG]
    pols = ck["modes"]["http"]["policies"]
    assert list(pols) == ["controller", "family"]
    fam_run, one_run = pols["family"]["repeats"][0], pols["controller"]["repeats"][0]
    assert str(tiny_sweep) in fam_run["server_command"] and str(tiny_sweep) not in one_run["server_command"]
    assert "--calibration-data" in fam_run["server_command"] and "--no-early-exit" in fam_run["server_command"]
    info = ck["family"]
    assert len(info["members"]) == 4 and all(m["load_s"] > 0 for m in info["members"])
    assert info["parameter_bytes"] == sum(m["parameter_bytes"] for m in info["members"])
    assert fam_run["memory"]["parameter_bytes"] == info["parameter_bytes"]  # what the server says it holds
    assert one_run["memory"]["parameter_bytes"] == info["one_network_parameter_bytes"]
    for run in (fam_run, one_run):
        assert run["memory"]["rss_max_mib"] >= run["memory"]["rss_median_mib"] > 10
        assert sum(run["phases"][n]["answered"] for n in bench.PHASES) > 0
    targets = [t["target"] for t in ck["targets"]]
    assert any(t.startswith("family: effective accuracy") for t in targets)
    assert any(t.startswith("family: memory") for t in targets)
    md = (tmp_path / "serving.md").read_text()
    assert f"{TAG}: one network against a model family" in md and "member load s" in md


def test_stats_poller_and_the_second_replica(monkeypatch):
    """The step experiment's /stats poller keeps polling through failures; the second replica counts once it answered."""
    calls = iter([{"per_replica": {"a": {"requests": 3}}, "cluster": {"replicas": 1}}, RuntimeError("busy"),
                  {"per_replica": {"a": {"requests": 5}, "b": {"requests": 0}}, "cluster": {"replicas": 2}},
                  {"per_replica": {"a": {"requests": 6}, "b": {"requests": 2}}, "cluster": {"replicas": 2}}])

    def get():
        v = next(calls, None)
        if isinstance(v, Exception):
            raise v
        return v or {"per_replica": {"a": {"requests": 6}, "b": {"requests": 2}}, "cluster": {"replicas": 2}}

    poller = bench.StatsPoller(get, period_s=0.01).start()
    while len(poller.samples) < 4:
        time.sleep(0.01)
    poller.stop()
    assert [n for _, n, _ in poller.samples[:3]] == [1, 2, 2]
    t0 = poller.samples[0][0]
    second = bench.second_replica(poller.samples, t0)
    assert second["running_s"] == poller.samples[1][0] - t0 and second["answered_s"] == poller.samples[2][0] - t0
