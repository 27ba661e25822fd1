"""Prometheus metrics from :class:`~coopnets.serving.stats.ServingStats` snapshots, and a Ray metrics sink.

* :func:`prometheus_text` renders snapshots (one per replica, each series labelled
  ``replica``) in the Prometheus text format 0.0.4 (:data:`CONTENT_TYPE`) through
  ``prometheus_client``: the body of ``GET /metrics``.
* :func:`ray_sink` returns a :class:`MetricSink` that mirrors every event into
  ``ray.serve.metrics`` counters, histograms and gauges, which Ray's metrics agent exports.

Series (all prefixed ``coopnets_``; latencies and times in milliseconds):

=================================  =========  ==============================================
``requests_total``                 counter    200 answers, labels ``depth``, ``option``
``answers_total``                  counter    every answer, labels ``outcome`` (``on_time``,
                                              ``late``, ``shed``, ``expired``, ``error``) and
                                              ``status`` (HTTP)
``batches_total``                  counter    batches run, labels ``option``, ``fits``
                                              (``false``: no option fit the slack, a miss)
``latency_ms``                     histogram  latency of the 200 answers, from arrival
``batch_size``                     histogram  size of the batches run
``batch_predicted_ms``             histogram  predicted batch run time, margin included
``batch_run_ms``                   histogram  measured batch run time
``batch_slack_ms``                 histogram  the batch's slack when decided (<= 0: already late;
                                              negative buckets, so, by Prometheus' rule, no
                                              ``_sum``/``_count``: ``le="+Inf"`` is the count)
``slowdown_factor``                gauge      the latency model's slowdown factor (``global_factor``)
``queue_depth``                    gauge      requests waiting for a batch (when the server reports it)
``slo_ms``                         gauge      the latency objective
=================================  =========  ==============================================

Scraping
--------
``coopnets serve`` answers ``GET /metrics`` on its HTTP port with the series above, merged
over every replica (a ``replica`` label tells them apart), so one scrape target covers the
whole deployment::

    scrape_configs:
      - job_name: coopnets
        metrics_path: /metrics
        static_configs:
          - targets: ["127.0.0.1:8000"]

SLO attainment over 5 minutes:
``sum(rate(coopnets_answers_total{outcome="on_time"}[5m])) / sum(rate(coopnets_requests_total[5m]))``;
p99 latency: ``histogram_quantile(0.99, sum by (le) (rate(coopnets_latency_ms_bucket[5m])))``.

Under Ray, each replica's :func:`ray_sink` also feeds Ray's own metrics pipeline: start the
cluster with a metrics export port (``ray start --head --metrics-export-port=8080``) and
scrape every node's port (Ray writes a service-discovery file,
``/tmp/ray/prom_metrics_service_discovery.json``, for ``file_sd_configs``). There the series
carry Ray's ``ray_`` namespace (``ray_coopnets_requests_total``, ``ray_coopnets_latency_ms_bucket``...)
next to Ray Serve's own ``ray_serve_*`` series, and Ray Serve adds its ``deployment``,
``replica`` and ``application`` labels; the slack histogram's boundaries are the positive ones
only (Ray's rule), so slack <= 0 falls in its lowest bucket (``batches_total{fits="false"}``
counts the misses exactly).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from .stats import (BATCH_MS_BUCKETS, BATCH_SIZE_BUCKETS, LATENCY_BOUNDS_MS, PROM_LATENCY_BUCKETS_MS, SLACK_MS_BUCKETS,
                    MetricSink, latest_per_replica)

#: the content type of :func:`prometheus_text` (``prometheus_client.exposition.CONTENT_TYPE_PLAIN_0_0_4``)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

PREFIX = "coopnets_"

HELP = {
    "requests": "Answered predictions (HTTP 200), by the depth that answered and the serving option of its batch.",
    "answers": "Every answer to a prediction request by outcome: on_time (200 within the SLO), late (200 past the "
               "SLO), shed (503/429, refused at admission), expired (504, deadline passed in the queue), error "
               "(other 4xx/5xx); status is the HTTP status.",
    "batches": "Batches run, by serving option; fits=false when no option's predicted time fit the slack (a miss).",
    "latency_ms": "Latency of the answered predictions in milliseconds, from arrival to answer.",
    "batch_size": "Size of the batches run.",
    "batch_predicted_ms": "Predicted run time of each batch in milliseconds, safety margin included.",
    "batch_run_ms": "Measured run time of each batch in milliseconds.",
    "batch_slack_ms": "Slack of each batch when its option was decided (min over its requests of SLO minus time "
                      "waited), in milliseconds; <= 0 means already late.",
    "slowdown_factor": "The latency model's slowdown factor (measured over profiled run time; 1 = as profiled).",
    "queue_depth": "Requests waiting for a batch.",
    "slo_ms": "The latency objective per request in milliseconds.",
}


# --- Prometheus text ----------------------------------------------------------------------
def _le(bound: float) -> str:
    return "+Inf" if bound == math.inf else repr(float(bound))


def _cumulative(bounds: Sequence[float], counts: Sequence[int]) -> List[Tuple[str, float]]:
    out, total = [], 0
    for bound, count in zip(list(bounds) + [math.inf], counts):
        total += count
        out.append((_le(bound), float(total)))
    return out


def _latency_buckets(hist: Dict[str, Any]) -> List[Tuple[str, float]]:
    """The fine latency buckets folded into :data:`PROM_LATENCY_BUCKETS_MS` (exact: those are fine bounds)."""
    coarse = [0] * (len(PROM_LATENCY_BUCKETS_MS) + 1)
    prom = [float(b) for b in PROM_LATENCY_BUCKETS_MS]
    for index, count in hist["buckets"].items():
        index = int(index)
        upper = LATENCY_BOUNDS_MS[index] if index < len(LATENCY_BOUNDS_MS) else math.inf
        j = next((j for j, b in enumerate(prom) if upper <= b), len(prom))
        coarse[j] += count
    return _cumulative(prom, coarse)


def _size_buckets(sizes: Dict[str, int]) -> List[Tuple[str, float]]:
    counts = [0] * (len(BATCH_SIZE_BUCKETS) + 1)
    for size, n in sizes.items():
        counts[next((j for j, b in enumerate(BATCH_SIZE_BUCKETS) if int(size) <= b), len(BATCH_SIZE_BUCKETS))] += n
    return _cumulative(BATCH_SIZE_BUCKETS, counts)


class SnapshotCollector:
    """A ``prometheus_client`` collector yielding the series of ``snapshots`` (latest per replica)."""

    def __init__(self, snapshots: Sequence[Dict[str, Any]]) -> None:
        self.snapshots = latest_per_replica(snapshots)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        def family(kind: Any, name: str, labels: Sequence[str]) -> Any:
            return kind(PREFIX + name, HELP[name], labels=["replica", *labels])

        requests = family(CounterMetricFamily, "requests", ["depth", "option"])
        answers = family(CounterMetricFamily, "answers", ["outcome", "status"])
        batches = family(CounterMetricFamily, "batches", ["option", "fits"])
        latency = family(HistogramMetricFamily, "latency_ms", [])
        size = family(HistogramMetricFamily, "batch_size", [])
        timed = {key: family(HistogramMetricFamily, name, [])
                 for key, name in (("predicted_ms", "batch_predicted_ms"), ("run_ms", "batch_run_ms"),
                                   ("slack_ms", "batch_slack_ms"))}
        slowdown = family(GaugeMetricFamily, "slowdown_factor", [])
        queue = family(GaugeMetricFamily, "queue_depth", [])
        slo = family(GaugeMetricFamily, "slo_ms", [])
        for s in self.snapshots:
            r = str(s["replica"])
            for option, per_depth in sorted(s["answers"].items()):
                for depth, n in sorted(per_depth.items(), key=lambda kv: int(kv[0])):
                    requests.add_metric([r, depth, option], n)
            answers.add_metric([r, "on_time", "200"], s["on_time"])
            answers.add_metric([r, "late", "200"], s["late"])
            for outcome, by_status in (("shed", {"503": 0, **s["shed"]}), ("expired", {"504": s["expired"]}),
                                       ("error", s["errors"])):
                for status, n in sorted(by_status.items()):
                    answers.add_metric([r, outcome, status], n)
            for option, fits in sorted(s["batch_options"].items()):
                batches.add_metric([r, option, "true"], fits.get("fits", 0))
                batches.add_metric([r, option, "false"], fits.get("misses", 0))
            lat = s["latency_ms"]
            latency.add_metric([r], _latency_buckets(lat), lat["sum"])
            sizes = s["batch_sizes"]
            size.add_metric([r], _size_buckets(sizes), float(sum(int(k) * n for k, n in sizes.items())))
            for key, bounds in (("predicted_ms", BATCH_MS_BUCKETS), ("run_ms", BATCH_MS_BUCKETS),
                                ("slack_ms", SLACK_MS_BUCKETS)):
                h = s[key]
                timed[key].add_metric([r], _cumulative(bounds, h["buckets"]), h["sum"])
            factor = (s.get("controller") or {}).get("global_factor")
            if isinstance(factor, (int, float)) and math.isfinite(factor):
                slowdown.add_metric([r], float(factor))
            if s.get("queue_depth") is not None:
                queue.add_metric([r], float(s["queue_depth"]))
            slo.add_metric([r], float(s["slo_ms"]))
        yield from (requests, answers, batches, latency, size, *timed.values(), slowdown, queue, slo)


def prometheus_text(snapshots: Sequence[Dict[str, Any]]) -> bytes:
    """``snapshots`` (of :meth:`ServingStats.snapshot`, the latest per replica counts) in the
    Prometheus text format 0.0.4 (:data:`CONTENT_TYPE`): the body of ``GET /metrics``.

    Example:
        >>> from coopnets.serving.stats import ServingStats
        >>> stats = ServingStats(slo_ms=100, num_depths=2, replica="r1")
        >>> stats.record_answer(40.0, depth=1, option="depth1"); stats.record_shed(503)
        >>> lines = prometheus_text([stats.snapshot()]).decode().splitlines()
        >>> print("\\n".join(x for x in lines if x.startswith(("coopnets_requests_total", "coopnets_answers"))))
        coopnets_requests_total{depth="1",option="depth1",replica="r1"} 1.0
        coopnets_answers_total{outcome="on_time",replica="r1",status="200"} 1.0
        coopnets_answers_total{outcome="late",replica="r1",status="200"} 0.0
        coopnets_answers_total{outcome="shed",replica="r1",status="503"} 1.0
        coopnets_answers_total{outcome="expired",replica="r1",status="504"} 0.0
    """
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshots))  # type: ignore[arg-type]
    return generate_latest(registry)


# --- Ray ----------------------------------------------------------------------------------
class _RaySink:
    """:class:`MetricSink` into ``ray.serve.metrics`` (see :func:`ray_sink`)."""

    def __init__(self, num_depths: int) -> None:
        from ray.serve import metrics as rm  # imported here only: coopnets works without ray

        def name(key: str) -> str:
            return PREFIX + key

        self.requests = rm.Counter(name("requests"), description=HELP["requests"], tag_keys=("depth", "option"))
        self.answers = rm.Counter(name("answers"), description=HELP["answers"], tag_keys=("outcome", "status"))
        self.batches = rm.Counter(name("batches"), description=HELP["batches"], tag_keys=("option", "fits"))
        self.latency = rm.Histogram(name("latency_ms"), description=HELP["latency_ms"],
                                    boundaries=[float(b) for b in PROM_LATENCY_BUCKETS_MS], tag_keys=())
        self.batch_size = rm.Histogram(name("batch_size"), description=HELP["batch_size"],
                                       boundaries=[float(b) for b in BATCH_SIZE_BUCKETS], tag_keys=())
        self.predicted = rm.Histogram(name("batch_predicted_ms"), description=HELP["batch_predicted_ms"],
                                      boundaries=[float(b) for b in BATCH_MS_BUCKETS], tag_keys=())
        self.run = rm.Histogram(name("batch_run_ms"), description=HELP["batch_run_ms"],
                                boundaries=[float(b) for b in BATCH_MS_BUCKETS], tag_keys=())
        self.slack = rm.Histogram(name("batch_slack_ms"), description=HELP["batch_slack_ms"],
                                  boundaries=[float(b) for b in SLACK_MS_BUCKETS if b > 0], tag_keys=())
        self.slowdown = rm.Gauge(name("slowdown_factor"), description=HELP["slowdown_factor"], tag_keys=())
        self.queue = rm.Gauge(name("queue_depth"), description=HELP["queue_depth"], tag_keys=())
        self._depth_tags = {d: str(d) for d in range(1, int(num_depths) + 1)}

    def record_answer(self, latency_ms: float, depth: int, option: str, on_time: bool) -> None:
        self.requests.inc(1, tags={"depth": self._depth_tags.get(depth) or str(depth), "option": option})
        self.answers.inc(1, tags={"outcome": "on_time" if on_time else "late", "status": "200"})
        if math.isfinite(latency_ms):
            self.latency.observe(latency_ms, tags={})

    def record_batch(self, batch_size: int, option: str, predicted_ms: Optional[float], run_ms: Optional[float],
                     slack_ms: Optional[float], fits: bool) -> None:
        self.batches.inc(1, tags={"option": option, "fits": "true" if fits else "false"})
        self.batch_size.observe(batch_size, tags={})
        for hist, x in ((self.predicted, predicted_ms), (self.run, run_ms), (self.slack, slack_ms)):
            if x is not None:
                hist.observe(x, tags={})

    def record_shed(self, status: int) -> None:
        self.answers.inc(1, tags={"outcome": "shed", "status": str(status)})

    def record_expired(self) -> None:
        self.answers.inc(1, tags={"outcome": "expired", "status": "504"})

    def record_error(self, status: int) -> None:
        self.answers.inc(1, tags={"outcome": "error", "status": str(status)})

    def set_slowdown(self, factor: float) -> None:
        self.slowdown.set(factor, tags={})

    def set_queue_depth(self, n: int) -> None:
        self.queue.set(n, tags={})


def ray_sink(num_depths: int) -> MetricSink:
    """A :class:`MetricSink` recording into ``ray.serve.metrics`` (build it in the process that
    records: the replica's ``__init__``), exported by Ray's metrics agent as ``ray_coopnets_*``.

    Works inside a Ray Serve replica (Serve adds its ``deployment``/``replica``/``application``
    tags, so these series declare no ``replica`` tag of their own) and in any process connected
    to Ray (``ray.init``).

    Raises:
        ImportError: Ray Serve is not installed (``pip install "coopnets[serve]"``).
    """
    return _RaySink(num_depths)
