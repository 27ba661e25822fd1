"""The open-loop runner and the closed-loop capacity measurement, over any submit.

**Open loop** (:func:`open_loop`): request ``i`` is sent at ``start + times[i]`` whether or
not the earlier ones have been answered, and its latency is *its answer's time minus its
scheduled time*: queueing, a late sender and a stalled server all count (no coordinated
omission). When the sender falls behind (the process starved) it sends the overdue
requests at once and the lag is in their latency. Answers later than ``drain_s`` after the
last arrival are not waited for: those requests count as unanswered.

**Closed loop** (:func:`closed_loop`): ``concurrency`` requests always outstanding (each
answer sends the next) for ``duration_s`` after a warm-up: the answers per second, the
capacity of the server at that concurrency.

A *submit* hands request ``i`` (scheduled at the absolute ``clock()`` time ``scheduled``)
to the server, in one of two shapes, and both runners take either:

* **async** (``async def submit(i, scheduled) -> result``, e.g. an HTTP request on this
  event loop: :meth:`coopnets.bench.client.HttpClient.predict`); the answer's time is
  stamped when it returns;
* **callback** (``def submit(i, scheduled, done) -> None``, e.g. an in-process batcher): must
  not block; the server later calls ``done(result)`` from any thread, and the answer's time
  is stamped inside ``done``.

``result`` is a mapping with the keys of :class:`Outcome` it knows (``pred``, ``depth``,
``server_ms``, ``status``, ``label``, ``decision``) or ``error`` (a failed request). Both
runners are coroutines; :func:`run_open_loop` and :func:`closed_loop_capacity` run them
from synchronous code (on a new event loop, or on ``loop`` running in another thread).

Example:
    >>> def echo(i, scheduled, done):           # a server answering at once, in-process
    ...     done({"pred": i, "depth": 1})
    >>> outcomes, start = run_open_loop([0.0, 0.01, 0.02], echo, lead_s=0.0)
    >>> [o.pred for o in outcomes], all(o.done >= t for o, t in zip(outcomes, [0.0, 0.01, 0.02]))
    ([0, 1, 2], True)
    >>> async def slow(i, scheduled):           # an async server taking 10 ms per request
    ...     await asyncio.sleep(0.01)
    ...     return {"pred": 0, "depth": 2}
    >>> r = asyncio.run(closed_loop(slow, n_items=3, concurrency=2, duration_s=0.3, warm_s=0.05))
    >>> 60 < r.answers_per_s < 220, r.errors
    (True, 0)
"""
from __future__ import annotations

import asyncio
import inspect
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

__all__ = ["AsyncSubmit", "ClosedLoopResult", "Done", "Outcome", "Submit", "closed_loop", "closed_loop_capacity",
           "open_loop", "run_open_loop"]

Done = Callable[[Mapping[str, Any]], None]
#: a callback submit: ``submit(i, scheduled, done)``, not blocking
Submit = Callable[[int, float, Done], None]
#: an async submit: ``await submit(i, scheduled)`` -> the result mapping
AsyncSubmit = Callable[[int, float], Awaitable[Mapping[str, Any]]]
AnySubmit = Union[Submit, AsyncSubmit]
Clock = Callable[[], float]


@dataclass
class Outcome:
    """What happened to one request (times in s from the run's start; NaN: never).

    ``error`` is empty for an answered request; ``status`` is the HTTP status when there
    was one (0: none, e.g. in-process or the connection failed).
    """

    sent: float = math.nan
    done: float = math.nan
    pred: int = -1
    depth: int = 0
    error: str = ""
    server_ms: float = math.nan
    decision: Any = None
    status: int = 0
    label: str = ""

    def fill(self, result: Mapping[str, Any], done: float) -> None:
        """Record ``result`` answered at ``done`` (s from the start)."""
        self.done = done
        self.error = str(result.get("error", "") or "")
        self.pred = int(result.get("pred", -1))
        self.depth = int(result.get("depth", 0) or 0)
        self.server_ms = float(result.get("server_ms", math.nan))
        self.decision = result.get("decision")
        self.status = int(result.get("status", 0) or 0)
        self.label = str(result.get("label", "") or "")


def is_async(submit: Callable[..., Any]) -> bool:
    """Whether ``submit`` is an async submit (a coroutine function), not a callback one.

    Example:
        >>> async def a(i, t): return {}
        >>> is_async(a), is_async(lambda i, t, done: None)
        (True, False)
    """
    return inspect.iscoroutinefunction(submit) or inspect.iscoroutinefunction(getattr(submit, "__call__", None))


def _failed(e: BaseException) -> Dict[str, Any]:
    return {"error": f"submit failed: {type(e).__name__}: {e}"}


def _caller(submit: AnySubmit, clock: Clock) -> Callable[[int, float], "asyncio.Future[Tuple[Mapping[str, Any], float]]"]:
    """``call(i, scheduled)``: submit request ``i`` now; a future of ``(result, answer time)``.

    A callback submit is called right away (a blocking one delays the sender, and that lag is
    charged to the requests); an async submit becomes a task on the running loop.
    """
    loop = asyncio.get_running_loop()
    if is_async(submit):
        async def stamped(i: int, scheduled: float) -> Tuple[Mapping[str, Any], float]:
            try:
                result = await submit(i, scheduled)  # type: ignore[misc]
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a failed submit is an answered error, not a hang
                result = _failed(e)
            return result, clock()

        return lambda i, scheduled: loop.create_task(stamped(i, scheduled))

    def settle(fut: "asyncio.Future[Any]", value: Any) -> None:
        if not fut.done():
            fut.set_result(value)

    def call(i: int, scheduled: float) -> "asyncio.Future[Tuple[Mapping[str, Any], float]]":
        fut: asyncio.Future = loop.create_future()

        def done(result: Mapping[str, Any]) -> None:
            now = clock()
            try:
                loop.call_soon_threadsafe(settle, fut, (result, now))
            except RuntimeError:  # the loop is closed: the run is over, the answer came too late
                pass

        try:
            submit(i, scheduled, done)  # type: ignore[call-arg]
        except Exception as e:
            done(_failed(e))
        return fut

    return call


def _event_thread(events: Sequence[Tuple[float, Callable[[], Any]]], start: float, clock: Clock,
                  errors: List[BaseException]) -> Optional[threading.Thread]:
    if not events:
        return None

    def runner() -> None:
        for t, fn in sorted(events, key=lambda e: e[0]):
            delay = start + t - clock()
            if delay > 0:
                time.sleep(delay)
            try:
                fn()
            except BaseException as e:  # reported after the run
                errors.append(e)

    th = threading.Thread(target=runner, name="open-loop-events", daemon=True)
    th.start()
    return th


async def open_loop(times: Sequence[float], submit: AnySubmit, *, clock: Clock = time.perf_counter,
                    events: Sequence[Tuple[float, Callable[[], Any]]] = (), drain_s: float = 30.0,
                    lead_s: float = 0.05, bar: Any = None) -> Tuple[List[Outcome], float]:
    """Send request ``i`` at ``start + times[i]``, whatever happened to earlier ones; wait for the answers.

    ``submit`` is async or a callback (module docstring). ``events`` (``(time, fn)``) run on
    their own thread at their schedule times (a contention process, a progress label); an
    exception in one is raised after the run. ``bar`` (a tqdm bar) is advanced by the
    answered count. Requests not answered ``drain_s`` seconds after the last arrival (or
    event) are abandoned (async ones cancelled) and stay unanswered.

    Returns ``(outcomes, start)``: one :class:`Outcome` per request, and the absolute start.
    """
    loop = asyncio.get_running_loop()
    call = _caller(submit, clock)
    n = len(times)
    outcomes = [Outcome() for _ in range(n)]
    state = {"left": n, "closed": False}
    all_done = asyncio.Event()
    if n == 0:
        all_done.set()
    pending: Set["asyncio.Future[Any]"] = set()
    errors: List[BaseException] = []
    start = clock() + lead_s

    def record(i: int, fut: "asyncio.Future[Any]") -> None:
        pending.discard(fut)
        if state["closed"] or fut.cancelled():
            return
        exc = fut.exception()
        result, now = (_failed(exc), clock()) if exc is not None else fut.result()
        outcomes[i].fill(result, now - start)
        state["left"] -= 1
        if state["left"] == 0:
            all_done.set()

    async def sender() -> None:
        for i, t in enumerate(times):
            target = start + float(t)
            delay = target - clock()
            if delay > 0:
                while delay > 0:
                    await asyncio.sleep(delay)
                    delay = target - clock()
            else:
                await asyncio.sleep(0)  # overdue: send at once, but let the requests already sent go out
            outcomes[i].sent = clock() - start
            fut = call(i, target)
            pending.add(fut)
            fut.add_done_callback(lambda f, i=i: record(i, f))

    events_thread = _event_thread(events, start, clock, errors)
    send = loop.create_task(sender())
    last = float(times[-1]) if n else 0.0
    deadline = start + max(last, max((t for t, _ in events), default=0.0)) + drain_s
    shown = 0
    waiter = loop.create_task(all_done.wait())
    try:
        while not (waiter.done() and send.done()):
            left = deadline - clock()
            if left <= 0:
                break
            await asyncio.wait([waiter, send] if not send.done() else [waiter], timeout=min(left, 0.25),
                               return_when=asyncio.FIRST_COMPLETED)
            if send.done() and not send.cancelled() and send.exception() is not None:
                break  # the sender failed: raised below
            if bar is not None:
                now_done = n - state["left"]
                bar.update(now_done - shown)
                shown = now_done
    finally:
        state["closed"] = True
        for fut in [waiter, send, *pending]:
            fut.cancel()
        await asyncio.gather(waiter, send, *pending, return_exceptions=True)
    if bar is not None:
        bar.update(n - shown)
    while events_thread is not None and events_thread.is_alive():
        await asyncio.sleep(0.02)
    if send.done() and not send.cancelled() and send.exception() is not None:
        raise send.exception()  # type: ignore[misc]
    if errors:
        raise errors[0]
    return outcomes, start


@dataclass
class ClosedLoopResult:
    """A closed-loop run: answers per second over the measured window, and its latencies (ms)."""

    concurrency: int
    duration_s: float
    warm_s: float
    answers_per_s: float
    answered: int
    errors: int
    p50_ms: float
    p99_ms: float
    errors_by_status: Dict[str, int] = field(default_factory=dict)
    first_errors: List[str] = field(default_factory=list)


async def closed_loop(submit: AnySubmit, n_items: int, concurrency: int, duration_s: float, warm_s: float = 1.0, *,
                      clock: Clock = time.perf_counter, drain_s: float = 30.0) -> ClosedLoopResult:
    """``concurrency`` requests always outstanding (each answer sends the next) for ``warm_s + duration_s``.

    Counts the answers (and errors) that come back within the ``duration_s`` after the warm-up;
    p50/p99 are of those answers (from their send). Requests item ``k mod n_items`` in turn.
    Then waits at most ``drain_s`` for the outstanding ones (async ones are then cancelled).
    """
    if concurrency < 1 or not duration_s > 0:
        raise ValueError(f"closed loop: needs concurrency >= 1 and duration > 0 (got {concurrency}, {duration_s})")
    call = _caller(submit, clock)
    t0 = clock()
    lo, hi = t0 + warm_s, t0 + warm_s + duration_s
    counter = {"next": 0}
    records: List[Tuple[float, float, Mapping[str, Any]]] = []

    async def worker() -> None:
        while clock() < hi:
            i = counter["next"] % max(1, n_items)
            counter["next"] += 1
            sent = clock()
            result, now = await call(i, sent)
            records.append((sent, now, result))

    tasks = [asyncio.get_running_loop().create_task(worker()) for _ in range(concurrency)]
    _, late = await asyncio.wait(tasks, timeout=max(0.0, hi - clock()) + drain_s)
    for t in late:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    ok_lat, errors, by_status, first = [], 0, {}, []
    for sent, now, result in records:
        if not lo <= now < hi:
            continue
        if result.get("error"):
            errors += 1
            key = str(int(result.get("status", 0) or 0))
            by_status[key] = by_status.get(key, 0) + 1
            if len(first) < 5 and str(result["error"]) not in first:
                first.append(str(result["error"]))
        else:
            ok_lat.append(1e3 * (now - sent))
    ok_lat.sort()

    def q(p: float) -> float:
        return ok_lat[min(len(ok_lat) - 1, max(0, math.ceil(p * len(ok_lat)) - 1))] if ok_lat else math.nan

    return ClosedLoopResult(concurrency, float(duration_s), float(warm_s), len(ok_lat) / duration_s, len(ok_lat),
                            errors, q(0.5), q(0.99), by_status, first)


def _run(coro: Awaitable[Any], loop: Optional[asyncio.AbstractEventLoop]) -> Any:
    if loop is None:
        return asyncio.run(coro)  # type: ignore[arg-type]
    return asyncio.run_coroutine_threadsafe(coro, loop).result()  # type: ignore[arg-type]


def run_open_loop(times: Sequence[float], submit: AnySubmit, *, clock: Clock = time.perf_counter,
                  events: Sequence[Tuple[float, Callable[[], Any]]] = (), drain_s: float = 30.0, lead_s: float = 0.05,
                  bar: Any = None, loop: Optional[asyncio.AbstractEventLoop] = None) -> Tuple[List[Outcome], float]:
    """:func:`open_loop` from synchronous code: on a new event loop, or on ``loop`` (running in another
    thread, e.g. the one an async HTTP client lives on)."""
    return _run(open_loop(times, submit, clock=clock, events=events, drain_s=drain_s, lead_s=lead_s, bar=bar), loop)


def closed_loop_capacity(submit: AnySubmit, n_items: int, concurrency: int, duration_s: float, warm_s: float = 1.0,
                         clock: Clock = time.perf_counter, loop: Optional[asyncio.AbstractEventLoop] = None) -> float:
    """Answers per second of :func:`closed_loop`, from synchronous code (``loop`` as :func:`run_open_loop`).

    Example:
        >>> closed_loop_capacity(lambda i, t, done: done({}), n_items=1, concurrency=1, duration_s=0.05, warm_s=0) > 100
        True
    """
    return _run(closed_loop(submit, n_items, concurrency, duration_s, warm_s, clock=clock), loop).answers_per_s
