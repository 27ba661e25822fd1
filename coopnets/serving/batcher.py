"""An in-process dynamic batcher in front of a :class:`~coopnets.serving.DepthController`, engine-free.

:meth:`DynamicBatcher.submit` queues one request (an image) with its arrival timestamp and
returns a :class:`concurrent.futures.Future`. One worker thread takes up to
``max_batch_size`` waiting requests; with fewer waiting it waits at most
``batch_wait_timeout_s`` for more (the semantics of Ray Serve's ``@serve.batch``), then
calls ``controller.run(batch, waited_ms, backlog_waited_ms=...)``, which decides the depth
from the requests' waits (and the queue behind them), runs and learns. Each future
resolves to a :class:`ServedResult` whose ``latency_ms`` counts from the request's
arrival timestamp, so queueing is included; pass the scheduled send time as ``arrival``
from an open-loop load generator to avoid coordinated omission.

Example:
    >>> import torch, coopnets
    >>> from coopnets.serving import DepthController, DynamicBatcher
    >>> m = coopnets.wrap("test_resnet", num_classes=10).eval()
    >>> ctl = DepthController.for_model(m, slo_ms=1e4, accuracies=[0.6, 0.7, 0.8, 0.9], input_size=(3, 32, 32),
    ...                                 max_batch_size=4, profile_batch_sizes=[1, 4], repeats=1)
    >>> with DynamicBatcher(ctl, max_batch_size=4, batch_wait_timeout_s=0.002) as batcher:
    ...     futures = [batcher.submit(torch.randn(3, 32, 32)) for _ in range(6)]
    ...     results = [f.result(timeout=30) for f in futures]
    >>> [r.logits.shape[0] for r in results] == [10] * 6, all(r.on_time for r in results)
    (True, True)
    >>> batcher.stats()["requests"], batcher.stats()["max_batch_size_seen"] <= 4
    (6, True)
"""
from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, List, Optional

import torch
from torch import Tensor

from .controller import Decision, DepthController


@dataclass
class ServedResult:
    """One request's answer.

    Attributes:
        logits: (C,) logits of the request.
        depth: the depth its sample ran to (early exit: where it left).
        latency_ms: from its arrival timestamp to the answer (queueing included).
        on_time: ``latency_ms <= slo_ms``.
        decision: the batch's :class:`~coopnets.serving.Decision`.
    """

    logits: Tensor
    depth: int
    latency_ms: float
    on_time: bool
    decision: Decision


@dataclass
class _Request:
    x: Tensor
    arrival: float
    future: "Future[ServedResult]"


class DynamicBatcher:
    """Queue + one worker thread that forms batches and serves them through a controller.

    Args:
        controller: a :class:`DepthController` (anything with ``run(x, waited_ms, backlog_waited_ms=)``
            and ``slo_ms``).
        max_batch_size: the most requests per batch.
        batch_wait_timeout_s: how long to wait for a fuller batch once one request is taken.
        clock: the clock of the arrival timestamps, in seconds (default ``time.perf_counter``).
        start: start the worker now (else call :meth:`start`).
    """

    def __init__(
        self,
        controller: DepthController,
        max_batch_size: int = 8,
        batch_wait_timeout_s: float = 0.0,
        *,
        clock: Callable[[], float] = time.perf_counter,
        start: bool = True,
        keep_latencies: int = 100_000,
    ) -> None:
        if max_batch_size < 1 or batch_wait_timeout_s < 0:
            raise ValueError("need max_batch_size >= 1 and batch_wait_timeout_s >= 0.")
        self.controller = controller
        self.max_batch_size = int(max_batch_size)
        self.batch_wait_timeout_s = float(batch_wait_timeout_s)
        self.clock = clock
        self._queue: Deque[_Request] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread: Optional[threading.Thread] = None
        self._latencies: Deque[float] = deque(maxlen=keep_latencies)
        self._batch_sizes: Dict[int, int] = {}
        self._requests = self._on_time = self._batches = self._errors = 0
        if start:
            self.start()

    # --- life cycle ---------------------------------------------------------------------
    def start(self) -> "DynamicBatcher":
        """Start the worker thread (once)."""
        with self._cond:
            if self._closed:
                raise RuntimeError("This DynamicBatcher is closed.")
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="coopnets-batcher", daemon=True)
                self._thread.start()
        return self

    def close(self, timeout: Optional[float] = None) -> None:
        """Stop taking requests, serve those already queued, and stop the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        else:  # never started: nothing will serve what is queued
            self._fail_queued(RuntimeError("DynamicBatcher closed before it was started."))

    def __enter__(self) -> "DynamicBatcher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- requests -----------------------------------------------------------------------
    def submit(self, x: Tensor, arrival: Optional[float] = None) -> "Future[ServedResult]":
        """Queue one image ``x`` ((C, H, W) or (1, C, H, W)) that arrived at ``arrival`` (default: now)."""
        if x.ndim == 4:
            if x.shape[0] != 1:
                raise ValueError(f"submit takes one image, (C, H, W) or (1, C, H, W); got {tuple(x.shape)}.")
            x = x[0]
        request = _Request(x, self.clock() if arrival is None else float(arrival), Future())
        self.controller.observe_arrival()  # the arrival rate, on the controller's own clock
        with self._cond:
            if self._closed:
                raise RuntimeError("This DynamicBatcher is closed.")
            self._queue.append(request)
            self._cond.notify()
        return request.future

    def __call__(self, x: Tensor, arrival: Optional[float] = None, timeout: Optional[float] = None) -> ServedResult:
        """:meth:`submit` and wait for the answer."""
        return self.submit(x, arrival).result(timeout)

    @property
    def queued(self) -> int:
        """Requests waiting for a batch."""
        return len(self._queue)

    # --- the worker ---------------------------------------------------------------------
    def _take_batch(self) -> Optional[List[_Request]]:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None  # closed and drained
            deadline = self.clock() + self.batch_wait_timeout_s
            while len(self._queue) < self.max_batch_size and not self._closed:
                remaining = deadline - self.clock()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            n = min(self.max_batch_size, len(self._queue))
            return [self._queue.popleft() for _ in range(n)]

    def _work(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            self._serve(batch)

    def _serve(self, batch: List[_Request]) -> None:
        now = self.clock()
        waited = [(now - r.arrival) * 1e3 for r in batch]
        with self._cond:
            backlog = [(now - r.arrival) * 1e3 for _, r in zip(range(self.max_batch_size), self._queue)]
        try:
            x = torch.stack([r.x for r in batch])
            logits, depths, decision = self.controller.run(x, waited, backlog_waited_ms=backlog)
            depths = depths.tolist()
        except BaseException as err:  # every request of the batch learns why
            self._errors += len(batch)
            for r in batch:
                r.future.set_exception(err)
            return
        done = self.clock()
        slo = self.controller.slo_ms
        self._batches += 1
        self._batch_sizes[len(batch)] = self._batch_sizes.get(len(batch), 0) + 1
        for i, r in enumerate(batch):
            latency = (done - r.arrival) * 1e3
            self._latencies.append(latency)
            self._requests += 1
            self._on_time += latency <= slo
            r.future.set_result(ServedResult(logits[i], int(depths[i]), latency, latency <= slo, decision))

    def _fail_queued(self, err: BaseException) -> None:
        with self._cond:
            pending, self._queue = list(self._queue), deque()
        for r in pending:
            r.future.set_exception(err)

    # --- bookkeeping --------------------------------------------------------------------
    def stats(self) -> Dict[str, Any]:
        """``requests`` answered, ``errors``, ``batches``, ``batch_sizes`` (histogram), ``max_batch_size_seen``,
        ``mean_batch_size``, ``on_time``, ``slo_attainment``, ``p50_ms``/``p99_ms`` (of the kept latencies)."""
        lat = sorted(self._latencies)

        def pct(q: float) -> float:
            return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")

        sizes = dict(self._batch_sizes)
        return {
            "requests": self._requests,
            "errors": self._errors,
            "batches": self._batches,
            "batch_sizes": sizes,
            "max_batch_size_seen": max(sizes, default=0),
            "mean_batch_size": self._requests / self._batches if self._batches else 0.0,
            "on_time": self._on_time,
            "slo_attainment": self._on_time / self._requests if self._requests else float("nan"),
            "p50_ms": pct(0.5),
            "p99_ms": pct(0.99),
        }
