"""An in-process dynamic batcher in front of a :class:`~coopnets.serving.DepthController`, engine-free.

:meth:`DynamicBatcher.submit` queues one request (an image) with its arrival timestamp and
its deadline, and returns a :class:`concurrent.futures.Future`. One worker thread takes up
to ``max_batch_size`` waiting requests; with fewer waiting it waits at most
``batch_wait_timeout_s`` for more (the semantics of Ray Serve's ``@serve.batch``), then
calls ``controller.run(batch, waited_ms, backlog_waited_ms=...)``, which decides the depth
from the time each request has left (and the queue behind it), runs and learns.

Deadlines. A request's deadline is its arrival plus the SLO, or earlier when the caller
gives one (a client's ``x-request-timeout-seconds``). The controller sees each request's
wait as ``slo_ms - time left``, so a batch's slack is its *tightest* deadline. A request
whose deadline passes while it is queued is never computed (``expire=True``, and always
through :meth:`DynamicBatcher.serve`): its future fails with :class:`DeadlineExpired` (the
worker drops it, or :meth:`DynamicBatcher.cancel` does at once). Each future resolves to a :class:`ServedResult` whose ``latency_ms`` counts from
the request's arrival timestamp, so queueing is included; pass the scheduled send time as
``arrival`` from an open-loop load generator to avoid coordinated omission.

Admission (``shed=True``). The queue is bounded (``max_queued``), and a request is refused
at once with :class:`Overloaded` when even the shallowest option, run at full batches,
cannot reach it before its deadline. Past capacity the excess is shed instead of queued,
so the admitted requests keep their deadlines.

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

import asyncio
import math
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, List, Optional

import torch
from torch import Tensor

from .controller import Decision, DepthController


#: an idle batcher admits a request with at least this share of the SLO left, whatever the latency model predicts
PROBE_SLO_SHARE = 0.5


class Overloaded(RuntimeError):
    """Refused at admission: the queue is full, or even the shallowest option cannot meet the deadline.

    Attributes:
        retry_after_s: when the queue ahead is expected to have drained, seconds (at least 1).
    """

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = max(1, math.ceil(retry_after_s))


class DeadlineExpired(RuntimeError):
    """The request's deadline passed while it was queued; it was not computed."""


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


@dataclass(eq=False)  # identity: a queue's remove() must not compare the images
class _Request:
    x: Tensor
    arrival: float
    deadline: float
    future: "Future[ServedResult]"


class DynamicBatcher:
    """Queue + one worker thread that forms batches and serves them through a controller.

    Args:
        controller: a :class:`DepthController` (anything with ``run(x, waited_ms, backlog_waited_ms=)``,
            ``slo_ms`` and, for ``shed``, ``shallowest_ms(n)``).
        max_batch_size: the most requests per batch.
        batch_wait_timeout_s: how long to wait for a fuller batch once one request is taken.
        clock: the clock of the arrival timestamps, in seconds (default ``time.perf_counter``).
        start: start the worker now (else call :meth:`start`).
        keep_latencies: latencies kept for :meth:`stats`' percentiles.
        shed: refuse (:class:`Overloaded`) what cannot be served in time, instead of queueing it.
        max_queued: the most requests queued (default ``16 * max_batch_size``); with ``shed``
            a request beyond it is refused.
        expire: drop a request whose deadline passed while it was queued (:class:`DeadlineExpired`)
            instead of computing it late; :meth:`serve` always does.
        on_batch: called with each batch's :class:`Decision` after it ran (statistics).
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
        shed: bool = False,
        max_queued: Optional[int] = None,
        expire: bool = False,
        on_batch: Optional[Callable[[Decision], None]] = None,
    ) -> None:
        if max_batch_size < 1 or batch_wait_timeout_s < 0:
            raise ValueError("need max_batch_size >= 1 and batch_wait_timeout_s >= 0.")
        if max_queued is not None and max_queued < 1:
            raise ValueError(f"max_queued must be >= 1, got {max_queued!r}.")
        self.controller = controller
        self.max_batch_size = int(max_batch_size)
        self.batch_wait_timeout_s = float(batch_wait_timeout_s)
        self.clock = clock
        self.shed = bool(shed)
        self.max_queued = int(max_queued or 16 * self.max_batch_size)
        self.expire = bool(expire)
        self.on_batch = on_batch
        self._queue: Deque[_Request] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread: Optional[threading.Thread] = None
        self._busy_until = 0.0  # predicted end of the batch running now (clock time)
        self._latencies: Deque[float] = deque(maxlen=keep_latencies)
        self._batch_sizes: Dict[int, int] = {}
        self._requests = self._on_time = self._batches = self._errors = self._shed = self._expired = 0
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

    @property
    def alive(self) -> bool:
        """The worker thread is running (a health check: a dead worker serves nothing)."""
        return self._thread is not None and self._thread.is_alive()

    def close(self, timeout: Optional[float] = None) -> None:
        """Stop taking requests, serve those already queued, and stop the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        else:  # never started: nothing will serve what is queued
            self.fail_queued(RuntimeError("DynamicBatcher closed before it was started."))

    def __enter__(self) -> "DynamicBatcher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- requests -----------------------------------------------------------------------
    def submit(self, x: Tensor, arrival: Optional[float] = None, deadline: Optional[float] = None) -> "Future[ServedResult]":
        """Queue one image ``x`` ((C, H, W) or (1, C, H, W)) that arrived at ``arrival`` (default: now).

        ``deadline`` (clock time) defaults to ``arrival + slo_ms``; a later one is capped there.

        Raises:
            Overloaded: with ``shed``, the request cannot be served in time (nothing was queued).
        """
        return self._enqueue(x, arrival, deadline).future

    def _enqueue(self, x: Tensor, arrival: Optional[float], deadline: Optional[float]) -> _Request:
        if x.ndim == 4:
            if x.shape[0] != 1:
                raise ValueError(f"submit takes one image, (C, H, W) or (1, C, H, W); got {tuple(x.shape)}.")
            x = x[0]
        now = self.clock()
        arrival = now if arrival is None else float(arrival)
        deadline = self.deadline_of(arrival, deadline)
        request = _Request(x, arrival, deadline, Future())
        self.controller.observe_arrival()  # the arrival rate, on the controller's own clock
        with self._cond:
            if self._closed:
                raise RuntimeError("This DynamicBatcher is closed.")
            if self.shed:
                self._admit(now, deadline)
            self._queue.append(request)
            self._cond.notify()
        return request

    def deadline_of(self, arrival: float, deadline: Optional[float] = None) -> float:
        """A request's deadline: ``arrival + slo_ms``, or the given ``deadline`` when it is sooner."""
        slo_deadline = arrival + self.controller.slo_ms / 1e3
        return slo_deadline if deadline is None else min(float(deadline), slo_deadline)

    def admit(self, deadline: float) -> None:
        """The admission check of :meth:`submit` (``shed=True``) on its own, counted when it refuses: a
        server calls it before decoding, so that a request it sheds costs no decoding.

        Raises:
            Overloaded: even the shallowest option could not answer a request queued now by ``deadline``.
        """
        with self._cond:
            self._admit(self.clock(), deadline)

    def _admit(self, now: float, deadline: float) -> None:
        """Raise :class:`Overloaded` unless the shallowest option reaches a new request in time.

        The request waits for the batch running now (the end its decision predicts), then for
        the full batches ahead of it, then runs in a batch with the rest of the queue ahead;
        each batch at the shallowest option's predicted time. An idle batcher (nothing queued or
        running) admits a request that still has :data:`PROBE_SLO_SHARE` of the SLO whatever the
        prediction says: it starts at once, and its batch's measured time corrects a latency
        model still inflated by an earlier stall (otherwise every request would be shed and no
        batch would ever run to correct it). Requests arriving later may join
        its batch; the controller then answers with a shallower option, and what still misses
        expires in the queue (504) instead of delaying the others.
        """
        ahead = len(self._queue)
        if not ahead and not self._busy_until and deadline - now >= PROBE_SLO_SHARE * self.controller.slo_ms / 1e3:
            # idle: the request would start now. Shedding it on a prediction alone could last for ever: after a
            # stall the latency model predicts a slowdown that only a batch run since can take back
            return
        full = self.max_batch_size
        shallowest = self.controller.shallowest_ms
        start = max(now, self._busy_until) + (ahead // full) * shallowest(full) / 1e3
        finish = start + shallowest(ahead % full + 1) / 1e3
        drain_s = start - now
        if ahead >= self.max_queued:
            self._shed += 1
            raise Overloaded(f"the queue is full ({ahead} requests waiting)", drain_s)
        if finish > deadline:
            self._shed += 1
            raise Overloaded(f"{ahead} requests are ahead; even the shallowest depth would answer "
                             f"{(finish - deadline) * 1e3:.0f} ms past the deadline", drain_s)

    def cancel(self, future: "Future[ServedResult]") -> bool:
        """Take a still-queued request out (its future fails with :class:`DeadlineExpired`); ``False`` once it runs."""
        with self._cond:
            for r in self._queue:
                if r.future is future:
                    self._queue.remove(r)
                    self._expired += 1
                    break
            else:
                return False
        future.set_exception(DeadlineExpired("the deadline passed while the request was queued"))
        return True

    async def serve(self, x: Tensor, arrival: Optional[float] = None, deadline: Optional[float] = None) -> ServedResult:
        """:meth:`submit` from an event loop; a request still queued at its deadline fails at once.

        Raises:
            Overloaded: refused at admission.
            DeadlineExpired: its deadline passed while it was queued (it was not computed).
        """
        request = self._enqueue(x, arrival, deadline)
        waiting = asyncio.wrap_future(request.future)
        done, _ = await asyncio.wait({waiting}, timeout=max(0.0, request.deadline - self.clock()))
        if not done:
            self.cancel(request.future)  # False when it already runs: its answer comes within the batch
        return await waiting

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
            now = self.clock()
            batch: List[_Request] = []
            expired: List[_Request] = []
            while self._queue and len(batch) < self.max_batch_size:
                r = self._queue.popleft()
                (expired if self.expire and r.deadline <= now else batch).append(r)
            self._expired += len(expired)
        for r in expired:
            r.future.set_exception(DeadlineExpired("the deadline passed while the request was queued"))
        return batch

    def _work(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            if batch:
                self._serve(batch)

    def _serve(self, batch: List[_Request]) -> None:
        now = self.clock()
        slo = self.controller.slo_ms
        waited = [slo - (r.deadline - now) * 1e3 for r in batch]  # slack = the tightest deadline
        with self._cond:
            backlog = [slo - (r.deadline - now) * 1e3 for _, r in zip(range(self.max_batch_size), self._queue)]

        def running(decision: Decision) -> None:  # admission waits for the batch's predicted end
            self._busy_until = self.clock() + decision.predicted_ms / 1e3

        try:
            x = torch.stack([r.x for r in batch])
            logits, depths, decision = self.controller.run(x, waited, backlog_waited_ms=backlog, on_decision=running)
            depths = depths.tolist()
        except BaseException as err:  # every request of the batch learns why
            self._errors += len(batch)
            for r in batch:
                r.future.set_exception(err)
            return
        finally:
            self._busy_until = 0.0
        done = self.clock()
        self._batches += 1
        self._batch_sizes[len(batch)] = self._batch_sizes.get(len(batch), 0) + 1
        if self.on_batch is not None:
            self.on_batch(decision)
        for i, r in enumerate(batch):
            latency = (done - r.arrival) * 1e3
            self._latencies.append(latency)
            self._requests += 1
            self._on_time += latency <= slo
            r.future.set_result(ServedResult(logits[i], int(depths[i]), latency, latency <= slo, decision))

    def fail_queued(self, err: BaseException) -> None:
        """Fail every queued request with ``err`` (what a drain did not answer is not served later)."""
        with self._cond:
            pending, self._queue = list(self._queue), deque()
        for r in pending:
            r.future.set_exception(err)

    # --- bookkeeping --------------------------------------------------------------------
    def stats(self) -> Dict[str, Any]:
        """``requests`` answered, ``errors``, ``shed``, ``expired``, ``batches``, ``batch_sizes`` (histogram),
        ``max_batch_size_seen``, ``mean_batch_size``, ``on_time``, ``slo_attainment``, ``p50_ms``/``p99_ms``
        (of the kept latencies)."""
        lat = sorted(self._latencies)

        def pct(q: float) -> float:
            return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")

        sizes = dict(self._batch_sizes)
        return {
            "requests": self._requests,
            "errors": self._errors,
            "shed": self._shed,
            "expired": self._expired,
            "batches": self._batches,
            "batch_sizes": sizes,
            "max_batch_size_seen": max(sizes, default=0),
            "mean_batch_size": self._requests / self._batches if self._batches else 0.0,
            "on_time": self._on_time,
            "slo_attainment": self._on_time / self._requests if self._requests else float("nan"),
            "p50_ms": pct(0.5),
            "p99_ms": pct(0.99),
        }
