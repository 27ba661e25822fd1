"""Deadlines, admission and expiry in :class:`~coopnets.serving.DynamicBatcher`, and the server core's health.

A stub controller records what it was asked to run and can be held inside a batch, so the
order of events is checked (which request ran, which was refused or expired, what slack the
controller saw) without asserting on wall-clock durations.
"""
from __future__ import annotations

import asyncio
import threading
import time
from contextlib import contextmanager
from typing import Iterator, List, Sequence, Tuple

import pytest
import torch

import coopnets
from coopnets.serving import DeadlineExpired, DynamicBatcher, Overloaded
from coopnets.serving.arrivals import ArrivalRate
from coopnets.serving.controller import Decision, ServingOption
from coopnets.serving.core import ServeSettings, ServingCore

OPTION = ServingOption("depth1", 1, 0.5)


class StubController:
    """Runs a batch by returning each sample's first value as its logit; optionally held until released."""

    def __init__(self, slo_ms: float = 1000.0, shallowest_ms: float = 1.0, predicted_ms: float = 1.0) -> None:
        self.slo_ms = slo_ms
        self.predicted_ms = predicted_ms
        self.arrivals = ArrivalRate()
        self._shallowest = shallowest_ms
        self.ran: List[List[float]] = []
        self.waited: List[List[float]] = []
        self.hold = threading.Event()
        self.hold.set()
        self.entered = threading.Event()

    def shallowest_ms(self, n: int) -> float:
        return self._shallowest

    def observe_arrival(self) -> None:
        self.arrivals.observe()

    def run(self, x: torch.Tensor, waited_ms: Sequence[float], *, backlog_waited_ms: Sequence[float] = (),
            on_decision=None) -> Tuple[torch.Tensor, torch.Tensor, Decision]:
        decision = Decision(OPTION, len(x), self.slo_ms - max(waited_ms), self.predicted_ms, True, 0.0, 1.0)
        if on_decision is not None:
            on_decision(decision)
        self.entered.set()
        self.hold.wait(30)
        self.ran.append([float(v) for v in x[:, 0, 0, 0]])
        self.waited.append(list(waited_ms))
        return x[:, :, 0, 0], torch.ones(len(x), dtype=torch.long), decision


def image(tag: float) -> torch.Tensor:
    return torch.full((3, 2, 2), float(tag))


@contextmanager
def held_batch(ctl: StubController, first: float = 0.0, **batcher_kwargs) -> Iterator[DynamicBatcher]:
    """A batcher whose first batch (image ``first``) is running and held inside the controller."""
    ctl.hold.clear()
    with DynamicBatcher(ctl, **batcher_kwargs) as batcher:
        batcher.submit(image(first))
        assert ctl.entered.wait(30)
        yield batcher


def test_expired_requests_are_not_computed():
    ctl = StubController()
    ctl.hold.clear()
    with DynamicBatcher(ctl, max_batch_size=1, expire=True) as batcher:
        first = batcher.submit(image(1))
        assert ctl.entered.wait(30)  # the first batch runs, held
        now = batcher.clock()
        late = batcher.submit(image(2), deadline=now + 0.001)  # expires while the first batch is held
        ok = batcher.submit(image(3), deadline=now + 60)
        while batcher.clock() < now + 0.002:
            time.sleep(0.001)
        ctl.hold.set()
        assert first.result(30).depth == 1 and ok.result(30).depth == 1
        with pytest.raises(DeadlineExpired):
            late.result(30)
    assert ctl.ran == [[1.0], [3.0]]  # request 2 never reached the model
    assert batcher.stats()["expired"] == 1 and batcher.stats()["requests"] == 2


def test_without_expire_late_requests_are_still_served():
    ctl = StubController()
    with held_batch(ctl, 1.0, max_batch_size=1) as batcher:
        late = batcher.submit(image(2), deadline=batcher.clock() + 0.001)
        time.sleep(0.01)
        ctl.hold.set()
        assert late.result(30).depth == 1
    assert ctl.ran == [[1.0], [2.0]]


def test_serve_answers_an_expired_request_at_once_while_a_batch_runs():
    ctl = StubController()
    ctl.hold.clear()

    async def scenario() -> str:
        with DynamicBatcher(ctl, max_batch_size=1) as batcher:
            running = batcher.submit(image(1))
            while not ctl.entered.is_set():
                await asyncio.sleep(0.001)
            try:
                await batcher.serve(image(2), deadline=batcher.clock() + 0.02)
            except DeadlineExpired:
                outcome = "expired while the first batch was still held" if not ctl.hold.is_set() else "too late"
            else:
                outcome = "answered"
            ctl.hold.set()
            running.result(30)
            return outcome

    assert asyncio.run(scenario()) == "expired while the first batch was still held"
    assert ctl.ran == [[1.0]]


def test_cancel_takes_out_a_request_behind_others():
    ctl = StubController()
    with held_batch(ctl, max_batch_size=1) as batcher:
        ahead = batcher.submit(image(1))
        behind = batcher.submit(image(2))
        assert batcher.cancel(behind) and not batcher.cancel(behind)
        with pytest.raises(DeadlineExpired):
            behind.result(30)
        ctl.hold.set()
        ahead.result(30)
    assert [r[0] for r in ctl.ran] == [0.0, 1.0]


def test_slack_is_the_tightest_deadline_of_the_batch():
    ctl = StubController(slo_ms=1000.0)
    with held_batch(ctl, max_batch_size=2, batch_wait_timeout_s=0.0) as batcher:
        now = batcher.clock()
        a = batcher.submit(image(1), arrival=now)  # deadline: arrival + SLO (1 s)
        b = batcher.submit(image(2), arrival=now, deadline=now + 0.2)  # its own, tighter: 200 ms
        c = batcher.submit(image(3), arrival=now, deadline=now + 5.0)  # later than the SLO: capped at it
        ctl.hold.set()
        for f in (a, b, c):
            f.result(30)
    waited = dict(zip(sum(ctl.ran, []), sum(ctl.waited, [])))
    # the controller sees slo - time left: ~800 ms for the 200-ms deadline, ~0 for the SLO's
    assert waited[2.0] == pytest.approx(waited[1.0] + 800.0, abs=1.0)
    assert waited[3.0] == pytest.approx(waited[1.0], abs=1.0)


def test_admission_sheds_what_even_the_shallowest_depth_cannot_reach():
    ctl = StubController(slo_ms=1000.0, shallowest_ms=100.0)
    with DynamicBatcher(ctl, max_batch_size=4, shed=True) as batcher:
        with pytest.raises(Overloaded) as refused:
            batcher.submit(image(1), deadline=batcher.clock() + 0.05)  # 50 ms left, a batch takes 100
        assert refused.value.retry_after_s >= 1 and "past the deadline" in str(refused.value)
        assert batcher.submit(image(2)).result(30).depth == 1  # 1 s left: admitted
    assert ctl.ran == [[2.0]] and batcher.stats()["shed"] == 1


def test_an_idle_batcher_admits_what_a_stale_latency_model_would_shed():
    """After a stall the latency model may predict that even the shallowest depth misses every deadline; an idle
    batcher still admits a request with the SLO ahead of it, so a batch runs and corrects the model. With a batch
    running, or for a client's impossible deadline, the prediction still sheds."""
    ctl = StubController(slo_ms=1000.0, shallowest_ms=5000.0, predicted_ms=5000.0)
    with DynamicBatcher(ctl, max_batch_size=4, shed=True) as batcher:
        assert batcher.submit(image(1)).result(30).depth == 1  # idle: admitted although predicted to miss
        with pytest.raises(Overloaded):
            batcher.submit(image(2), deadline=batcher.clock() + 0.05)  # a client's deadline no depth can make
    assert [r[0] for r in ctl.ran] == [1.0]
    busy = StubController(slo_ms=1000.0, shallowest_ms=5000.0, predicted_ms=5000.0)
    with held_batch(busy, max_batch_size=4, shed=True) as batcher:  # a batch runs: the prediction decides
        with pytest.raises(Overloaded, match="past the deadline"):
            batcher.submit(image(3))
        busy.hold.set()
    assert [r[0] for r in busy.ran] == [0.0]


def test_admission_waits_for_the_running_batchs_predicted_end():
    ctl = StubController(slo_ms=1000.0, shallowest_ms=1.0, predicted_ms=500.0)
    with held_batch(ctl, max_batch_size=4, shed=True) as batcher:  # a batch predicted to take 500 ms runs
        with pytest.raises(Overloaded):
            batcher.submit(image(1), deadline=batcher.clock() + 0.2)  # its answer would come after ~500 ms
        admitted = batcher.submit(image(2))  # the SLO's 1 s is enough
        ctl.hold.set()
        admitted.result(30)
    assert [r[0] for r in ctl.ran] == [0.0, 2.0]


def test_admission_bounds_the_queue():
    ctl = StubController(slo_ms=60_000.0, shallowest_ms=1.0)
    with held_batch(ctl, max_batch_size=1, shed=True, max_queued=2) as batcher:
        queued = [batcher.submit(image(i)) for i in (1, 2)]
        with pytest.raises(Overloaded, match="queue is full"):
            batcher.submit(image(3))
        assert batcher.queued == 2
        ctl.hold.set()
        for f in queued:
            f.result(30)
    assert [r[0] for r in ctl.ran] == [0.0, 1.0, 2.0]


def test_core_health_fails_once_its_batch_loop_stops():
    model = coopnets.wrap("test_resnet", num_classes=3)
    core = ServingCore(model, ServeSettings(slo_ms=5000, max_batch_size=2, accuracies=(0.1, 0.2, 0.3, 0.4)),
                       profile_repeats=1)
    core.check_health()
    core.close()
    with pytest.raises(RuntimeError, match="batch loop has stopped"):
        core.check_health()
