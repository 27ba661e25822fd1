"""Open-loop load test of depth-adaptive serving: fixed depths, the static budget and the controller, side by side.

What it does, and why it cannot flatter itself:

* **Open-loop arrivals.** Every request has a scheduled arrival time, drawn before the run
  (Poisson per phase, seeded: :func:`poisson_schedule`). A sender thread submits each one at
  its time whether or not earlier ones have been answered (:func:`run_open_loop`), and a
  request's latency is *its answer's time minus its scheduled arrival*: queueing, a late
  sender and a stalled server all count (no coordinated omission). Every policy of a mode
  gets the same schedule (same times, same images).
* **Phases.** ``quiet`` (the base rate, at which full depth fits the SLO), ``burst`` (3x the
  base rate), ``contention`` (the base rate while a CPU-bound child process started by the
  benchmark, pinned to one core, competes for the machine) and ``recovery`` (the base rate
  again). A warm-up at the base rate comes first and is not scored. The base rate is
  ``--load-fraction`` (0.65; over HTTP ``--http-load-fraction``, 0.5) of full depth's
  capacity, measured in each mode by a short closed-loop saturation of the full-depth
  policy, then checked by short open-loop probes of full depth: 0.8x while it attains
  < 99 %, but never below 1.1x its capacity / the burst factor, so that the burst still
  overloads full depth (``--base-rate`` / ``--http-base-rate`` override all this). Every
  fixed depth's closed-loop capacity is measured and reported beside the burst's rate.
* **Policies.** Every fixed depth (``depthK``: ``DepthController.for_model(depth=K)``); the
  static budget (``static``: ``coopnets.inference.budget.depth_for_latency(model, slo_ms,
  batch_size=max_batch)``, chosen once at the start and then served as that fixed depth);
  the controller with depth only (``controller``) and with depth and early exit
  (``controller+ee``, thresholds calibrated on the labelled validation split).
* **Accuracy is measured, per request.** Each request is one labelled image of the digits
  *test* split (the split the checkpoint was not trained or selected on), preprocessed by
  the checkpoint's own data config. Effective accuracy is the share of requests answered
  correctly *and* within the SLO; a request not answered by the end of the drain counts as
  late and wrong.
* **Two modes.** ``inprocess``: :class:`coopnets.serving.DynamicBatcher` in front of a
  :class:`coopnets.serving.DepthController` in this process (no HTTP; images preprocessed
  ahead). ``http``: ``coopnets serve CHECKPOINT`` started as a subprocess per policy, PNG
  images POSTed to ``/predict`` by an asyncio/aiohttp client; Ray Serve's overhead, image
  decoding and preprocessing are inside the measured latency.
* **The checkpoint must make depth matter.** Before anything is served the script measures
  depth 1 against full depth on the test split and at the served batch sizes and stops
  unless full depth is at least 3 points more accurate and at least 2x slower
  (``--no-depth-check`` only for tests with untrained models).

Writes ``serving.md`` (tables, targets met/missed with their figures), ``serving.json`` and
one figure per mode (``serving_<mode>.png``: latency and chosen depth over time per policy)
into ``--out``.

Example (the committed results say what they were made with):
    python benchmarks/serving.py
    python benchmarks/serving.py --modes inprocess --durations 5 5 5 5 --policies depth1 depth4 controller
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

import harness

NAME = "serving"
TITLE = "Serving under changing load: open-loop load test of depth policies"
OUT = harness.REPO / "benchmarks" / "results" / "serving"
CHECKPOINT = OUT / "checkpoint"
PHASES = ("quiet", "burst", "contention", "recovery")
MODES = ("inprocess", "http")
CONTROLLERS = ("controller", "controller+ee")
#: policies ``coopnets serve`` can run (``static`` is served as ``--depth K``)
HTTP_POLICIES = ("depth", "static", "controller")
#: the issue's targets
TARGETS = {"attainment": 0.99, "full_burst_attainment_below": 0.50, "quiet_accuracy_points": 0.01,
           "recovery_s": 2.0, "overhead": 0.01, "min_accuracy_gap": 0.03, "min_latency_ratio": 2.0}
DEFAULT_DURATIONS = (12.0, 12.0, 12.0, 12.0)
#: the CPU-bound child of the contention phase: a Python busy loop pinned to one core
BUSY_LOOP = ("import os, sys\ncpu = int(sys.argv[1])\ntry:\n    os.sched_setaffinity(0, {cpu})\n"
             "except (AttributeError, OSError):\n    pass\nwhile True:\n    pass\n")


# --- the schedule -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Phase:
    """One phase of the load: ``rate`` requests/s from ``start`` for ``duration`` seconds (schedule time)."""

    name: str
    start: float
    duration: float
    rate: float
    contention: bool = False

    @property
    def end(self) -> float:
        return self.start + self.duration


def build_phases(base_rate: float, durations: Mapping[str, float], burst_factor: float = 3.0,
                 warmup_s: float = 0.0) -> List[Phase]:
    """The warm-up (when ``warmup_s > 0``; not scored) and :data:`PHASES`, back to back.

    Example:
        >>> [(p.name, p.start, p.rate, p.contention) for p in build_phases(10, dict.fromkeys(PHASES, 2.0), 3, 1.0)]
        [('warmup', 0.0, 10, False), ('quiet', 1.0, 10, False), ('burst', 3.0, 30, False), ('contention', 5.0, 10, True), ('recovery', 7.0, 10, False)]
    """
    if not base_rate > 0:
        raise ValueError(f"the base rate must be > 0 requests/s, got {base_rate!r}")
    rates = {"quiet": base_rate, "burst": burst_factor * base_rate, "contention": base_rate, "recovery": base_rate}
    phases, t = [], 0.0
    if warmup_s > 0:
        phases.append(Phase("warmup", 0.0, float(warmup_s), base_rate))
        t = float(warmup_s)
    for name in PHASES:
        d = float(durations[name])
        phases.append(Phase(name, t, d, rates[name], contention=name == "contention"))
        t += d
    return phases


@dataclass
class Schedule:
    """Scheduled arrivals: ``times`` (s from the start, sorted), the ``phase`` index and test ``item`` of each."""

    phases: List[Phase]
    times: np.ndarray
    phase: np.ndarray
    item: np.ndarray

    def __len__(self) -> int:
        return len(self.times)

    @property
    def end(self) -> float:
        return self.phases[-1].end if self.phases else 0.0

    def index(self, name: str) -> int:
        return next(i for i, p in enumerate(self.phases) if p.name == name)


def poisson_schedule(phases: Sequence[Phase], n_items: int, seed: int = 0) -> Schedule:
    """Poisson arrivals at each phase's rate, and the test item of each request; seeded, nothing else.

    Each phase draws from its own generator (``[seed, phase index]``), so a phase's arrivals
    do not change when another phase's rate or length does; items cycle through seeded
    permutations of the test set, so every image is used about equally often.

    Example:
        >>> s = poisson_schedule(build_phases(100, dict.fromkeys(PHASES, 1.0)), n_items=5, seed=1)
        >>> bool(np.all(np.diff(s.times) > 0)), 300 < len(s) < 800, sorted(set(s.item.tolist()))
        (True, True, [0, 1, 2, 3, 4])
        >>> bool(np.array_equal(s.times, poisson_schedule(s.phases, 5, seed=1).times))
        True
    """
    times, phase_of = [], []
    for i, ph in enumerate(phases):
        rng = np.random.default_rng([seed, i])
        t, out = ph.start, []
        while True:
            expected = max(16, int(1.2 * ph.rate * (ph.end - t)) + 16)
            arrivals = t + np.cumsum(rng.exponential(1.0 / ph.rate, size=expected))
            out.append(arrivals[arrivals < ph.end])
            if arrivals[-1] >= ph.end:
                break
            t = float(arrivals[-1])
        got = np.concatenate(out)
        times.append(got)
        phase_of.append(np.full(len(got), i, dtype=np.int64))
    all_times = np.concatenate(times) if times else np.zeros(0)
    rng = np.random.default_rng([seed, 1_000_003])
    n = len(all_times)
    perms = [rng.permutation(n_items) for _ in range(max(1, math.ceil(n / max(1, n_items))))]
    items = np.concatenate(perms)[:n] if n else np.zeros(0, dtype=np.int64)
    return Schedule(list(phases), all_times, np.concatenate(phase_of) if phase_of else np.zeros(0, np.int64), items)


# --- the open loop ----------------------------------------------------------------------------
@dataclass
class Outcome:
    """What happened to one request (times in s from the schedule's start; NaN: never)."""

    sent: float = math.nan
    done: float = math.nan
    pred: int = -1
    depth: int = 0
    error: str = ""
    server_ms: float = math.nan
    decision: Any = None


Done = Callable[[Mapping[str, Any]], None]
Submit = Callable[[int, float, Done], None]


def run_open_loop(times: Sequence[float], submit: Submit, *, clock: Callable[[], float] = time.perf_counter,
                  events: Sequence[Tuple[float, Callable[[], Any]]] = (), drain_s: float = 30.0,
                  lead_s: float = 0.05, bar: Any = None) -> Tuple[List[Outcome], float]:
    """Submit request ``i`` at ``start + times[i]``, whatever happened to earlier ones; wait for the answers.

    ``submit(i, scheduled, done)`` must not block: it hands request ``i`` (scheduled at the
    absolute ``clock()`` time ``scheduled``) to the server, which later calls ``done(result)``
    from any thread (``result`` keys: ``pred``, ``depth``, ``server_ms``, ``decision``, or
    ``error``). The answer's time is stamped when ``done`` is called. A sender thread keeps
    the schedule; when it falls behind (the process starved) it sends the overdue requests
    at once and the lag is in their latency, since latency is counted from the schedule.
    ``events`` (``(time, fn)``) run on their own thread at their schedule times (the
    contention process, statistics snapshots). Answers that arrive after ``drain_s``
    seconds past the last arrival are not waited for (those requests count as unanswered).

    Returns ``(outcomes, start)``: one :class:`Outcome` per request, and the absolute start.
    """
    n = len(times)
    outcomes = [Outcome() for _ in range(n)]
    cond = threading.Condition()
    state = {"left": n, "closed": False}
    errors: List[BaseException] = []
    start = clock() + lead_s

    def finisher(i: int) -> Done:
        def done(result: Mapping[str, Any]) -> None:
            now = clock()
            with cond:
                o = outcomes[i]
                if state["closed"] or not math.isnan(o.done):
                    return
                o.done = now - start
                o.error = str(result.get("error", ""))
                o.pred = int(result.get("pred", -1))
                o.depth = int(result.get("depth", 0))
                o.server_ms = float(result.get("server_ms", math.nan))
                o.decision = result.get("decision")
                state["left"] -= 1
                if state["left"] == 0:
                    cond.notify_all()
        return done

    def sender() -> None:
        for i, t in enumerate(times):
            target = start + float(t)
            delay = target - clock()
            if delay > 0:
                time.sleep(delay)
            outcomes[i].sent = clock() - start
            try:
                submit(i, target, finisher(i))
            except Exception as e:  # a refused submit is an answered error, not a hang
                finisher(i)({"error": f"submit failed: {type(e).__name__}: {e}"})

    def runner() -> None:
        for t, fn in sorted(events, key=lambda e: e[0]):
            delay = start + t - clock()
            if delay > 0:
                time.sleep(delay)
            try:
                fn()
            except BaseException as e:  # reported after the run
                errors.append(e)

    threads = [threading.Thread(target=sender, name="open-loop-sender", daemon=True)]
    if events:
        threads.append(threading.Thread(target=runner, name="open-loop-events", daemon=True))
    for th in threads:
        th.start()
    last = float(times[-1]) if n else 0.0
    deadline = start + max(last, max((t for t, _ in events), default=0.0)) + drain_s
    shown = 0
    with cond:
        while state["left"] > 0:
            left = deadline - clock()
            if left <= 0:
                break
            cond.wait(min(left, 0.25))
            if bar is not None:
                done_now = n - state["left"]
                bar.update(done_now - shown)
                shown = done_now
        state["closed"] = True
    if bar is not None:
        bar.update(n - shown)
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    return outcomes, start


def probe_attainment(submit: Submit, rate: float, args: argparse.Namespace, n_items: int, seed: int) -> float:
    """SLO attainment of a short open-loop Poisson probe at ``rate`` (its first half second not scored)."""
    schedule = poisson_schedule([Phase("probe", 0.0, args.probe_s, rate)], n_items, seed)
    outcomes, _ = run_open_loop(schedule.times, lambda i, t, done: submit(int(schedule.item[i]), t, done),
                                drain_s=max(2.0, 3 * args.slo_ms / 1e3))
    lat = latencies_ms(schedule.times, outcomes)[schedule.times >= min(0.5, args.probe_s / 2)]
    return float((lat <= args.slo_ms).mean()) if len(lat) else math.nan


def closed_loop_capacity(submit: Submit, n_items: int, concurrency: int, duration_s: float, warm_s: float = 1.0,
                         clock: Callable[[], float] = time.perf_counter) -> float:
    """Answers per second with ``concurrency`` requests always outstanding (each answer sends the next).

    Counted over ``duration_s`` after ``warm_s``; then waits (up to 30 s) for the outstanding ones.
    """
    lock = threading.Lock()
    state = {"stop": False, "next": 0, "out": 0}
    answered: List[float] = []
    idle = threading.Event()

    def fire() -> None:
        with lock:
            i = state["next"] % max(1, n_items)
            state["next"] += 1
            state["out"] += 1
        submit(i, clock(), on_done)

    def on_done(result: Mapping[str, Any]) -> None:
        now = clock()
        with lock:
            state["out"] -= 1
            if not result.get("error"):
                answered.append(now)
            again = not state["stop"]
            if not again and state["out"] == 0:
                idle.set()
        if again:
            fire()

    t0 = clock()
    for _ in range(concurrency):
        fire()
    time.sleep(warm_s + duration_s)
    with lock:
        state["stop"] = True
        if state["out"] == 0:
            idle.set()
    idle.wait(30.0)
    lo, hi = t0 + warm_s, t0 + warm_s + duration_s
    return sum(lo <= t < hi for t in answered) / duration_s


# --- metrics ----------------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank ``q`` quantile (``inf`` values, unanswered requests, sort last); NaN for none.

    Example:
        >>> percentile([5, 1, 4, 2, 3], 0.5), percentile(list(range(1, 101)), 0.99), percentile([1, math.inf], 0.99)
        (3, 99, inf)
    """
    xs = sorted(values)
    if not xs:
        return math.nan
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


def latencies_ms(schedule_times: np.ndarray, outcomes: Sequence[Outcome]) -> np.ndarray:
    """Answer time minus scheduled arrival, ms; ``inf`` for unanswered or failed requests."""
    done = np.array([o.done if not o.error else math.nan for o in outcomes], dtype=float)
    lat = (done - np.asarray(schedule_times, dtype=float)) * 1e3
    lat[~np.isfinite(lat)] = math.inf
    return lat


def summarize(lat_ms: Sequence[float], correct: Sequence[bool], slo_ms: float,
              depths: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    """Requests, SLO attainment, p50/p99, accuracy (of the answered), effective accuracy (correct and on
    time, over all requests) and the depth histogram (answered requests).

    Example:
        >>> s = summarize([10.0, 20.0, 300.0, math.inf], [True, False, True, True], slo_ms=100, depths=[1, 2, 2, 0])
        >>> s["requests"], s["answered"], s["attainment"], s["effective_accuracy"], s["accuracy"], s["depth_histogram"]
        (4, 3, 0.5, 0.25, 0.6666666666666666, {1: 1, 2: 2})
        >>> s["p50_ms"], s["p99_ms"]
        (20.0, inf)
    """
    lat = np.asarray(lat_ms, dtype=float)
    ok = np.asarray(correct, dtype=bool)
    n = len(lat)
    answered = np.isfinite(lat)
    on_time = lat <= slo_ms
    hist: Dict[int, int] = {}
    if depths is not None:
        for d, a in zip(depths, answered):
            if a:
                hist[int(d)] = hist.get(int(d), 0) + 1
    return {
        "requests": n,
        "answered": int(answered.sum()),
        "attainment": float(on_time.mean()) if n else math.nan,
        "p50_ms": float(percentile(lat.tolist(), 0.50)),
        "p99_ms": float(percentile(lat.tolist(), 0.99)),
        "accuracy": float(ok[answered].mean()) if answered.any() else math.nan,
        "effective_accuracy": float((ok & on_time).mean()) if n else math.nan,
        "depth_histogram": dict(sorted(hist.items())),
    }


def window_p99(t_sched: Sequence[float], lat_ms: Sequence[float], start: float, end: float,
               width: float = 1.0) -> List[Dict[str, float]]:
    """p99 latency of the requests scheduled in each ``width``-second window of ``[start, end)``.

    Example:
        >>> w = window_p99([0.1, 0.5, 1.2, 1.9, 2.5], [10, 500, 20, 30, 40], 0.0, 3.0)
        >>> [(x["start"], x["n"], x["p99_ms"]) for x in w]
        [(0.0, 2, 500.0), (1.0, 2, 30.0), (2.0, 1, 40.0)]
    """
    t = np.asarray(t_sched, dtype=float)
    lat = np.asarray(lat_ms, dtype=float)
    out = []
    k = 0
    while start + k * width < end - 1e-9:
        lo, hi = start + k * width, min(start + (k + 1) * width, end)
        sel = (t >= lo) & (t < hi)
        out.append({"start": round(lo, 6), "n": int(sel.sum()),
                    "p99_ms": float(percentile(lat[sel].tolist(), 0.99)) if sel.any() else math.nan})
        k += 1
    return out


def recovery_time(windows: Sequence[Mapping[str, float]], slo_ms: float, step: float) -> float:
    """Seconds from the load step at ``step`` until the 1-s p99 is under the SLO for good (within the phase).

    The end of the last window (of those after the step) whose p99 exceeds the SLO, minus
    ``step``; 0 when none does; ``inf`` when the phase's last window still does (never recovered).

    Example:
        >>> w = window_p99([0.5, 1.5, 2.5, 3.5], [200, 250, 50, 60], 0.0, 4.0)
        >>> recovery_time(w, slo_ms=100, step=0.0), recovery_time(w[2:], 100, 2.0), recovery_time(w[:2], 100, 0.0)
        (2.0, 0.0, inf)
    """
    filled = [w for w in windows if w["n"] > 0]
    bad = [i for i, w in enumerate(filled) if w["p99_ms"] > slo_ms]
    if not bad:
        return 0.0
    if bad[-1] == len(filled) - 1:
        return math.inf
    last = filled[bad[-1]]
    width = (filled[1]["start"] - filled[0]["start"]) if len(filled) > 1 else 1.0
    return float(last["start"] + min(width, 1.0) - step)


def decision_overhead(decisions: Sequence[Any]) -> Dict[str, float]:
    """Decision time as a share of batch (forward) time over the distinct batches of ``decisions``."""
    seen: Dict[int, Any] = {}
    for d in decisions:
        if d is not None:
            seen[id(d)] = d
    batches = list(seen.values())
    decide = sum(float(d.decide_ms) for d in batches)
    run = sum(float(d.run_ms) for d in batches if math.isfinite(d.run_ms))
    return {"batches": len(batches), "mean_decide_ms": decide / len(batches) if batches else math.nan,
            "mean_run_ms": run / len(batches) if batches else math.nan,
            "overhead": decide / run if run > 0 else math.nan,
            "mean_batch_size": (sum(d.batch_size for d in batches) / len(batches)) if batches else math.nan}


# --- the contention process -------------------------------------------------------------------
class Contention:
    """A CPU-bound child process (a Python busy loop) pinned to one core, started and killed by pid."""

    def __init__(self, cpu: Optional[int] = None) -> None:
        try:
            allowed = sorted(os.sched_getaffinity(0))
        except AttributeError:
            allowed = list(range(os.cpu_count() or 1))
        self.cpu = allowed[-1] if cpu is None else int(cpu)
        self.proc: Optional[subprocess.Popen] = None
        self.started = math.nan
        self.record: List[Dict[str, float]] = []

    def start(self) -> None:
        if self.proc is None:
            self.proc = subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(self.cpu)],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            self.started = time.perf_counter()

    def _cpu_seconds(self) -> float:
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError, AttributeError):
            return math.nan

    def stop(self) -> None:
        if self.proc is None:
            return
        cpu = self._cpu_seconds()
        wall = time.perf_counter() - self.started
        self.proc.kill()
        self.proc.wait(10)
        self.record.append({"pid": self.proc.pid, "cpu": self.cpu, "wall_s": wall, "cpu_s": cpu,
                            "core_share": cpu / wall if wall > 0 else math.nan})
        self.proc = None


# --- the test set -----------------------------------------------------------------------------
@dataclass
class LabelledSplit:
    """Labelled images of one split: preprocessed tensors (in-process) and PNG files (HTTP)."""

    split: str
    labels: np.ndarray
    tensors: Any  # (N, C, H, W) torch tensor through the checkpoint's eval transform
    pngs: List[bytes]
    max_abs_diff_vs_training: float = math.nan

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, size: int = 64) -> List[Tuple[Any, Any]]:
        import torch

        y = torch.as_tensor(self.labels)
        return [(self.tensors[i:i + size], y[i:i + size]) for i in range(0, len(self), size)]


def digits_split_indices(split_seed: int = 0) -> Dict[str, List[int]]:
    """The indices of ``load_digits`` in each split of :func:`coopnets.train.data.digits_splits` (same calls)."""
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from coopnets.train.data import DIGITS_SPLIT

    y = torch.tensor(load_digits().target, dtype=torch.long)
    idx = list(range(len(y)))
    _, val_frac, test_frac = DIGITS_SPLIT
    rest, test_idx = train_test_split(idx, test_size=test_frac, stratify=y, random_state=split_seed)
    train_idx, val_idx = train_test_split(rest, test_size=val_frac / (1 - test_frac), stratify=y[rest],
                                          random_state=split_seed)
    return {"train": list(train_idx), "val": list(val_idx), "test": list(test_idx)}


def load_digits_split(model: Any, split: str = "test") -> LabelledSplit:
    """The digits ``split`` as the checkpoint sees it: raw 8x8 digits -> RGB image -> the checkpoint's timm
    eval transform (what ``coopnets serve`` does to a POSTed PNG); checked against the training tensors."""
    import timm
    import torch
    from sklearn.datasets import load_digits

    from coopnets.train.data import digit_image, digits_splits

    raw = load_digits()
    ids = digits_split_indices()[split]
    cfg = timm.data.resolve_data_config(model=model)
    transform = timm.data.create_transform(**cfg)
    images = [digit_image(raw.images[i]) for i in ids]
    pngs = []
    for im in images:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        pngs.append(buf.getvalue())
    tensors = torch.stack([transform(im) for im in images])
    labels = np.asarray(raw.target[ids], dtype=np.int64)
    reference = getattr(digits_splits(img_size=int(cfg["input_size"][-1])), split)
    ref_x, ref_y = reference.tensors
    if not np.array_equal(ref_y.numpy(), labels) or ref_x.shape != tensors.shape:
        raise SystemExit(f"the digits {split} split rebuilt here does not match coopnets.train.data's "
                         f"(labels or shapes differ): the benchmark would not score the split it claims to.")
    diff = float((ref_x - tensors).abs().max())
    return LabelledSplit(split, labels, tensors, pngs, diff)


# --- the checkpoint and its depths ------------------------------------------------------------
#: how the benchmark's checkpoint was made (its weights are not in git: run this, then copy ``/tmp/ckB/model`` to
#: ``benchmarks/results/serving/checkpoint``; its config.json and card are committed)
TRAIN_COMMAND = ("coopnets train --model mobilenetv3_small_100 --model-kwargs head=linear --dataset digits "
                 "--img-size 128 --epochs 10 --method multi_exit --no-amp --out /tmp/ckB")


def load_checkpoint(path: Path) -> Any:
    import coopnets

    if not (path / "model.safetensors").is_file():
        raise ValueError(f"--checkpoint {path}: no model.safetensors there (weights are not kept in git); train it "
                         f"with `{TRAIN_COMMAND}` and copy /tmp/ckB/model to {path}, or pass another checkpoint")
    return coopnets.create_model(f"local-dir:{path}", pretrained=True).eval()


def checkpoint_record(path: Path) -> Dict[str, Any]:
    cfg = json.loads((path / "config.json").read_text())
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    co = cfg.get("coopnets", {})
    return {"path": str(path.relative_to(harness.REPO)) if path.is_relative_to(harness.REPO) else str(path),
            "architecture": cfg.get("architecture"), "backbone": co.get("backbone"),
            "num_depths": co.get("num_depths"), "size_mb": size / 2**20,
            "input_size": cfg.get("pretrained_cfg", {}).get("input_size"),
            "training_command": co.get("training", {}).get("command", "(not recorded)"),
            "per_depth": co.get("per_depth", [])}


def per_depth_accuracy(model: Any, data: LabelledSplit) -> List[float]:
    import torch

    correct = [0] * model.num_depths
    with torch.inference_mode():
        for x, y in data.batches(128):
            for d in range(1, model.num_depths + 1):
                correct[d - 1] += int((model.forward_depth(x, d).argmax(-1) == y).sum())
    return [c / len(data) for c in correct]


def depth_latencies(model: Any, input_size: Sequence[int], batch_sizes: Sequence[int], repeats: int,
                    bar: Any = None) -> Dict[int, Dict[str, Any]]:
    """Per batch size: median ms of every depth, and the paired ratio full / depth 1 (interleaved timing)."""
    import torch

    out = {}
    for n in batch_sizes:
        x = torch.randn(n, *input_size)

        def fn(d: int, x: Any = x) -> Callable[[], Any]:
            def call() -> Any:
                with torch.inference_mode():
                    return model.forward_depth(x, d)
            return call

        t = harness.time_interleaved({f"depth{d}": fn(d) for d in range(1, model.num_depths + 1)},
                                     repeats=repeats, warmup=2)
        full = f"depth{model.num_depths}"
        out[int(n)] = {"median_ms": {d: 1e3 * t.median(f"depth{d}") for d in range(1, model.num_depths + 1)},
                       "full_over_depth1": t.ratio(full, "depth1")}
        if bar is not None:
            bar.update(1)
    return out


def check_depths(accuracy: Sequence[float], latency: Mapping[int, Mapping[str, Any]]) -> Dict[str, Any]:
    """The issue's condition on the checkpoint: full depth >= 3 points more accurate than depth 1 on the test
    split, and >= 2x slower at every served batch size measured.

    Example:
        >>> lat = {1: {"full_over_depth1": {"median": 3.1}}, 8: {"full_over_depth1": {"median": 2.4}}}
        >>> c = check_depths([0.90, 0.95, 0.97], lat); c["met"], round(c["accuracy_gap"], 2), c["min_latency_ratio"]
        (True, 0.07, 2.4)
        >>> check_depths([0.96, 0.98], lat)["met"]
        False
    """
    gap = accuracy[-1] - accuracy[0]
    ratios = {n: float(v["full_over_depth1"]["median"]) for n, v in latency.items()}
    min_ratio = min(ratios.values())
    return {"accuracy_gap": gap, "latency_ratios": ratios, "min_latency_ratio": min_ratio,
            "accuracy_met": gap >= TARGETS["min_accuracy_gap"] - 1e-9,
            "latency_met": min_ratio >= TARGETS["min_latency_ratio"],
            "met": gap >= TARGETS["min_accuracy_gap"] - 1e-9 and min_ratio >= TARGETS["min_latency_ratio"]}


# --- policies ---------------------------------------------------------------------------------
def policy_names(requested: Optional[Sequence[str]], num_depths: int) -> List[str]:
    """``depth1..depthN``, ``static``, ``controller``, ``controller+ee`` (default all; ``fixed`` = every depth).

    Example:
        >>> policy_names(None, 3)
        ['depth1', 'depth2', 'depth3', 'static', 'controller', 'controller+ee']
        >>> policy_names(["controller", "fixed"], 2)
        ['depth1', 'depth2', 'controller']
    """
    every = [f"depth{d}" for d in range(1, num_depths + 1)] + ["static", *CONTROLLERS]
    if not requested:
        return every
    wanted = set()
    for p in requested:
        if p == "fixed":
            wanted.update(every[:num_depths])
        elif p in every:
            wanted.add(p)
        else:
            raise SystemExit(f"unknown policy {p!r}: choose from {', '.join(every)} or 'fixed'")
    return [p for p in every if p in wanted]


def fixed_depth(policy: str, static_depth: Optional[int]) -> Optional[int]:
    if policy.startswith("depth"):
        return int(policy[5:])
    if policy == "static":
        return static_depth
    return None


class InProcessServer:
    """A policy served by :class:`~coopnets.serving.DynamicBatcher` + :class:`~coopnets.serving.DepthController`."""

    def __init__(self, model: Any, policy: str, args: argparse.Namespace, data: LabelledSplit, calibration: LabelledSplit,
                 static_depth: Optional[int]) -> None:
        from coopnets.serving import DepthController, DynamicBatcher

        common = dict(max_batch_size=args.max_batch_size, input_size=tuple(data.tensors.shape[1:]))
        depth = fixed_depth(policy, static_depth)
        if depth is not None:
            self.controller = DepthController.for_model(model, args.slo_ms, depth=depth,
                                                        accuracies=[math.nan] * model.num_depths, **common)
        else:
            self.controller = DepthController.for_model(model, args.slo_ms, calibration=calibration.batches(64),
                                                        early_exit=policy == "controller+ee", **common)
        self.options = [{"name": o.name, "depth": o.depth, "accuracy": o.accuracy} for o in self.controller.options]
        self.batcher = DynamicBatcher(self.controller, max_batch_size=args.max_batch_size,
                                      batch_wait_timeout_s=args.batch_wait_ms / 1e3)
        self.x = data.tensors

    def submit(self, item: int, scheduled: float, done: Done) -> None:
        future = self.batcher.submit(self.x[item], arrival=scheduled)

        def resolved(f: Any) -> None:
            try:
                r = f.result()
            except BaseException as e:
                done({"error": f"{type(e).__name__}: {e}"})
                return
            done({"pred": int(r.logits.argmax()), "depth": r.depth, "decision": r.decision,
                  "server_ms": r.latency_ms})

        future.add_done_callback(resolved)

    def close(self) -> None:
        drop = getattr(self.batcher, "_fail_queued", None)  # what the drain did not answer is not served later
        if drop is not None and self.batcher.queued:
            drop(RuntimeError("the benchmark's drain time is over"))
        self.batcher.close(timeout=120)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HttpServer:
    """``coopnets serve`` as a subprocess (its own session; stopped by process group) and an aiohttp client."""

    def __init__(self, checkpoint: Path, policy: str, args: argparse.Namespace, data: LabelledSplit,
                 static_depth: Optional[int], log_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        depth = fixed_depth(policy, static_depth)
        self.command = ["coopnets", "serve", str(checkpoint), "--slo-ms", f"{args.slo_ms:g}", "--host", "127.0.0.1",
                        "--port", str(self.port), "--max-batch-size", str(args.max_batch_size),
                        "--batch-wait-ms", f"{args.batch_wait_ms:g}"] + (["--depth", str(depth)] if depth else [])
        self.log_path = log_dir / f"serve-{policy}.log"
        self.log = open(self.log_path, "wb")
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "coopnets.cli", *self.command[1:]], stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                     env=env)
        self.pngs = data.pngs
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.session: Any = None
        started = time.perf_counter()
        try:
            self._wait_healthy(args.server_timeout_s)
            self.startup_s = time.perf_counter() - started
            self._start_client()
        except BaseException:
            self.close()
            raise

    def tail(self, n: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"`{' '.join(self.command)}` exited ({self.proc.returncode}) before it served:\n"
                                   f"{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=10) as r:
                    if r.status == 200:
                        return
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}"
            except OSError as e:
                last = str(e)
            time.sleep(0.5)
        raise RuntimeError(f"`{' '.join(self.command)}` did not answer /healthz within {timeout_s:.0f} s "
                           f"(last: {last}):\n{self.tail()}")

    def _start_client(self) -> None:
        import aiohttp

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="http-client", daemon=True)
        self.thread.start()

        async def session() -> Any:
            return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         timeout=aiohttp.ClientTimeout(total=None, sock_connect=30))

        self.session = asyncio.run_coroutine_threadsafe(session(), self.loop).result(30)

    async def _post(self, body: bytes, done: Done) -> None:
        try:
            async with self.session.post(self.url + "/predict", data=body,
                                         headers={"Content-Type": "image/png"}) as r:
                payload = await r.json(content_type=None)
                status = r.status
        except Exception as e:
            done({"error": f"{type(e).__name__}: {e}"})
            return
        if status != 200 or "index" not in payload:
            done({"error": f"HTTP {status}: {payload}"})
            return
        done({"pred": int(payload["index"]), "depth": int(payload["depth"]),
              "server_ms": float(payload.get("latency_ms", math.nan))})

    def submit(self, item: int, scheduled: float, done: Done) -> None:
        asyncio.run_coroutine_threadsafe(self._post(self.pngs[item], done), self.loop)

    def stats(self) -> Dict[str, Any]:
        with urllib.request.urlopen(self.url + "/stats", timeout=30) as r:
            return json.loads(r.read())

    def close(self) -> None:
        if self.loop is not None:
            if self.session is not None:
                try:
                    asyncio.run_coroutine_threadsafe(self.session.close(), self.loop).result(10)
                except Exception:
                    pass
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop = None
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # coopnets serve shuts Ray down on SIGTERM
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever of the server's process group is left (Ray's workers): ours to end
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self.log.close()


class Snapshots:
    """``/stats`` taken at named moments, each on its own thread."""

    def __init__(self, get: Callable[[], Dict[str, Any]]) -> None:
        self.get, self.taken, self.threads = get, {}, []

    def take(self, name: str) -> None:
        def run() -> None:
            try:
                self.taken[name] = self.get()
            except Exception as e:  # a missing snapshot leaves that phase's overhead unknown
                self.taken[name] = {"error": f"{type(e).__name__}: {e}"}

        th = threading.Thread(target=run, daemon=True)
        th.start()
        self.threads.append(th)

    def ordered(self, names: Sequence[str], timeout: float = 30.0) -> List[Tuple[str, Dict[str, Any]]]:
        for th in self.threads:
            th.join(timeout)
        return [(n, self.taken[n]) for n in names if n in self.taken]


def http_overhead(snapshots: Sequence[Tuple[str, Dict[str, Any]]]) -> Dict[str, Dict[str, float]]:
    """Per phase: decision and run time of the replicas' controllers between the ``/stats`` snapshots
    taken at the phase's start and end (differences of the cumulative counters)."""

    def totals(stats: Mapping[str, Any]) -> Tuple[float, float, float, float]:
        decide = run = decisions = runs = 0.0
        for rep in (stats.get("per_replica") or {}).values():
            c = rep.get("controller") or {}
            decisions += c.get("decisions", 0) or 0
            runs += c.get("runs", 0) or 0
            decide += (c.get("mean_decide_ms") or 0) * (c.get("decisions") or 0)
            run += (c.get("mean_run_ms") or 0) * (c.get("runs") or 0)
        return decide, run, decisions, runs

    out = {}
    for (name, a), (_, b) in zip(snapshots, snapshots[1:]):
        da, ra, na, ma = totals(a)
        db, rb, nb, mb = totals(b)
        batches = mb - ma
        out[name] = {"batches": batches, "mean_decide_ms": (db - da) / (nb - na) if nb > na else math.nan,
                     "mean_run_ms": (rb - ra) / batches if batches else math.nan,
                     "overhead": (db - da) / (rb - ra) if rb > ra else math.nan, "mean_batch_size": math.nan}
    return out


# --- one policy, one mode ---------------------------------------------------------------------
def analyse(schedule: Schedule, outcomes: Sequence[Outcome], labels: np.ndarray, slo_ms: float,
            overhead: Optional[Mapping[str, Mapping[str, float]]] = None) -> Dict[str, Any]:
    """Per phase: :func:`summarize`, decision overhead and 1-s windows; recovery after every load step."""
    lat = latencies_ms(schedule.times, outcomes)
    preds = np.array([o.pred for o in outcomes])
    correct = preds == labels[schedule.item] if len(outcomes) else np.zeros(0, bool)
    depth = np.array([o.depth for o in outcomes])
    sent_lag = np.array([o.sent for o in outcomes]) - schedule.times
    server_ms = np.array([o.server_ms for o in outcomes], dtype=float)
    phases: Dict[str, Any] = {}
    for i, ph in enumerate(schedule.phases):
        if ph.name == "warmup":
            continue
        sel = schedule.phase == i
        s = summarize(lat[sel], correct[sel], slo_ms, depth[sel])
        s["rate"] = ph.rate
        s["send_lag_p99_ms"] = float(1e3 * percentile(sent_lag[sel].tolist(), 0.99)) if sel.any() else math.nan
        s["errors"] = int(sum(1 for o, k in zip(outcomes, sel) if k and o.error))
        gap = lat[sel] - server_ms[sel]
        gap = gap[np.isfinite(gap)]
        s["client_minus_server_p50_ms"] = float(np.median(gap)) if len(gap) else math.nan
        if overhead is not None:
            s.update(overhead.get(ph.name, {}))
        else:
            s.update(decision_overhead([o.decision for o, k in zip(outcomes, sel) if k]))
        s["windows"] = window_p99(schedule.times[sel], lat[sel], ph.start, ph.end)
        phases[ph.name] = s
    steps = {}
    names = [p.name for p in schedule.phases]
    for a, b in zip(PHASES, PHASES[1:]):
        if a in names and b in names:
            ph = schedule.phases[names.index(b)]
            w = phases[b]["windows"]
            steps[f"{a}->{b}"] = {"at": ph.start, "recovery_s": recovery_time(w, slo_ms, ph.start),
                                  "worst_window_p99_ms": max((x["p99_ms"] for x in w if x["n"]), default=math.nan)}
    errors = sorted({o.error for o in outcomes if o.error})[:5]
    return {"phases": phases, "steps": steps, "first_errors": errors,
            "series": {"t": schedule.times.tolist(), "latency_ms": lat.tolist(), "depth": depth.tolist()}}


def run_policy(mode: str, policy: str, model: Any, args: argparse.Namespace, data: LabelledSplit, val: LabelledSplit,
               static_depth: Optional[int], state: Dict[str, Any], log_dir: Path, bar: Any) -> Dict[str, Any]:
    """Serve ``policy`` in ``mode`` through the warm-up and the phases; the analysed result."""
    started = time.perf_counter()
    bar.set_postfix_str(f"{mode} {policy}: starting")
    if mode == "inprocess":
        server: Any = InProcessServer(model, policy, args, data, val, static_depth)
    else:
        server = HttpServer(args.checkpoint, policy, args, data, static_depth, log_dir)
    contention = Contention()
    try:
        capacity = None
        if policy.startswith("depth") and (state.get("base_rate") is None or args.capacity_per_depth):
            bar.set_postfix_str(f"{mode} {policy}: measuring capacity")
            capacity = closed_loop_capacity(server.submit, len(data), concurrency=4 * args.max_batch_size,
                                            duration_s=args.calibration_s)
        if state.get("base_rate") is None:
            if not capacity:
                raise RuntimeError(f"{mode}: no request was answered while measuring full depth's capacity")
            state["capacity"] = capacity
            rate, probes = load_fraction(mode, args) * capacity, []
            # the burst must still overload full depth: never below 1.1 x its capacity / the burst factor
            floor = min(rate, 1.1 * capacity / args.burst_factor)
            for k in range(args.base_rate_probes):  # check that full depth fits the SLO there; else 0.8x, again
                bar.set_postfix_str(f"{mode} {policy}: probing {rate:.0f} req/s")
                att = probe_attainment(server.submit, rate, args, len(data), args.seed + 7919 * (k + 1))
                probes.append({"rate": rate, "attainment": att})
                if att >= TARGETS["attainment"] or rate <= floor or k + 1 == args.base_rate_probes:
                    break
                rate = max(0.8 * rate, floor)
            state["probes"] = probes
            state["base_rate"] = rate
        phases = build_phases(state["base_rate"], dict(zip(PHASES, args.durations)), args.burst_factor,
                              args.warmup_s)
        schedule = poisson_schedule(phases, len(data), args.seed)
        state["schedule"] = schedule
        events: List[Tuple[float, Callable[[], Any]]] = []
        cont = next(p for p in phases if p.contention)
        events += [(cont.start, contention.start), (cont.end, contention.stop)]
        snapper = Snapshots(server.stats) if mode == "http" else None
        if snapper is not None:  # /stats at every phase boundary, each GET on its own thread (never delays the rest)
            for ph in phases:
                if ph.name != "warmup":
                    events.append((ph.start, lambda name=ph.name: snapper.take(name)))
            events.append((phases[-1].end, lambda: snapper.take("end")))
        bar.set_postfix_str(f"{mode} {policy}: {len(schedule)} requests")
        with harness.progress_bar(total=len(schedule), desc=f"{mode} {policy}", unit="req", leave=False) as rbar:
            outcomes, _ = run_open_loop(schedule.times, lambda i, t, done: server.submit(int(schedule.item[i]), t, done),
                                        events=events, drain_s=args.drain_s, bar=rbar)
        snapshots = snapper.ordered([p.name for p in phases if p.name != "warmup"] + ["end"]) if snapper else []
        overhead = http_overhead(snapshots) if mode == "http" else None
        result = analyse(schedule, outcomes, data.labels, args.slo_ms, overhead)
        result["contention_process"] = contention.record
        result["capacity"] = capacity
        result["elapsed_s"] = time.perf_counter() - started
        if mode == "inprocess":
            result["options"] = server.options
            result["controller_stats"] = {k: v for k, v in server.controller.stats().items()
                                          if k not in ("depth_histogram", "options")}
        else:
            result["startup_s"] = server.startup_s
            result["server_command"] = " ".join(server.command)
            result["server_stats"] = {k: v for k, v in (snapshots[-1][1] if snapshots else {}).items()
                                      if k not in ("per_replica",)}
        return result
    finally:
        contention.stop()
        server.close()
        bar.set_postfix_str(f"{mode} {policy}: done in {time.perf_counter() - started:.0f} s")


def base_rate_given(mode: str, args: argparse.Namespace) -> Optional[float]:
    return args.base_rate if mode == "inprocess" else (args.http_base_rate or args.base_rate)


def load_fraction(mode: str, args: argparse.Namespace) -> float:
    return args.load_fraction if mode == "inprocess" else args.http_load_fraction


def plan_runs(mode: str, policies: Sequence[str], static_depth: Optional[int], num_depths: int,
              base_given: bool) -> Dict[str, Any]:
    """What ``mode`` runs: ``runs`` (full depth first: its capacity sets the base rate), ``aliases`` (``static``
    when its depth is run anyway: one run serves both rows) and ``skipped`` (policies the mode cannot serve).

    Example:
        >>> plan_runs("http", ["depth1", "depth2", "static", "controller", "controller+ee"], 2, 2, False)
        {'runs': ['depth2', 'depth1', 'controller'], 'aliases': {'static': 'depth2'}, 'skipped': ['controller+ee']}
    """
    full = f"depth{num_depths}"
    supported = [p for p in policies if mode != "http" or p.startswith("depth") or p in HTTP_POLICIES]
    aliases = {}
    if "static" in supported and f"depth{static_depth}" in supported:
        aliases["static"] = f"depth{static_depth}"
    runs = [p for p in supported if p not in aliases]
    if not base_given and full not in runs:
        runs.insert(0, full)
    runs.sort(key=lambda p: p != full)
    return {"runs": runs, "aliases": aliases, "skipped": [p for p in policies if p not in supported]}


def estimate_s(args: argparse.Namespace, plans: Mapping[str, Mapping[str, Any]]) -> float:
    """A rough duration of the whole run: phases, warm-up, drain allowance, profiling and server start-up."""
    per = args.warmup_s + sum(args.durations) + 0.5 * args.drain_s
    total = 0.0
    for mode, plan in plans.items():
        total += len(plan["runs"]) * (per + (35.0 if mode == "http" else 6.0))
        fixed = sum(p.startswith("depth") for p in plan["runs"]) if args.capacity_per_depth else 1
        total += fixed * (args.calibration_s + 2.0)
        if not base_rate_given(mode, args):
            total += args.probe_s + 2.0
    return total + 30.0


def run_mode(mode: str, policies: Sequence[str], model: Any, args: argparse.Namespace, data: LabelledSplit,
             val: LabelledSplit, static_depth: Optional[int], log_dir: Path, bar: Any) -> Dict[str, Any]:
    """Every policy of ``mode`` (:func:`plan_runs`), one after another, each on the same schedule."""
    given = base_rate_given(mode, args)
    state: Dict[str, Any] = {"base_rate": given, "capacity": None, "probes": []}
    plan = plan_runs(mode, policies, static_depth, model.num_depths, given is not None)
    runs, aliases, skipped = plan["runs"], plan["aliases"], plan["skipped"]
    results: Dict[str, Any] = {}
    for p in runs:
        results[p] = run_policy(mode, p, model, args, data, val, static_depth, state, log_dir, bar)
        bar.update(1)
    for p, same in aliases.items():
        results[p] = {**results[same], "same_run_as": same}
    order = [p for p in policies if p in results] + [p for p in results if p not in policies]
    return {"policies": {p: results[p] for p in order}, "requested": list(policies), "skipped": skipped,
            "aliases": aliases, "base_rate": state["base_rate"], "capacity": state["capacity"],
            "base_rate_probes": state["probes"],
            "base_rate_source": "given" if given else f"{load_fraction(mode, args):g} x full depth's measured capacity",
            "phases": [vars(p) for p in state["schedule"].phases]}


# --- targets ----------------------------------------------------------------------------------
def evaluate_targets(modes: Mapping[str, Mapping[str, Any]], num_depths: int, slo_ms: float) -> List[Dict[str, Any]]:
    """Every target of the issue, per mode and controller policy: ``met`` and the figures behind it."""
    rows: List[Dict[str, Any]] = []
    full = f"depth{num_depths}"

    def add(target: str, mode: str, policy: str, figure: str, met: Optional[bool]) -> None:
        rows.append({"target": target, "mode": mode, "policy": policy, "figure": figure, "met": met})

    for mode, res in modes.items():
        pol = res["policies"]
        fulls = pol.get(full)
        if fulls is not None:
            a = fulls["phases"]["burst"]["attainment"]
            add("load: full depth attains < 50 % in the burst", mode, full, f"{100 * a:.1f} %",
                a < TARGETS["full_burst_attainment_below"])
            q = fulls["phases"]["quiet"]["attainment"]
            add("load: full depth fits the SLO in the quiet phase (>= 99 %)", mode, full, f"{100 * q:.1f} %",
                q >= TARGETS["attainment"])
        others = [p for p in pol if p not in CONTROLLERS]
        for c in CONTROLLERS:
            if c not in pol:
                continue
            ph = pol[c]["phases"]
            add("SLO attainment >= 99 % in every phase", mode, c,
                ", ".join(f"{n} {100 * ph[n]['attainment']:.1f} %" for n in PHASES),
                all(ph[n]["attainment"] >= TARGETS["attainment"] for n in PHASES))
            fails = []
            for n in PHASES:
                for o in others:
                    e_o = pol[o]["phases"][n]["effective_accuracy"]
                    if ph[n]["effective_accuracy"] < e_o:
                        fails.append(f"{n}: {100 * ph[n]['effective_accuracy']:.1f} < {o} {100 * e_o:.1f}")
            best = {n: max((pol[o]["phases"][n]["effective_accuracy"], o) for o in others) if others else (math.nan, "-")
                    for n in PHASES}
            add("effective accuracy >= every fixed depth and the static budget, every phase", mode, c,
                "; ".join(fails) if fails else ", ".join(
                    f"{n} {100 * ph[n]['effective_accuracy']:.1f} (best other {best[n][1]} {100 * best[n][0]:.1f})"
                    for n in PHASES), (not fails) if others else None)
            if fulls is not None:
                d = ph["quiet"]["accuracy"] - fulls["phases"]["quiet"]["accuracy"]
                add("quiet: accuracy within 1 point of full depth", mode, c,
                    f"{100 * ph['quiet']['accuracy']:.1f} vs {100 * fulls['phases']['quiet']['accuracy']:.1f} "
                    f"({100 * d:+.1f} points)", d >= -TARGETS["quiet_accuracy_points"] - 1e-9)
            steps = pol[c]["steps"]
            add("recovery: 1-s p99 back under the SLO within 2 s of each load step", mode, c,
                ", ".join(f"{k} {v['recovery_s']:.0f} s" if math.isfinite(v["recovery_s"]) else f"{k} never"
                          for k, v in steps.items()),
                all(v["recovery_s"] <= TARGETS["recovery_s"] for v in steps.values()))
            ovh = [ph[n].get("overhead", math.nan) for n in PHASES]
            known = [o for o in ovh if o is not None and math.isfinite(o)]
            add("decision overhead < 1 % of batch time", mode, c,
                ", ".join(f"{n} {100 * o:.3f} %" if o is not None and math.isfinite(o) else f"{n} n/a"
                          for n, o in zip(PHASES, ovh)),
                (max(known) < TARGETS["overhead"]) if known else None)
    return rows


# --- the report -------------------------------------------------------------------------------
def fmt_ms(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return "unanswered" if math.isinf(v) else f"{v:.1f}"


def fmt_pct(v: Optional[float], digits: int = 1) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.{digits}f}"


def hist_text(h: Mapping[Any, int]) -> str:
    total = sum(h.values())
    return " ".join(f"{d}:{100 * n / total:.0f}%" for d, n in sorted(h.items(), key=lambda kv: int(kv[0]))) if total else "-"


def mode_table(res: Mapping[str, Any]) -> Tuple[List[str], List[List[Any]]]:
    head = ["policy", "phase", "rate req/s", "requests", "SLO attainment %", "p50 ms", "p99 ms", "accuracy %",
            "effective accuracy %", "depth histogram (share of requests)", "mean batch", "decision overhead % of batch"]
    rows = []
    for p, r in res["policies"].items():
        label = p + (f" (= {r['same_run_as']})" if r.get("same_run_as") else "")
        for n in PHASES:
            s = r["phases"][n]
            rows.append([label, n, f"{s['rate']:.0f}", s["requests"], fmt_pct(s["attainment"]), fmt_ms(s["p50_ms"]),
                         fmt_ms(s["p99_ms"]), fmt_pct(s["accuracy"]), fmt_pct(s["effective_accuracy"]),
                         hist_text(s["depth_histogram"]),
                         "-" if not math.isfinite(s.get("mean_batch_size", math.nan) or math.nan) else f"{s['mean_batch_size']:.1f}",
                         fmt_pct(s.get("overhead"), 3)])
    return head, rows


def figure(mode: str, res: Mapping[str, Any], slo_ms: float, num_depths: int) -> Any:
    plt = harness.pyplot()
    pols = list(res["policies"])
    fig, axes = plt.subplots(len(pols), 2, figsize=(14, 2.1 * len(pols) + 0.8), squeeze=False, sharex=True)
    phases = res["phases"]
    finite = [v for p in pols for v in res["policies"][p]["series"]["latency_ms"] if math.isfinite(v)]
    y_top = 2.0 * max(finite + [slo_ms])
    y_bottom = max(0.1, 0.5 * min(finite + [slo_ms]))
    for row, p in zip(axes, pols):
        s = res["policies"][p]["series"]
        t = np.asarray(s["t"])
        lat = np.asarray(s["latency_ms"], dtype=float)
        depth = np.asarray(s["depth"], dtype=float)
        shown = np.where(np.isfinite(lat), lat, np.nan)
        row[0].scatter(t, np.clip(shown, 0.1, None), s=2, alpha=0.35, color="tab:blue", lw=0)
        if (~np.isfinite(lat)).any():
            row[0].scatter(t[~np.isfinite(lat)], np.full((~np.isfinite(lat)).sum(), y_top / 1.5), s=4,
                           color="black", marker="x", label="unanswered")
        row[0].axhline(slo_ms, color="tab:red", lw=1, ls="--", label=f"SLO {slo_ms:g} ms")
        row[0].set_yscale("log")
        row[0].set_ylim(y_bottom, y_top)
        row[0].set_ylabel(f"{p}\nlatency ms")
        ok = np.isfinite(lat) & (depth > 0)
        row[1].scatter(t[ok], depth[ok] + np.random.default_rng(0).uniform(-0.15, 0.15, ok.sum()), s=2, alpha=0.25,
                       color="tab:green", lw=0)
        win = 0.5
        edges = np.arange(phases[0]["start"], phases[-1]["start"] + phases[-1]["duration"] + win, win)
        centres, means = [], []
        for lo, hi in zip(edges[:-1], edges[1:]):
            sel = ok & (t >= lo) & (t < hi)
            if sel.any():
                centres.append((lo + hi) / 2)
                means.append(depth[sel].mean())
        row[1].plot(centres, means, color="black", lw=1, label="mean depth (0.5 s)")
        row[1].set_ylim(0.5, num_depths + 0.5)
        row[1].set_yticks(range(1, num_depths + 1))
        row[1].set_ylabel("depth")
        for ax in row:
            for ph in phases:
                ax.axvline(ph["start"], color="grey", lw=0.6)
                if ph["contention"]:
                    ax.axvspan(ph["start"], ph["start"] + ph["duration"], color="orange", alpha=0.12)
    for ax, title in zip(axes[0], ("latency from scheduled arrival (log)", "depth each request ran to")):
        ax.set_title(title)
        for ph in phases:
            ax.text(ph["start"], 1.0, f" {ph['name']}", transform=ax.get_xaxis_transform(), fontsize=7, va="top")
    axes[0][0].legend(loc="upper right", fontsize=7)
    axes[0][1].legend(loc="lower right", fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("scheduled arrival, s (warm-up excluded from the tables; orange: contention)")
    fig.suptitle(f"{mode}: latency and chosen depth over time per policy")
    fig.tight_layout()
    return fig


def build_report(report: harness.Report, args: argparse.Namespace, ckpt: Dict[str, Any], depth_info: Dict[str, Any],
                 modes: Mapping[str, Any], targets: List[Dict[str, Any]], static: Dict[str, Any],
                 data: LabelledSplit, val: LabelledSplit) -> None:
    report.clear()
    report.text(
        "Open-loop load test (`benchmarks/serving.py`): requests arrive at seeded Poisson times per phase whether or "
        "not earlier ones are answered, and each request's latency is counted from its *scheduled* arrival, so "
        "queueing and a late sender count. Every policy of a mode gets the same schedule and images. "
        "Effective accuracy: share of requests answered correctly *and* within the SLO, measured per request on "
        f"the digits {data.split} split ({len(data)} labelled images, the checkpoint's own preprocessing; "
        "the split the checkpoint was neither trained nor selected on). Unanswered requests count as late and wrong.",
        f"Phases (warm-up of {args.warmup_s:g} s first, not scored): "
        + ", ".join(f"{n} {d:g} s" for n, d in zip(PHASES, args.durations))
        + f"; burst = {args.burst_factor:g}x the base rate; contention = the base rate while a Python busy-loop "
        "child process, pinned to one core, runs (started and killed by pid by the benchmark); recovery = the base "
        f"rate again. SLO {args.slo_ms:g} ms per request; max batch {args.max_batch_size}, batch wait "
        f"{args.batch_wait_ms:g} ms; seed {args.seed}; drain {args.drain_s:g} s after the last arrival. "
        f"Torch threads: {args.torch_threads} in the benchmark process and in every `coopnets serve` replica "
        "(it sets `torch.set_num_threads(--replica-cpus)`, default 1), for every policy alike.")
    report.heading("Checkpoint")
    la = depth_info["latency"]
    sizes = sorted(la)
    report.text(
        f"`{ckpt['path']}` ({ckpt['backbone']}, {ckpt['num_depths']} depths, input {ckpt['input_size']}, "
        f"{ckpt['size_mb']:.1f} MB), trained with:")
    report.code(ckpt["training_command"])
    head = ["depth", "test accuracy % (measured here)", "val accuracy %", "recorded in checkpoint %"] + [
        f"ms at batch {n}" for n in sizes]
    recorded = {r.get("depth"): r.get("accuracy") for r in ckpt["per_depth"]}
    rows = []
    for d in range(1, ckpt["num_depths"] + 1):
        rows.append([d, fmt_pct(depth_info["test_accuracy"][d - 1]), fmt_pct(depth_info["val_accuracy"][d - 1]),
                     fmt_pct(recorded.get(d))] + [f"{la[n]['median_ms'][d]:.2f}" for n in sizes])
    report.table(head, rows)
    chk = depth_info["check"]
    report.text(
        f"Depths must differ: full depth is {100 * chk['accuracy_gap']:.1f} points more accurate than depth 1 on the "
        f"test split (needs >= {100 * TARGETS['min_accuracy_gap']:.0f}: "
        f"{'met' if chk['accuracy_met'] else 'MISSED'}) and "
        + ", ".join(f"{harness.format_interval(la[n]['full_over_depth1'], unit='x')} slower at batch {n}" for n in sizes)
        + f" (paired interleaved timing, median [95 % interval]; needs >= {TARGETS['min_latency_ratio']:g}x: "
        f"{'met' if chk['latency_met'] else 'MISSED'})."
        + ("" if chk["met"] else " **The comparison below is not meaningful: this checkpoint's depths do not differ "
                                 "enough (run with --no-depth-check).**")
        + f" The digits images rebuilt here differ from the training tensors by at most "
        f"{data.max_abs_diff_vs_training:.3f} (normalised units; 8-bit PNG rounding and PIL's resize).")
    report.text(
        f"Static budget: `depth_for_latency(model, {args.slo_ms:g}, batch_size={args.max_batch_size})` chose depth "
        f"{static['depth']} (measured, deepest first: "
        + ", ".join(f"{t:.1f} ms" for t in static["measured_ms"]) + "); it is then served as that fixed depth, "
        "so its rows are that depth's run."
        " Controller policies (in-process): per-depth accuracies measured on the labelled validation split "
        f"({len(val)} images); `controller+ee` adds the early-exit options fitted on the same split "
        "(`DepthController.for_model(calibration=...)`). Over HTTP the controller uses the accuracies recorded in "
        "the checkpoint (what `coopnets serve` reads).")
    report.heading("Targets")
    report.table(["target", "mode", "policy", "figures", "met"],
                 [[t["target"], t["mode"], t["policy"], t["figure"],
                   "n/a" if t["met"] is None else ("met" if t["met"] else "**missed**")] for t in targets])
    for mode, res in modes.items():
        report.heading(f"Mode: {mode}")
        desc = ("in-process: `DynamicBatcher` + `DepthController` in the benchmark process, no HTTP; images "
                "preprocessed ahead (not timed)" if mode == "inprocess" else
                "end to end: one `coopnets serve` subprocess per policy (a local Ray instance), PNG images POSTed "
                "to /predict by an aiohttp client in the benchmark process; decoding, preprocessing and Ray "
                "Serve's overhead are in the latency; decision overhead from the replicas' controller counters "
                "in /stats, differenced between phase boundaries")
        cap = (f"full depth's measured capacity {res['capacity']:.0f} req/s (closed loop, "
               f"{4 * args.max_batch_size} outstanding, {args.calibration_s:g} s), " if res["capacity"] else "")
        probes = res.get("base_rate_probes") or []
        probed = ("; open-loop probes of full depth, rate: attainment: "
                  + ", ".join(f"{p['rate']:.0f} req/s: {fmt_pct(p['attainment'])} %" for p in probes)
                  + " (each 0.8x the last until full depth attains >= 99 %, but not below 1.1x full depth's "
                  "capacity / the burst factor, so that the burst overloads full depth)") if probes else ""
        report.text(f"{desc}. Base rate {res['base_rate']:.1f} req/s ({cap}{res['base_rate_source']}{probed}).")
        if res["skipped"]:
            report.text("Not run in this mode: " + ", ".join(f"`{p}`" for p in res["skipped"])
                        + (" (`coopnets serve` takes no calibration data, so it has no early-exit options)."
                           if "controller+ee" in res["skipped"] else "."))
        caps = {p: r["capacity"] for p, r in res["policies"].items() if r.get("capacity") and not r.get("same_run_as")}
        if caps:
            burst = res["base_rate"] * args.burst_factor
            report.text("Closed-loop capacity per fixed depth (requests/s with "
                        f"{4 * args.max_batch_size} outstanding, {args.calibration_s:g} s; no SLO): "
                        + ", ".join(f"{p} {c:.0f}" for p, c in sorted(caps.items()))
                        + f". The burst asks for {burst:.0f} req/s.")
        head, rows = mode_table(res)
        report.table(head, rows)
        srows = []
        for p, r in res["policies"].items():
            if r.get("same_run_as"):
                continue
            steps = r["steps"]
            lag = max((r["phases"][n]["send_lag_p99_ms"] for n in PHASES), default=math.nan)
            cont = r.get("contention_process") or [{}]
            extra = []
            if mode == "http":
                extra = [" / ".join(fmt_ms(r["phases"][n].get("client_minus_server_p50_ms", math.nan)) for n in PHASES)]
            srows.append([p] + [("never" if math.isinf(v["recovery_s"]) else f"{v['recovery_s']:.0f}")
                                + f" (worst {fmt_ms(v['worst_window_p99_ms'])})" for v in steps.values()]
                         + [f"{lag:.1f}"] + extra + [fmt_pct(cont[0].get("core_share"), 0),
                                                     sum(r["phases"][n]["errors"] for n in PHASES)])
        first = next(iter(res["policies"].values()))
        extra_head = ["client minus server latency p50 ms (per phase: proxy, HTTP, client)"] if mode == "http" else []
        report.table(["policy"] + [f"recovery s after {k} (worst 1-s p99 ms)" for k in first["steps"]]
                     + ["sender lag p99 ms (worst phase)"] + extra_head + ["busy process % of a core", "errors"], srows)
        report.image(f"{NAME}_{mode}.png", f"{mode}: latency and depth over time")
    report.note("Latency is answer time minus *scheduled* arrival (the sender's own lag, shown above, is inside "
                "it). p50/p99 are nearest-rank over the phase's requests; unanswered requests sort last. Recovery: "
                "1-s windows aligned at the load step, over the phase after it; the time until the last window "
                "whose p99 exceeds the SLO ends ('never': the phase's last window still exceeds it). Decision "
                "overhead: the controller's time deciding over its time running the batch.")
    report.note("Each policy runs once, one after another, on a machine that may carry other load; "
                "the load average at the start and end is in the machine line above. Differences of a point or "
                "two between policies in one phase are within run-to-run noise of a single run.")


# --- main -------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=CHECKPOINT, help="save_pretrained checkpoint folder")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--policies", nargs="+", default=None,
                   help="depthK..., static, controller, controller+ee, or 'fixed' (every depth); default all")
    p.add_argument("--slo-ms", type=float, default=100.0, help="latency objective per request, ms")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--batch-wait-ms", type=float, default=None, help="default min(5, slo/20), as coopnets serve")
    p.add_argument("--base-rate", type=float, default=None,
                   help="base rate, requests/s (default: --load-fraction x full depth's measured capacity, per mode)")
    p.add_argument("--http-base-rate", type=float, default=None, help="base rate over HTTP (default --base-rate)")
    p.add_argument("--load-fraction", type=float, default=0.65, help="in-process base rate / full depth's capacity")
    p.add_argument("--http-load-fraction", type=float, default=0.5,
                   help="HTTP base rate / full depth's capacity over HTTP (lower: Ray Serve's queueing adds latency)")
    p.add_argument("--no-capacity-per-depth", dest="capacity_per_depth", action="store_false",
                   help="measure the closed-loop capacity of full depth only (default: of every fixed depth run)")
    p.add_argument("--burst-factor", type=float, default=3.0, help="burst rate / base rate")
    p.add_argument("--durations", type=float, nargs=4, default=list(DEFAULT_DURATIONS),
                   metavar=("QUIET", "BURST", "CONTENTION", "RECOVERY"), help="phase lengths, s")
    p.add_argument("--warmup-s", type=float, default=4.0, help="warm-up at the base rate before the phases (not scored)")
    p.add_argument("--calibration-s", type=float, default=4.0, help="closed-loop capacity measurement, s")
    p.add_argument("--base-rate-probes", type=int, default=4,
                   help="open-loop probes of full depth at the base rate: while it attains < 99 %%, the rate x 0.8 "
                        "(not below 1.1 x its capacity / --burst-factor)")
    p.add_argument("--probe-s", type=float, default=4.0, help="length of one base-rate probe, s")
    p.add_argument("--drain-s", type=float, default=10.0,
                   help="after the last arrival, wait at most this long for answers (the rest count as unanswered)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads of the benchmark process")
    p.add_argument("--latency-repeats", type=int, default=20, help="timed rounds of the depth check")
    p.add_argument("--server-timeout-s", type=float, default=300.0, help="longest wait for coopnets serve's /healthz")
    p.add_argument("--no-depth-check", action="store_true",
                   help="go on when the checkpoint's depths do not differ enough (tests with untrained models)")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    if args.batch_wait_ms is None:
        args.batch_wait_ms = min(5.0, args.slo_ms / 20)
    args.checkpoint = args.checkpoint.resolve()
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(args.torch_threads)
    try:
        return _main(args, argv)
    finally:
        torch.set_num_threads(threads)


def _main(args: argparse.Namespace, argv: Optional[Sequence[str]]) -> Dict[str, Any]:
    from coopnets.inference.budget import depth_for_latency

    report = harness.Report.start(NAME, TITLE, __file__, argv,
                                  torch_threads=f"{args.torch_threads} (benchmark process; 1 per coopnets serve replica)")
    model = load_checkpoint(args.checkpoint)
    ckpt = checkpoint_record(args.checkpoint)
    data = load_digits_split(model, "test")
    val = load_digits_split(model, "val")
    sizes = sorted({1, args.max_batch_size})
    policies = policy_names(args.policies, model.num_depths)
    n_runs = sum(len(plan_runs(m, policies, model.num_depths, model.num_depths, base_rate_given(m, args) is not None)
                     ["runs"]) for m in args.modes)  # static taken as full depth until it is measured
    with harness.progress_bar(total=len(sizes) + n_runs, desc="serving", unit="step") as bar:
        bar.set_postfix_str("depth check")
        test_acc = per_depth_accuracy(model, data)
        val_acc = per_depth_accuracy(model, val)
        latency = depth_latencies(model, tuple(data.tensors.shape[1:]), sizes, args.latency_repeats, bar)
        check = check_depths(test_acc, latency)
        depth_info = {"test_accuracy": test_acc, "val_accuracy": val_acc, "latency": latency, "check": check}
        bar.write(f"depth check: test accuracy {[round(100 * a, 1) for a in test_acc]} %, full/depth1 latency "
                  f"{ {n: round(v, 2) for n, v in check['latency_ratios'].items()} }x: "
                  f"{'met' if check['met'] else 'NOT MET'}")
        if not check["met"] and not args.no_depth_check:
            raise SystemExit(
                f"{args.checkpoint}: the depths do not differ enough for this comparison to mean anything: full depth "
                f"is {100 * check['accuracy_gap']:.1f} points more accurate than depth 1 on the test split (needs "
                f">= {100 * TARGETS['min_accuracy_gap']:.0f}) and {check['min_latency_ratio']:.2f}x slower at worst "
                f"over batch sizes {sizes} (needs >= {TARGETS['min_latency_ratio']:g}x). Train a checkpoint whose "
                f"depths differ (e.g. a smaller --train-subset), or pass --no-depth-check.")
        static_depth, measured = depth_for_latency(model, args.slo_ms, batch_size=args.max_batch_size,
                                                   input_size=tuple(data.tensors.shape[1:]))
        static = {"depth": static_depth, "measured_ms": measured}
        plans = {m: plan_runs(m, policies, static_depth, model.num_depths, base_rate_given(m, args) is not None)
                 for m in args.modes}
        bar.total = len(sizes) + sum(len(p["runs"]) for p in plans.values())
        bar.refresh()
        bar.write(f"static budget: depth {static_depth}; runs: "
                  + "; ".join(f"{m}: {', '.join(p['runs'])}" for m, p in plans.items())
                  + f"; expect about {estimate_s(args, plans) / 60:.0f} min")
        modes: Dict[str, Any] = {}
        with tempfile.TemporaryDirectory(prefix="coopnets-serving-bench-") as log_dir:
            for mode in args.modes:
                modes[mode] = run_mode(mode, policies, model, args, data, val, static_depth, Path(log_dir), bar)
                bar.write(f"{mode}: done")
    report.finish()
    targets = evaluate_targets(modes, model.num_depths, args.slo_ms)
    build_report(report, args, ckpt, depth_info, modes, targets, static, data, val)
    args.out.mkdir(parents=True, exist_ok=True)
    for mode, res in modes.items():
        fig = figure(mode, res, args.slo_ms, model.num_depths)
        fig.savefig(args.out / f"{NAME}_{mode}.png", dpi=110)
        harness.pyplot().close(fig)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    slim = {m: {**r, "policies": {p: {k: v for k, v in pr.items() if k != "series"} for p, pr in r["policies"].items()}}
            for m, r in modes.items()}
    data_out = {"settings": settings, "targets_spec": TARGETS, "checkpoint": ckpt, "depths": depth_info,
                "static": static, "modes": slim, "targets": targets}
    report.keep_handwritten(args.out / f"{NAME}.md")  # a "(written by hand" section of an earlier run stays
    report.write(args.out, data=data_out)
    print(report.markdown())
    return {"modes": modes, "targets": targets, "depths": depth_info, "static": static}


if __name__ == "__main__":
    from coopnets.cli.errors import run_entry

    def run() -> int:
        main()  # the results dict is for callers in Python; the command's code is 0
        return 0

    sys.exit(run_entry(run, prog="benchmarks/serving.py"))
