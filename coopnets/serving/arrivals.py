"""The arrival rate the controller must keep up with, from the arrivals the serving engine reports.

A batch that fits its own deadline can still lose the stream: if the option's throughput is
below the arrival rate, the queue grows batch after batch until every request is late. So the
engine tells the controller when requests arrive (:meth:`ArrivalRate.observe`), and the
controller only picks options whose throughput at full batches, ``max_batch_size /
predicted ms``, is at least :data:`CAPACITY_HEADROOM` times the rate over the last
:data:`RATE_WINDOW_S` seconds (SuperServe's SlackFit reasons the same way about batch sizes).

Example:
    >>> rate = ArrivalRate(window_s=1.0)
    >>> for i in range(50):
    ...     rate.observe(10.0 + i * 0.02)            # 50 requests/s for one second
    >>> round(rate.per_second(now=11.0))
    50
    >>> rate.per_second(now=20.0)                    # nothing arrived in the last second
    0.0
"""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Deque, Optional

#: seconds of arrivals the rate is measured over (short enough to follow a load step within a second)
RATE_WINDOW_S = 0.5
#: an option must serve this many times the arrival rate at full batches (utilisation <= 1 / headroom)
CAPACITY_HEADROOM = 1.15


class ArrivalRate:
    """Requests per second over a sliding window of arrival times (thread-safe)."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self.window_s = float(window_s)
        self._times: Deque[float] = deque()
        self._lock = threading.Lock()
        self.seen = False

    def observe(self, t: Optional[float] = None) -> None:
        """One request arrived at ``t`` (``time.perf_counter()`` seconds; default now)."""
        with self._lock:
            self._times.append(time.perf_counter() if t is None else float(t))
            self.seen = True

    def per_second(self, now: Optional[float] = None) -> float:
        """Arrivals per second over the last :attr:`window_s` seconds before ``now``."""
        now = time.perf_counter() if now is None else float(now)
        with self._lock:
            while self._times and self._times[0] < now - self.window_s:
                self._times.popleft()
            return len(self._times) / self.window_s
