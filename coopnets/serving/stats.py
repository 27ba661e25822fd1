"""Serving statistics in one home: the counters ``GET /stats``, ``GET /metrics`` and Ray's metrics export read.

Every server process, or every Ray Serve replica, holds one :class:`ServingStats` and
records each event on its request path (O(1), under a lock):

* :meth:`~ServingStats.record_answer` -- a 200 answer, *on time* iff ``latency_ms <= slo_ms``;
* :meth:`~ServingStats.record_batch` -- a batch the :class:`~coopnets.serving.DepthController`
  decided and ran (its :class:`~coopnets.serving.Decision`);
* :meth:`~ServingStats.record_shed` (503/429, refused at admission), :meth:`~ServingStats.record_expired`
  (504, the deadline passed while queued), :meth:`~ServingStats.record_error` (any other 4xx/5xx);
* :meth:`~ServingStats.set_controller` / :meth:`~ServingStats.set_queue_depth` -- gauges.

:meth:`~ServingStats.snapshot` is a plain, JSON-safe dict (see its docstring for the keys);
snapshots of several replicas merge exactly (:func:`merge_snapshots`): counts add, and
latencies are kept as counts in fixed buckets, so no replica ships raw latencies.
:func:`summarize` turns snapshots into the body of ``GET /stats``;
:func:`coopnets.serving.metrics.prometheus_text` into the body of ``GET /metrics``.

Percentiles: latencies fall into :data:`LATENCY_BOUNDS_MS`, log-spaced buckets about 2 %
wide (ratio :data:`LATENCY_RATIO`) from :data:`LATENCY_MIN_MS` (0.05 ms) to
:data:`LATENCY_MAX_MS` (60 s), plus the Prometheus boundaries :data:`PROM_LATENCY_BUCKETS_MS`
(so those counts are exact). A percentile (nearest rank) is reported as the upper bound of
the bucket holding it, clamped to the observed ``[min, max]``: never below the exact value
and at most one bucket (~2 %) above it, whether it comes from one replica or many. Below
0.05 ms the error is under 0.05 ms; beyond 60 s the observed maximum is reported.
``mean_ms``, ``slo_attainment`` and every count are exact.

Example (two replicas, merged):
    >>> a = ServingStats(slo_ms=100, num_depths=2, replica="a")
    >>> b = ServingStats(slo_ms=100, num_depths=2, replica="b")
    >>> a.record_answer(40.0, depth=1, option="depth1"); b.record_answer(150.0, depth=2, option="depth2")
    >>> b.record_shed(503); a.record_expired(); a.record_error(413)
    >>> s = summarize([a.snapshot(), b.snapshot()])
    >>> s["requests"], s["slo_attainment"], s["on_time"], s["late"], s["depth_histogram"]
    (2, 0.5, 1, 1, {'1': 1, '2': 1})
    >>> s["shed"], s["expired"], s["errors"], s["errors_by_status"]
    (1, 1, 3, {'413': 1, '503': 1, '504': 1})
    >>> s["mean_ms"], s["p99_ms"], sorted(s["per_replica"])
    (95.0, 150.0, ['a', 'b'])
"""
from __future__ import annotations

import logging
import math
import threading
import time
from bisect import bisect_left
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Protocol, Sequence, Tuple

if TYPE_CHECKING:
    from .controller import Decision

log = logging.getLogger(__name__)

#: version of the snapshot format; snapshots of different versions do not merge
SCHEMA = 1

#: the fine latency buckets: log-spaced by this ratio (about 2 % wide) ...
LATENCY_RATIO = 1.02
#: ... from this bound (everything at or below it shares the first bucket) ...
LATENCY_MIN_MS = 0.05
#: ... to this one (beyond it: one overflow bucket; percentiles there report the observed max)
LATENCY_MAX_MS = 60_000.0
#: the latency histogram's ``le`` boundaries in ``GET /metrics`` (ms); also fine-bucket bounds, so exact
PROM_LATENCY_BUCKETS_MS: Tuple[float, ...] = (1, 2.5, 5, 10, 25, 50, 75, 100, 150, 200, 250, 300, 400, 500, 750,
                                              1000, 2500, 5000, 10000, 30000, 60000)
#: the boundaries of the batch time histograms (predicted and measured run time, ms)
BATCH_MS_BUCKETS: Tuple[float, ...] = (0.5, 1, 2.5, 5, 10, 25, 50, 75, 100, 150, 200, 300, 500, 750, 1000,
                                       2500, 5000, 10000)
#: the boundaries of the slack-at-decision histogram (ms; <= 0: the batch was already late)
SLACK_MS_BUCKETS: Tuple[float, ...] = (-1000, -100, -10, 0, 1, 2.5, 5, 10, 25, 50, 75, 100, 150, 200, 300, 500,
                                       750, 1000, 2500, 5000, 10000)
#: the boundaries of the batch size histogram in ``GET /metrics`` (``/stats`` has every size exactly)
BATCH_SIZE_BUCKETS: Tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def _latency_bounds() -> Tuple[float, ...]:
    grid, x = [], LATENCY_MIN_MS
    while True:
        grid.append(float(f"{x:.6g}"))
        if x >= LATENCY_MAX_MS:
            break
        x *= LATENCY_RATIO
    return tuple(sorted(set(grid) | {float(b) for b in PROM_LATENCY_BUCKETS_MS}))


#: upper bounds of the fine latency buckets (bucket ``i`` holds ``bounds[i-1] < x <= bounds[i]``; one more
#: bucket, index ``len(bounds)``, holds everything above the last bound)
LATENCY_BOUNDS_MS: Tuple[float, ...] = _latency_bounds()


class _Histogram:
    """Counts in fixed buckets (``bounds[i-1] < x <= bounds[i]``, plus an overflow bucket), sum, min, max."""

    __slots__ = ("bounds", "counts", "count", "sum", "min", "max")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.count, self.sum = 0, 0.0
        self.min = self.max = None  # type: Optional[float]

    def observe(self, x: float) -> None:
        self.counts[bisect_left(self.bounds, x)] += 1
        self.count += 1
        self.sum += x
        self.min = x if self.min is None or x < self.min else self.min
        self.max = x if self.max is None or x > self.max else self.max

    def dump(self, sparse: bool) -> Dict[str, Any]:
        buckets: Any = ({str(i): n for i, n in enumerate(self.counts) if n} if sparse else list(self.counts))
        return {"count": self.count, "sum": self.sum, "min": self.min, "max": self.max, "buckets": buckets}


def _finite(x: Any) -> Optional[float]:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _inc(d: Dict[str, int], key: str, n: int = 1) -> None:
    d[key] = d.get(key, 0) + n


class MetricSink(Protocol):
    """Receives every event a :class:`ServingStats` records (after its own
    counters moved). Times in ms; ``predicted_ms``/``run_ms``/``slack_ms`` are ``None`` when not finite."""

    def record_answer(self, latency_ms: float, depth: int, option: str, on_time: bool) -> None: ...

    def record_batch(self, batch_size: int, option: str, predicted_ms: Optional[float], run_ms: Optional[float],
                     slack_ms: Optional[float], fits: bool) -> None: ...

    def record_shed(self, status: int) -> None: ...

    def record_expired(self) -> None: ...

    def record_error(self, status: int) -> None: ...

    def set_slowdown(self, factor: float) -> None: ...

    def set_queue_depth(self, n: int) -> None: ...


class ServingStats:
    """The counters of one server process or replica (thread-safe; O(1) per event).

    Args:
        slo_ms: the latency objective; an answer is on time iff ``latency_ms <= slo_ms``.
        num_depths: the model's depths (every depth appears in the histograms, zeros included).
        replica: this replica's id, the ``replica`` label of its series.
        sink: also forward every event to this :class:`~coopnets.serving.metrics.MetricSink`
            (e.g. :func:`~coopnets.serving.metrics.ray_sink`); its failures are logged once, never raised.
    """

    def __init__(self, slo_ms: float, num_depths: int, replica: str = "local",
                 sink: Optional["MetricSink"] = None) -> None:
        if not slo_ms > 0:
            raise ValueError(f"slo_ms must be > 0, got {slo_ms!r}.")
        if int(num_depths) < 1:
            raise ValueError(f"num_depths must be >= 1, got {num_depths!r}.")
        self.slo_ms, self.num_depths, self.replica = float(slo_ms), int(num_depths), str(replica)
        self.sink = sink
        self._sink_failed = False
        self._lock = threading.Lock()
        self.started = time.time()
        self.on_time = self.late = self.expired = 0
        self.answers: Dict[str, Dict[str, int]] = {}  # option -> depth -> answered requests
        self.shed_by_status: Dict[str, int] = {}
        self.errors_by_status: Dict[str, int] = {}
        self.latency = _Histogram(LATENCY_BOUNDS_MS)
        self.batch_sizes: Dict[str, int] = {}
        self.batch_options: Dict[str, Dict[str, int]] = {}  # option -> {"fits": n, "misses": n}
        self.predicted_ms = _Histogram(BATCH_MS_BUCKETS)
        self.run_ms = _Histogram(BATCH_MS_BUCKETS)
        self.slack_ms = _Histogram(SLACK_MS_BUCKETS)
        self.controller: Optional[Dict[str, Any]] = None
        self.queue_depth: Optional[int] = None

    # --- events -----------------------------------------------------------------------
    def record_answer(self, latency_ms: float, depth: int, option: str) -> None:
        """A 200 answer of ``latency_ms`` (from arrival), run at ``depth`` by ``option``."""
        latency_ms, depth, option = float(latency_ms), int(depth), str(option)
        on_time = latency_ms <= self.slo_ms
        with self._lock:
            if on_time:
                self.on_time += 1
            else:
                self.late += 1
            per_option = self.answers.get(option)
            if per_option is None:
                per_option = self.answers[option] = {}
            _inc(per_option, str(depth))
            if math.isfinite(latency_ms):
                self.latency.observe(latency_ms)
        self._emit("record_answer", latency_ms, depth, option, on_time)

    def record_batch(self, decision: "Decision") -> None:
        """A batch decided (and run): its size, option, predicted and measured time, slack, fit.

        ``decision`` is a :class:`~coopnets.serving.Decision` (or anything with its attributes;
        ``option`` may be a name). Non-finite times (``run_ms`` NaN: not run) are left out of
        their histogram.
        """
        size = int(decision.batch_size)
        option = str(getattr(decision.option, "name", decision.option))
        fits = bool(decision.fits)
        predicted, run, slack = (_finite(getattr(decision, k, None)) for k in ("predicted_ms", "run_ms", "slack_ms"))
        with self._lock:
            _inc(self.batch_sizes, str(size))
            per_option = self.batch_options.get(option)
            if per_option is None:
                per_option = self.batch_options[option] = {"fits": 0, "misses": 0}
            per_option["fits" if fits else "misses"] += 1
            for hist, x in ((self.predicted_ms, predicted), (self.run_ms, run), (self.slack_ms, slack)):
                if x is not None:
                    hist.observe(x)
        self._emit("record_batch", size, option, predicted, run, slack, fits)

    def record_shed(self, status: int = 503) -> None:
        """A request refused at admission (503 or 429), never computed."""
        with self._lock:
            _inc(self.shed_by_status, str(int(status)))
        self._emit("record_shed", int(status))

    def record_expired(self) -> None:
        """A 504: the request's deadline passed while it was queued; never computed."""
        with self._lock:
            self.expired += 1
        self._emit("record_expired")

    def record_error(self, status: int) -> None:
        """Any other 4xx/5xx answer (bad request, too large, replica failure...)."""
        with self._lock:
            _inc(self.errors_by_status, str(int(status)))
        self._emit("record_error", int(status))

    def set_controller(self, stats: Dict[str, Any]) -> None:
        """The latest :meth:`DepthController.stats() <coopnets.serving.DepthController.stats>` (its
        ``global_factor`` is the latency model's slowdown factor)."""
        safe = json_safe(dict(stats))
        with self._lock:
            self.controller = safe
        factor = _finite(safe.get("global_factor"))
        if factor is not None:
            self._emit("set_slowdown", factor)

    def set_queue_depth(self, n: int) -> None:
        """Requests waiting for a batch right now (a gauge)."""
        with self._lock:
            self.queue_depth = int(n)
        self._emit("set_queue_depth", int(n))

    def _emit(self, method: str, *args: Any) -> None:
        sink = self.sink
        if sink is None:
            return
        try:
            getattr(sink, method)(*args)
        except Exception:  # metrics must never fail a request
            if not self._sink_failed:
                self._sink_failed = True
                log.warning("metric sink %r failed on %s; its later failures are not logged", sink, method,
                            exc_info=True)

    # --- reading ----------------------------------------------------------------------
    @property
    def requests(self) -> int:
        return self.on_time + self.late

    def snapshot(self) -> Dict[str, Any]:
        """The counters so far, as a plain JSON-safe dict that merges exactly with other replicas'.

        Keys: ``schema`` (:data:`SCHEMA`), ``replica``, ``time`` (unix s of the snapshot),
        ``started`` (unix s), ``slo_ms``, ``num_depths``, ``on_time``, ``late``,
        ``answers`` ({option: {depth: n}}, answered requests), ``shed`` ({status: n}),
        ``expired``, ``errors`` ({status: n}, other errors), ``batch_sizes`` ({size: n}),
        ``batch_options`` ({option: {"fits": n, "misses": n}}), ``latency_ms`` (answers;
        ``count``, ``sum``, ``min``, ``max``, ``buckets``: {index in :data:`LATENCY_BOUNDS_MS`:
        n}, nonzero only), ``predicted_ms``, ``run_ms`` (:data:`BATCH_MS_BUCKETS`),
        ``slack_ms`` (:data:`SLACK_MS_BUCKETS`; these three with ``buckets`` a full list),
        ``controller`` (the latest controller stats or ``None``), ``queue_depth`` (or ``None``).
        Every dict key is a string.
        """
        with self._lock:
            return {
                "schema": SCHEMA,
                "replica": self.replica,
                "time": time.time(),
                "started": self.started,
                "slo_ms": self.slo_ms,
                "num_depths": self.num_depths,
                "on_time": self.on_time,
                "late": self.late,
                "answers": {o: dict(d) for o, d in self.answers.items()},
                "shed": dict(self.shed_by_status),
                "expired": self.expired,
                "errors": dict(self.errors_by_status),
                "batch_sizes": dict(self.batch_sizes),
                "batch_options": {o: dict(d) for o, d in self.batch_options.items()},
                "latency_ms": self.latency.dump(sparse=True),
                "predicted_ms": self.predicted_ms.dump(sparse=False),
                "run_ms": self.run_ms.dump(sparse=False),
                "slack_ms": self.slack_ms.dump(sparse=False),
                "controller": self.controller,
                "queue_depth": self.queue_depth,
            }

    def summary(self) -> Dict[str, Any]:
        """``summarize([self.snapshot()])``."""
        return summarize([self.snapshot()])


# --- merging ------------------------------------------------------------------------------
def latest_per_replica(snapshots: Iterable[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One snapshot per replica id (the latest by ``time``: snapshots are cumulative), sorted by
    replica id.

    Raises:
        ValueError: a snapshot of another :data:`SCHEMA` version.
    """
    latest: Dict[str, Dict[str, Any]] = {}
    for s in snapshots:
        if s.get("schema") != SCHEMA:
            raise ValueError(f"snapshot of replica {s.get('replica')!r} has schema {s.get('schema')!r}, "
                             f"expected {SCHEMA}: every replica must run the same coopnets version.")
        rid = str(s["replica"])
        if rid not in latest or s["time"] >= latest[rid]["time"]:
            latest[rid] = s
    return [latest[r] for r in sorted(latest)]


def _add_counts(into: Dict[str, Any], other: Dict[str, Any]) -> None:
    for k, v in other.items():
        if isinstance(v, dict):
            _add_counts(into.setdefault(k, {}), v)
        else:
            into[k] = into.get(k, 0) + v


def _merge_hist(hists: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    mins = [h["min"] for h in hists if h["min"] is not None]
    maxs = [h["max"] for h in hists if h["max"] is not None]
    out = {"count": sum(h["count"] for h in hists), "sum": sum(h["sum"] for h in hists),
           "min": min(mins) if mins else None, "max": max(maxs) if maxs else None}
    if hists and isinstance(hists[0]["buckets"], dict):
        buckets: Dict[str, int] = {}
        for h in hists:
            _add_counts(buckets, h["buckets"])
        out["buckets"] = {k: buckets[k] for k in sorted(buckets, key=int)}
    else:
        out["buckets"] = [sum(col) for col in zip(*(h["buckets"] for h in hists))]
    return out


def merge_snapshots(snapshots: Sequence[Dict[str, Any]], replica: str = "all") -> Dict[str, Any]:
    """One snapshot holding the counts of all ``snapshots`` (the latest of each replica): what a
    single :class:`ServingStats` that saw every replica's events would report.

    Counts and histograms add (exactly; float sums up to rounding); ``min``/``max`` combine;
    ``started`` is the earliest, ``time`` the latest, ``slo_ms``/``num_depths`` the latest
    snapshot's (the largest ``num_depths``); ``queue_depth`` the sum of the known ones;
    ``controller`` is ``None`` (controllers are per replica: see ``per_replica`` of :func:`summarize`).
    """
    snaps = latest_per_replica(snapshots)
    if not snaps:
        raise ValueError("merge_snapshots needs at least one snapshot.")
    freshest = max(snaps, key=lambda s: s["time"])
    merged: Dict[str, Any] = {
        "schema": SCHEMA, "replica": replica, "time": freshest["time"], "started": min(s["started"] for s in snaps),
        "slo_ms": freshest["slo_ms"], "num_depths": max(s["num_depths"] for s in snaps),
        "on_time": 0, "late": 0, "answers": {}, "shed": {}, "expired": 0, "errors": {}, "batch_sizes": {},
        "batch_options": {},
    }
    for s in snaps:
        _add_counts(merged, {k: s[k] for k in ("on_time", "late", "answers", "shed", "expired", "errors",
                                               "batch_sizes", "batch_options")})
    for key in ("latency_ms", "predicted_ms", "run_ms", "slack_ms"):
        merged[key] = _merge_hist([s[key] for s in snaps])
    depths = [s["queue_depth"] for s in snaps if s.get("queue_depth") is not None]
    merged["controller"] = None
    merged["queue_depth"] = sum(depths) if depths else None
    return merged


# --- reading snapshots --------------------------------------------------------------------
def latency_percentile(hist: Dict[str, Any], q: float) -> Optional[float]:
    """The ``q``-quantile (nearest rank, ``0 < q <= 1``) of a snapshot's ``latency_ms``: the upper
    bound of its bucket, clamped to the observed ``[min, max]`` (see the module docstring)."""
    n = hist["count"]
    if not n:
        return None
    rank = min(n, max(1, math.ceil(q * n)))
    seen = 0
    for index, count in sorted(((int(i), c) for i, c in hist["buckets"].items())):
        seen += count
        if seen >= rank:
            upper = LATENCY_BOUNDS_MS[index] if index < len(LATENCY_BOUNDS_MS) else math.inf
            return min(max(upper, hist["min"]), hist["max"])
    return hist["max"]


def _depth_histogram(answers: Dict[str, Dict[str, int]], num_depths: int) -> Dict[str, int]:
    hist = {str(d): 0 for d in range(1, num_depths + 1)}
    for per_depth in answers.values():
        _add_counts(hist, per_depth)
    return {k: hist[k] for k in sorted(hist, key=int)}


def _batch_stats(s: Dict[str, Any]) -> Tuple[int, Optional[float], int]:
    batches = sum(s["batch_sizes"].values())
    samples = sum(int(k) * n for k, n in s["batch_sizes"].items())
    misses = sum(d.get("misses", 0) for d in s["batch_options"].values())
    return batches, (samples / batches if batches else None), misses


def _round(x: Optional[float], digits: int = 3) -> Optional[float]:
    return None if x is None else round(x, digits)


def summarize(snapshots: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """The body of ``GET /stats`` over ``snapshots`` (one per replica; of several with the same
    replica id, the latest counts).

    Keys: ``requests`` (200 answers), ``slo_ms``, ``slo_attainment`` (share of ``requests``
    with latency <= ``slo_ms``; ``None`` with none), ``on_time``, ``late``, ``p50_ms``,
    ``p99_ms`` (within one latency bucket, ~2 %, above the exact value; see the module
    docstring), ``mean_ms``, ``depth_histogram`` ({"1": n, ...}, every depth),
    ``options`` (requests by serving option), ``errors`` (every non-200 answer: shed,
    expired and the others), ``errors_by_status`` (the same by status), ``shed`` (refused at
    admission, 503/429), ``expired`` (504), ``batches``, ``batch_size_histogram`` ({size: n}),
    ``mean_batch_size`` (mean size of the batches run), ``misses`` (batches no option fit),
    ``queue_depth`` (summed over the replicas reporting it, else ``None``), ``per_replica``
    ({replica: ``requests``, ``on_time``, ``slo_attainment``, ``mean_batch_size``,
    ``depth_histogram``, ``options``, ``batches``, ``shed``, ``expired``, ``errors``,
    ``queue_depth``, ``snapshot_age_s``, and ``controller``, its latest controller counters,
    when set}), ``uptime_s`` (since the earliest replica started).
    """
    now = time.time()
    snaps = latest_per_replica(snapshots)
    if not snaps:
        return {"requests": 0, "slo_ms": None, "slo_attainment": None, "on_time": 0, "late": 0, "p50_ms": None,
                "p99_ms": None, "mean_ms": None, "depth_histogram": {}, "options": {}, "errors": 0,
                "errors_by_status": {}, "shed": 0, "expired": 0, "batches": 0, "batch_size_histogram": {},
                "mean_batch_size": None, "misses": 0, "queue_depth": None, "per_replica": {}, "uptime_s": 0.0}
    m = merge_snapshots(snaps)
    per_replica = {}
    for s in snaps:
        requests = s["on_time"] + s["late"]
        batches, mean_batch, _ = _batch_stats(s)
        per_replica[s["replica"]] = {
            "requests": requests,
            "on_time": s["on_time"],
            "slo_attainment": s["on_time"] / requests if requests else None,
            "mean_batch_size": mean_batch,
            "depth_histogram": _depth_histogram(s["answers"], s["num_depths"]),
            "options": {o: sum(d.values()) for o, d in sorted(s["answers"].items())},
            "batches": batches,
            "shed": sum(s["shed"].values()),
            "expired": s["expired"],
            "errors": sum(s["shed"].values()) + s["expired"] + sum(s["errors"].values()),
            "queue_depth": s.get("queue_depth"),
            "snapshot_age_s": round(max(0.0, now - s["time"]), 3),
            **({"controller": s["controller"]} if s.get("controller") is not None else {}),
        }
    requests = m["on_time"] + m["late"]
    lat = m["latency_ms"]
    by_status: Dict[str, int] = {}
    _add_counts(by_status, m["errors"])
    _add_counts(by_status, m["shed"])
    if m["expired"]:
        _add_counts(by_status, {"504": m["expired"]})
    batches, mean_batch, misses = _batch_stats(m)
    return {
        "requests": requests,
        "slo_ms": m["slo_ms"],
        "slo_attainment": m["on_time"] / requests if requests else None,
        "on_time": m["on_time"],
        "late": m["late"],
        "p50_ms": _round(latency_percentile(lat, 0.50)),
        "p99_ms": _round(latency_percentile(lat, 0.99)),
        "mean_ms": _round(lat["sum"] / lat["count"]) if lat["count"] else None,
        "depth_histogram": _depth_histogram(m["answers"], m["num_depths"]),
        "options": {o: sum(d.values()) for o, d in sorted(m["answers"].items())},
        "errors": sum(by_status.values()),
        "errors_by_status": {k: by_status[k] for k in sorted(by_status, key=int)},
        "shed": sum(m["shed"].values()),
        "expired": m["expired"],
        "batches": batches,
        "batch_size_histogram": {k: m["batch_sizes"][k] for k in sorted(m["batch_sizes"], key=int)},
        "mean_batch_size": mean_batch,
        "misses": misses,
        "queue_depth": m["queue_depth"],
        "per_replica": per_replica,
        "uptime_s": round(max(0.0, now - m["started"]), 1),
    }


def json_safe(obj: Any) -> Any:
    """``obj`` with dict keys as strings and non-finite floats as ``None`` (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
