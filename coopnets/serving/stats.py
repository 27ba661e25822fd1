"""The statistics ``GET /stats`` reports, held by the ingress over every replica.

Example:
    >>> stats = ServingStats(slo_ms=100, num_depths=2)
    >>> stats.record(40.0, depth=1, replica="a"); stats.record(150.0, depth=2, replica="b"); stats.record_error(413)
    >>> s = stats.summary(); s["requests"], s["slo_attainment"], s["depth_histogram"], s["errors"]
    (2, 0.5, {'1': 1, '2': 1}, 1)
"""
from __future__ import annotations

import math
import time
from collections import deque
from typing import Any, Deque, Dict, Optional

#: latencies kept for the percentiles of ``/stats`` (the counts and attainment are exact over all requests)
LATENCY_WINDOW = 100_000


class ServingStats:
    """Counts and latencies of the answered requests, over all replicas.

    ``requests`` counts answered predictions; refused or failed ones are ``errors``
    (by status in ``errors_by_status``). ``p50_ms``/``p99_ms`` are over the last
    :data:`LATENCY_WINDOW` requests; ``slo_attainment`` and the histograms over all.
    """

    def __init__(self, slo_ms: float, num_depths: int, window: int = LATENCY_WINDOW) -> None:
        self.slo_ms, self.num_depths = float(slo_ms), int(num_depths)
        self.requests = self.on_time = 0
        self.depth_histogram: Dict[int, int] = {d: 0 for d in range(1, self.num_depths + 1)}
        self.errors_by_status: Dict[int, int] = {}
        self.latencies: Deque[float] = deque(maxlen=window)
        self.latency_sum = 0.0
        self.per_replica: Dict[str, Dict[str, Any]] = {}
        self.started = time.time()

    def record(self, latency_ms: float, depth: int, replica: str, controller: Optional[Dict[str, Any]] = None,
               batch_size: int = 1) -> None:
        self.requests += 1
        self.on_time += latency_ms <= self.slo_ms
        self.latencies.append(latency_ms)
        self.latency_sum += latency_ms
        self.depth_histogram[depth] = self.depth_histogram.get(depth, 0) + 1
        rep = self.per_replica.setdefault(replica, {
            "requests": 0, "on_time": 0, "batch_size_sum": 0, "depth_histogram": {d: 0 for d in self.depth_histogram}})
        rep["requests"] += 1
        rep["on_time"] += latency_ms <= self.slo_ms
        rep["batch_size_sum"] += batch_size
        rep["depth_histogram"][depth] = rep["depth_histogram"].get(depth, 0) + 1
        if controller is not None:
            rep["controller"] = controller

    def record_error(self, status: int) -> None:
        self.errors_by_status[status] = self.errors_by_status.get(status, 0) + 1

    def summary(self) -> Dict[str, Any]:
        lat = sorted(self.latencies)

        def pct(q: float) -> Optional[float]:
            if not lat:
                return None
            return round(lat[min(len(lat) - 1, max(0, math.ceil(q * len(lat)) - 1))], 3)

        per_replica = {
            rid: {
                "requests": r["requests"],
                "slo_attainment": r["on_time"] / r["requests"],
                "mean_batch_size": r["batch_size_sum"] / r["requests"],
                "depth_histogram": {str(d): n for d, n in sorted(r["depth_histogram"].items())},
                **({"controller": json_safe(r["controller"])} if "controller" in r else {}),
            }
            for rid, r in sorted(self.per_replica.items())
        }
        return {
            "requests": self.requests,
            "slo_ms": self.slo_ms,
            "slo_attainment": self.on_time / self.requests if self.requests else None,
            "p50_ms": pct(0.50),
            "p99_ms": pct(0.99),
            "mean_ms": round(self.latency_sum / self.requests, 3) if self.requests else None,
            "depth_histogram": {str(d): n for d, n in sorted(self.depth_histogram.items())},
            "errors": sum(self.errors_by_status.values()),
            "errors_by_status": {str(s): n for s, n in sorted(self.errors_by_status.items())},
            "per_replica": per_replica,
            "uptime_s": round(time.time() - self.started, 1),
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
