"""ServingStats, its snapshots, /stats summaries, the Prometheus text and the Ray metric sink."""
import json
import math
import random
import sys
import threading
import types
from dataclasses import dataclass

import pytest

from coopnets.serving.metrics import CONTENT_TYPE, prometheus_text, ray_sink
from coopnets.serving.stats import (LATENCY_BOUNDS_MS, LATENCY_MAX_MS, LATENCY_MIN_MS, LATENCY_RATIO, SCHEMA,
                                    ServingStats, json_safe, latency_percentile, merge_snapshots, summarize)

SLO = 100.0


@dataclass
class Option:
    name: str


@dataclass
class FakeDecision:  # the attributes of coopnets.serving.Decision that record_batch reads
    option: Option
    batch_size: int
    slack_ms: float
    predicted_ms: float
    fits: bool
    decide_ms: float = 0.01
    run_ms: float = float("nan")


def decision(option="depth2", size=4, slack=50.0, predicted=20.0, run=18.0, fits=True):
    return FakeDecision(Option(option), size, slack, predicted, fits, run_ms=run)


def known(stats: ServingStats) -> None:
    """A known stream: 5 answers (3 on time, one exactly at the SLO), 2 batches, 2 shed, 1 expired, 2 errors."""
    for latency, depth, option in [(10.0, 1, "depth1"), (50.0, 2, "depth2"), (SLO, 2, "depth2"),
                                   (150.0, 3, "early_exit@0.7"), (400.0, 1, "early_exit@0.7")]:
        stats.record_answer(latency, depth, option)
    stats.record_batch(decision("depth2", 2, slack=80.0, predicted=20.0, run=25.0, fits=True))
    stats.record_batch(decision("depth1", 3, slack=-5.0, predicted=3.0, run=float("nan"), fits=False))
    stats.record_shed(503)
    stats.record_shed(429)
    stats.record_expired()
    stats.record_error(413)
    stats.record_error(413)


def exact_percentile(values, q):
    values = sorted(values)
    return values[min(len(values), max(1, math.ceil(q * len(values)))) - 1]


def random_stream(rng: random.Random, n: int):
    events = []
    for _ in range(n):
        r = rng.random()
        if r < 0.8:
            events.append(("answer", rng.lognormvariate(math.log(60), 0.8), rng.randint(1, 4),
                           rng.choice(["depth1", "depth4", "early_exit@0.55"])))
        elif r < 0.9:
            events.append(("batch", rng.choice(["depth1", "depth3"]), rng.randint(1, 8), rng.uniform(-20, 200),
                           rng.uniform(1, 80), rng.uniform(1, 80), rng.random() < 0.8))
        elif r < 0.94:
            events.append(("shed", rng.choice([503, 429])))
        elif r < 0.97:
            events.append(("expired",))
        else:
            events.append(("error", rng.choice([400, 413, 500])))
    return events


def replay(stats: ServingStats, events) -> None:
    for e in events:
        if e[0] == "answer":
            stats.record_answer(e[1], e[2], e[3])
        elif e[0] == "batch":
            stats.record_batch(decision(e[1], e[2], e[3], e[4], e[5], e[6]))
        elif e[0] == "shed":
            stats.record_shed(e[1])
        elif e[0] == "expired":
            stats.record_expired()
        else:
            stats.record_error(e[1])


# --- summarize ------------------------------------------------------------------------------
def test_summary_of_a_known_stream():
    stats = ServingStats(SLO, num_depths=4, replica="r0")
    known(stats)
    stats.set_controller({"decisions": 2, "misses": 1, "global_factor": 1.25, "depth_histogram": {1: 3, 2: 2},
                          "mean_run_ms": float("nan")})
    stats.set_queue_depth(3)
    s = summarize([stats.snapshot()])
    assert s["requests"] == 5 and s["slo_ms"] == SLO
    assert (s["on_time"], s["late"], s["slo_attainment"]) == (3, 2, 0.6)  # latency == slo is on time
    assert s["depth_histogram"] == {"1": 2, "2": 2, "3": 1, "4": 0}
    assert s["options"] == {"depth1": 1, "depth2": 2, "early_exit@0.7": 2}
    assert (s["shed"], s["expired"]) == (2, 1)
    assert s["errors"] == 5 and s["errors_by_status"] == {"413": 2, "429": 1, "503": 1, "504": 1}
    assert s["mean_ms"] == pytest.approx((10 + 50 + 100 + 150 + 400) / 5)
    assert s["p50_ms"] == 100.0 and s["p99_ms"] == 400.0  # Prometheus bounds (100) and the max are exact
    assert s["batches"] == 2 and s["batch_size_histogram"] == {"2": 1, "3": 1}
    assert s["mean_batch_size"] == 2.5 and s["misses"] == 1 and s["queue_depth"] == 3
    rep = s["per_replica"]["r0"]
    assert rep["requests"] == 5 and rep["slo_attainment"] == 0.6 and rep["mean_batch_size"] == 2.5
    assert rep["depth_histogram"] == s["depth_histogram"] and rep["errors"] == 5 and rep["batches"] == 2
    assert rep["controller"]["global_factor"] == 1.25 and rep["controller"]["depth_histogram"] == {"1": 3, "2": 2}
    assert rep["controller"]["mean_run_ms"] is None  # json-safe
    assert s["uptime_s"] >= 0
    json.dumps(s, allow_nan=False)
    snap = stats.snapshot()  # NaN run time left out; negative slack counted
    assert snap["run_ms"]["count"] == 1 and snap["predicted_ms"]["count"] == 2 and snap["slack_ms"]["min"] == -5.0


def test_empty_summary_and_every_depth():
    s = summarize([ServingStats(SLO, num_depths=3).snapshot()])
    assert s["requests"] == 0 and s["slo_attainment"] is None and s["p50_ms"] is None and s["mean_ms"] is None
    assert s["depth_histogram"] == {"1": 0, "2": 0, "3": 0} and s["errors"] == 0 and s["errors_by_status"] == {}
    assert s["per_replica"]["local"]["slo_attainment"] is None and s["per_replica"]["local"]["mean_batch_size"] is None
    assert "controller" not in s["per_replica"]["local"]
    assert summarize([])["requests"] == 0


def test_percentiles_within_one_bucket_of_exact():
    rng = random.Random(1)
    stats = ServingStats(SLO, num_depths=1)
    values = [rng.lognormvariate(math.log(40), 1.2) for _ in range(5000)] + [0.01, 0.07, 70_000.0]
    for v in values:
        stats.record_answer(v, 1, "depth1")
    hist = stats.snapshot()["latency_ms"]
    for q in (0.001, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999, 1.0):
        exact, got = exact_percentile(values, q), latency_percentile(hist, q)
        assert exact <= got <= max(exact * LATENCY_RATIO, LATENCY_MIN_MS) * (1 + 1e-9), (q, exact, got)
    assert latency_percentile(hist, 1.0) == max(values)
    assert latency_percentile(hist, 1e-9) == LATENCY_MIN_MS  # the first bucket: its upper bound
    s = summarize([stats.snapshot()])
    assert abs(s["p99_ms"] - exact_percentile(values, 0.99)) <= exact_percentile(values, 0.99) * 0.02 + 1e-3
    assert s["mean_ms"] == pytest.approx(sum(values) / len(values), abs=1e-3)


def test_latency_buckets_are_about_two_percent_wide():
    bounds = LATENCY_BOUNDS_MS
    assert bounds[0] == LATENCY_MIN_MS and bounds[-1] >= LATENCY_MAX_MS
    assert all(b / a <= LATENCY_RATIO * (1 + 1e-5) for a, b in zip(bounds, bounds[1:]))
    assert all(a < b for a, b in zip(bounds, bounds[1:]))


# --- merging --------------------------------------------------------------------------------
def _counts(snapshot):
    """The parts of a snapshot that must merge exactly (float sums compared separately)."""
    out = {k: v for k, v in snapshot.items() if k not in ("replica", "time", "started", "controller")}
    for key in ("latency_ms", "predicted_ms", "run_ms", "slack_ms"):
        out[key] = {k: v for k, v in out[key].items() if k != "sum"}
    return out


def test_merging_two_replicas_equals_one_stats_that_saw_both():
    rng = random.Random(7)
    stream_a, stream_b = random_stream(rng, 700), random_stream(rng, 400)
    a, b, both = (ServingStats(SLO, 4, replica=r) for r in ("a", "b", "both"))
    replay(a, stream_a)
    replay(b, stream_b)
    replay(both, stream_a + stream_b)
    a.set_queue_depth(2)
    b.set_queue_depth(5)
    both.set_queue_depth(7)
    merged, single = merge_snapshots([a.snapshot(), b.snapshot()]), both.snapshot()
    assert _counts(merged) == _counts(single)
    for key in ("latency_ms", "predicted_ms", "run_ms", "slack_ms"):
        assert merged[key]["sum"] == pytest.approx(single[key]["sum"])
    s2, s1 = summarize([a.snapshot(), b.snapshot()]), summarize([single])
    for key in s1:
        if key not in ("per_replica", "uptime_s"):
            assert s2[key] == pytest.approx(s1[key]) if key == "mean_ms" else s2[key] == s1[key], key
    assert set(s2["per_replica"]) == {"a", "b"}
    assert s2["per_replica"]["a"]["requests"] + s2["per_replica"]["b"]["requests"] == s1["requests"]
    # snapshots are cumulative: an older snapshot of the same replica is replaced, not added
    old_a = a.snapshot()
    a.record_answer(5.0, 1, "depth1")
    assert summarize([old_a, b.snapshot(), a.snapshot()])["requests"] == s1["requests"] + 1


def stable(summary):
    """A summary without its clock readings."""
    out = {k: v for k, v in summary.items() if k != "uptime_s"}
    out["per_replica"] = {r: {k: v for k, v in rep.items() if k != "snapshot_age_s"}
                          for r, rep in summary["per_replica"].items()}
    return out


def test_snapshots_survive_a_json_round_trip():
    stats = ServingStats(SLO, 4, replica="r")
    replay(stats, random_stream(random.Random(3), 300))
    stats.set_controller({"global_factor": float("inf"), "depth_histogram": {1: 2}})
    snap = stats.snapshot()
    again = json.loads(json.dumps(snap, allow_nan=False))
    assert again == snap and snap["schema"] == SCHEMA and snap["replica"] == "r" and snap["time"] >= snap["started"]
    assert stable(summarize([again])) == stable(summarize([snap]))
    prometheus_text([again])
    with pytest.raises(ValueError, match="schema"):
        summarize([{**snap, "schema": SCHEMA + 1}])


def test_recording_is_thread_safe():
    stats = ServingStats(SLO, 2)

    def work():
        for i in range(2000):
            stats.record_answer(float(i % 200), 1 + i % 2, "depth1")
            stats.record_shed()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = summarize([stats.snapshot()])
    assert s["requests"] == 8000 and s["shed"] == 8000 and sum(s["depth_histogram"].values()) == 8000


# --- Prometheus -----------------------------------------------------------------------------
def samples(text: bytes):
    from prometheus_client.parser import text_string_to_metric_families

    out, types_ = {}, {}
    for family in text_string_to_metric_families(text.decode()):
        types_[family.name] = family.type
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out, types_


def test_prometheus_text_parses_and_counters_move_by_the_recorded_amounts():
    from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

    assert CONTENT_TYPE == CONTENT_TYPE_PLAIN_0_0_4
    a, b = ServingStats(SLO, 4, replica="a"), ServingStats(SLO, 4, replica="b")
    replay(a, random_stream(random.Random(5), 200))
    before, types_ = samples(prometheus_text([a.snapshot(), b.snapshot()]))
    known(a)
    a.set_controller({"global_factor": 1.5})
    a.set_queue_depth(4)
    after, _ = samples(prometheus_text([a.snapshot(), b.snapshot()]))
    assert types_["coopnets_requests"] == "counter" and types_["coopnets_latency_ms"] == "histogram"
    assert types_["coopnets_slowdown_factor"] == "gauge"

    def moved(name, replica="a", **labels):
        key = (name, tuple(sorted({"replica": replica, **labels}.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    req = "coopnets_requests_total"
    assert moved(req, depth="1", option="depth1") == 1 and moved(req, depth="2", option="depth2") == 2
    assert moved(req, depth="3", option="early_exit@0.7") == 1 and moved(req, depth="1", option="early_exit@0.7") == 1
    ans = "coopnets_answers_total"
    assert moved(ans, outcome="on_time", status="200") == 3 and moved(ans, outcome="late", status="200") == 2
    assert moved(ans, outcome="shed", status="503") == 1 and moved(ans, outcome="shed", status="429") == 1
    assert moved(ans, outcome="expired", status="504") == 1 and moved(ans, outcome="error", status="413") == 2
    assert moved("coopnets_batches_total", option="depth2", fits="true") == 1
    assert moved("coopnets_batches_total", option="depth1", fits="false") == 1
    assert moved("coopnets_latency_ms_count") == 5 and moved("coopnets_latency_ms_sum") == pytest.approx(710.0)
    assert moved("coopnets_latency_ms_bucket", le="100.0") == 3 and moved("coopnets_latency_ms_bucket", le="+Inf") == 5
    assert moved("coopnets_latency_ms_bucket", le="150.0") == 4 and moved("coopnets_latency_ms_bucket", le="1.0") == 0
    assert moved("coopnets_batch_size_count") == 2 and moved("coopnets_batch_size_sum") == 5
    assert moved("coopnets_batch_size_bucket", le="2.0") == 1 and moved("coopnets_batch_size_bucket", le="4.0") == 2
    assert moved("coopnets_batch_run_ms_count") == 1 and moved("coopnets_batch_predicted_ms_count") == 2
    assert moved("coopnets_batch_slack_ms_bucket", le="0.0") == 1
    assert moved("coopnets_batch_slack_ms_bucket", le="+Inf") == 2
    assert ("coopnets_batch_slack_ms_sum", (("replica", "a"),)) not in after  # negative buckets: no _sum/_count
    assert after[("coopnets_slowdown_factor", (("replica", "a"),))] == 1.5
    assert after[("coopnets_queue_depth", (("replica", "a"),))] == 4
    assert after[("coopnets_slo_ms", (("replica", "b"),))] == SLO
    assert all(v == before.get(k, 0.0) for k, v in after.items() if ("replica", "b") in k[1])  # b never moved
    text = prometheus_text([a.snapshot()]).decode()
    assert "# HELP coopnets_answers_total" in text and "# TYPE coopnets_latency_ms histogram" in text


def test_prometheus_histograms_match_the_exact_counts():
    rng = random.Random(11)
    stats = ServingStats(SLO, 1)
    values = [rng.lognormvariate(math.log(80), 1.0) for _ in range(2000)]
    for v in values:
        stats.record_answer(v, 1, "depth1")
    got, _ = samples(prometheus_text([stats.snapshot()]))
    for (name, labels), value in got.items():
        if name == "coopnets_latency_ms_bucket":
            le = float(dict(labels)["le"])
            assert value == sum(v <= le for v in values), le


# --- Ray ------------------------------------------------------------------------------------
class _Recorder:
    """A stand-in for a ray.serve.metrics class: checks the declared tag keys, keeps the calls."""

    calls = []

    def __init__(self, name, description="", boundaries=None, tag_keys=None):
        assert description, name
        self.name, self.tag_keys = name, tag_keys or ()
        if boundaries is not None:
            assert all(b > 0 for b in boundaries), (name, boundaries)  # Ray's rule

    def _call(self, value, tags):
        assert set(tags or {}) == set(self.tag_keys), (self.name, tags, self.tag_keys)
        assert all(isinstance(v, str) for v in (tags or {}).values())
        _Recorder.calls.append((self.name, value, tuple(sorted((tags or {}).items()))))

    def inc(self, value=1.0, tags=None):
        assert value > 0
        self._call(value, tags)

    observe = set = _call


def test_ray_sink_against_a_fake_ray_serve_metrics(monkeypatch):
    fake = types.ModuleType("ray.serve.metrics")
    fake.Counter = fake.Histogram = fake.Gauge = _Recorder
    serve = types.ModuleType("ray.serve")
    serve.metrics = fake
    monkeypatch.setitem(sys.modules, "ray.serve", serve)
    monkeypatch.setitem(sys.modules, "ray.serve.metrics", fake)
    monkeypatch.setattr(_Recorder, "calls", [])
    stats = ServingStats(SLO, 4, sink=ray_sink(4))
    known(stats)
    stats.set_controller({"global_factor": 2.0})
    stats.set_queue_depth(6)
    calls = _Recorder.calls
    counted = {}
    for name, value, tags in calls:
        if name.endswith(("requests", "answers", "batches")):
            counted[(name, tags)] = counted.get((name, tags), 0) + value
    assert counted[("coopnets_requests", (("depth", "2"), ("option", "depth2")))] == 2
    assert counted[("coopnets_answers", (("outcome", "on_time"), ("status", "200")))] == 3
    assert counted[("coopnets_answers", (("outcome", "shed"), ("status", "429")))] == 1
    assert counted[("coopnets_answers", (("outcome", "expired"), ("status", "504")))] == 1
    assert counted[("coopnets_answers", (("outcome", "error"), ("status", "413")))] == 2
    assert counted[("coopnets_batches", (("fits", "false"), ("option", "depth1")))] == 1
    assert [v for n, v, _ in calls if n == "coopnets_latency_ms"] == [10.0, 50.0, SLO, 150.0, 400.0]
    assert [v for n, v, _ in calls if n == "coopnets_batch_run_ms"] == [25.0]  # the NaN run time left out
    assert [v for n, v, _ in calls if n == "coopnets_batch_slack_ms"] == [80.0, -5.0]
    assert ("coopnets_slowdown_factor", 2.0, ()) in calls and ("coopnets_queue_depth", 6, ()) in calls


def test_a_failing_sink_never_fails_a_request(caplog):
    class Broken:
        def __getattr__(self, name):
            raise RuntimeError("down")

    stats = ServingStats(SLO, 2, sink=Broken())
    stats.record_answer(1.0, 1, "depth1")
    stats.record_error(500)
    assert summarize([stats.snapshot()])["requests"] == 1
    assert sum("metric sink" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.slow  # starting a local Ray takes 6-18 s on a shared 2-core machine
def test_ray_sink_records_in_a_local_ray():
    """Ray's metrics work outside a Serve replica (Ray 2.60): no Serve tags then, nothing else changes."""
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        sink = ray_sink(4)
        stats = ServingStats(SLO, 4, sink=sink)
        known(stats)
        stats.set_controller({"global_factor": 1.1})
        stats.set_queue_depth(1)
        assert not stats._sink_failed  # every call reached Ray without raising
        sink.record_batch(4, "depth4", None, 12.0, -3.0, False)  # directly: any error raises here
    finally:
        if started:
            ray.shutdown()


def test_json_safe():
    assert json_safe({1: float("nan"), "a": [float("inf"), 1.5, (2,)]}) == {"1": None, "a": [None, 1.5, [2]]}
