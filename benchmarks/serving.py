"""Open-loop load test of depth-adaptive serving: fixed depths, the static budget and the controller, side by side.

What it does, and why it cannot flatter itself:

* **Open-loop arrivals.** Every request has a scheduled arrival time, drawn before the run
  (Poisson per phase, seeded: :func:`coopnets.bench.schedule.poisson_schedule`). The sender submits
  each one at its time whether or not earlier ones have been answered
  (:func:`coopnets.bench.openloop.run_open_loop`, the runner of ``coopnets bench serve``), and a
  request's latency is *its answer's time minus its scheduled arrival*: queueing, a late
  sender and a stalled server all count (no coordinated omission). Every policy of a mode
  gets the same schedule (same times, same images) in a repeat.
* **Phases.** ``quiet`` (the base rate, at which full depth fits the SLO), ``burst`` (3x the
  base rate), ``contention`` (the base rate while a CPU-bound child process started by the
  benchmark, pinned to one core, competes for the machine) and ``recovery`` (the base rate
  again). A warm-up at the base rate comes first and is not scored. The base rate is
  ``--load-fraction`` (0.65; over HTTP ``--http-load-fraction``, 0.75) of full depth's
  capacity, measured per checkpoint and mode by a short closed-loop saturation of the
  full-depth policy, then checked by short open-loop probes of full depth: 0.8x while it
  attains < 99 %, but never below the rate whose burst asks for 1.1x full depth's capacity
  in-process, 2.2x over HTTP (``--http-min-burst-overload``: the server sheds, so full depth
  answers about capacity / burst rate of the burst in time and attains < 50 % only past 2x),
  so that the burst overloads full depth (``--base-rate`` / ``--http-base-rate`` override all this).
* **Policies.** Every fixed depth (``depthK``), the static budget (``static``:
  ``coopnets.inference.budget.depth_for_latency(model, slo_ms, batch_size=max_batch)``, chosen
  once and served as that fixed depth), the controller with depth only (``controller``) and
  with depth and early exit (``controller+ee``). Over HTTP they are ``coopnets serve
  CHECKPOINT --depth K``, ``--calibration-data DIR --no-early-exit`` and ``--calibration-data
  DIR``, where DIR is an ImageFolder this script writes from the digits *validation* split
  (PNG files, one folder per class named by the checkpoint's ``label_names``); in-process the
  same accuracies and options come from ``DepthController.for_model(calibration=...)`` on the
  same images.
* **Repeats.** ``--repeats`` (3) runs of every policy, each repeat on its own seed (schedule
  and images), interleaved: repeat 1 of every policy, then repeat 2..., so that a drift in
  the machine's load hits every policy alike. Tables give the mean and a 95 % Student-t
  interval across repeats (latency percentiles: the median and its distribution-free
  interval, which is the range for 3 repeats).
* **Accuracy is measured, per request.** Each request is one labelled image of the digits
  *test* split, preprocessed by the checkpoint's own data config. Effective accuracy is the
  share of *all* requests answered correctly *and* within the SLO: a shed (503), expired
  (504), failed or unanswered request is late and wrong. Attainment is reported over all
  requests and over the admitted ones (all but the shed), with shed and expired counted apart.
* **Two modes.** ``inprocess``: :class:`coopnets.serving.DynamicBatcher` (no shedding, no
  expiry) in front of a :class:`coopnets.serving.DepthController` in this process (no HTTP;
  images preprocessed ahead). ``http``: ``coopnets serve CHECKPOINT`` (``--engine local`` by
  default: uvicorn over the batcher, one process, with its shedding and expiry) started as a
  subprocess (:class:`harness.ServeProcess`) per policy and repeat; PNG images POSTed to
  ``/predict`` by :class:`coopnets.bench.client.HttpClient` (asyncio, keep-alive connections)
  on an event loop of its own thread; decoding and preprocessing are inside the latency.
* **Overload** (``--overload``, HTTP mode): the ``--overload-policy`` server under
  ``--overload-factors`` (5, 10) times full depth's HTTP capacity for ``--overload-s`` (8, 30)
  seconds, then the base rate again: shed, expired, answered late, attainment of the
  admitted requests, and the server's resident memory (VmRSS of every process of its session,
  summed) every 0.5 s.
* **Replica death** (``--replica-kill``, HTTP mode): ``coopnets serve --engine ray
  --num-replicas 2`` with the controller at the base rate for ``--replica-kill-s`` seconds;
  ``--replica-kill-at-s`` seconds in, one replica process (found among the server's session
  by its process title, ``ray::ServeReplica:...``) gets SIGKILL. Answers, errors by status,
  connection failures, requests not answered by their deadline + 1 s, and the time until the
  1-s attainment is back at 99 %.
* **The checkpoint must make depth matter.** Before anything is served the script measures
  depth 1 against full depth on the test split and at the served batch sizes and stops
  unless full depth is at least 3 points more accurate and at least 2x slower
  (``--no-depth-check`` only for tests with untrained models). ``--checkpoint`` may be given
  several times: every checkpoint is checked first, then each gets its own section (same
  phases, policies, repeats and experiments).

Writes ``serving.md`` (tables, targets met/missed with their figures), ``serving.json`` and
figures (``serving_<checkpoint>_<mode>.png``: latency and chosen depth over time per policy,
first repeat; ``serving_<checkpoint>_overload.png``: outcomes and memory over time;
``serving_<checkpoint>_replica_kill.png``) into ``--out``.

Example (the committed results say what they were made with):
    python benchmarks/serving.py
    python benchmarks/serving.py --checkpoint benchmarks/results/serving/checkpoint --checkpoint runs/big/model
    python benchmarks/serving.py --modes inprocess --durations 5 5 5 5 --repeats 1 --policies depth1 depth4 controller
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import shlex
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

import harness
from coopnets.bench.client import HttpClient
from coopnets.bench.contention import Contention
from coopnets.bench.images import digits_images, png_bytes
from coopnets.bench.openloop import ClosedLoopResult, Done, Outcome, closed_loop, is_async, run_open_loop
from coopnets.bench.report import analyse, classify, jsonable, latencies_ms
from coopnets.bench.schedule import Phase, Schedule, back_to_back, poisson_schedule

NAME = "serving"
TITLE = "Serving under changing load: open-loop load test of depth policies"
OUT = harness.REPO / "benchmarks" / "results" / "serving"
CHECKPOINT = OUT / "checkpoint"
PHASES = ("quiet", "burst", "contention", "recovery")
MODES = ("inprocess", "http")
CONTROLLERS = ("controller", "controller+ee")
#: the model-switching baseline: the depth-only controller choosing among separately trained models (--family)
FAMILY = "family"
#: the issue's targets
TARGETS = {
    "attainment": 0.99,  # controllers, every phase, over all requests (mean of the repeats)
    "full_burst_attainment_below": 0.50,  # full depth in the burst: the load must overload it
    "best_fixed_points": 0.005,  # controllers' effective accuracy >= the best fixed depth's - 0.5 points, per phase
    "recovery_s": 2.0, "overhead": 0.01,  # 1-s p99 back under the SLO; decision time / batch time
    "min_accuracy_gap": 0.03, "min_latency_ratio": 2.0,  # the checkpoint's depths must differ
    "overload_admitted_attainment": 0.99,  # overload: attainment of the admitted requests
    "rss_growth_mib": 64.0,  # overload: resident memory at most this much above its value when the overload starts
    "kill_grace_s": 1.0,  # replica death: no request unanswered past its deadline + this
    "kill_window_attainment": 0.99,  # replica death: 1-s windows back at this attainment
}
DEFAULT_DURATIONS = (12.0, 12.0, 12.0, 12.0)
#: rough seconds to start and stop one ``coopnets serve`` (local engine; Ray), for the time estimate
START_S = {"local": 10.0, "ray": 45.0}
#: the process title of a Ray Serve replica contains this
REPLICA_TITLE = "ServeReplica"


# --- the schedule (the generic pieces are coopnets.bench's) ---------------------------------------
def build_phases(base_rate: float, durations: Mapping[str, float], burst_factor: float = 3.0,
                 warmup_s: float = 0.0) -> List[Phase]:
    """The warm-up (when ``warmup_s > 0``; not scored) and :data:`PHASES`, back to back.

    Example:
        >>> [(p.name, p.start, p.rate, p.contention) for p in build_phases(10, dict.fromkeys(PHASES, 2.0), 3, 1.0)]
        [('warmup', 0.0, 10.0, False), ('quiet', 1.0, 10.0, False), ('burst', 3.0, 30.0, False), ('contention', 5.0, 10.0, True), ('recovery', 7.0, 10.0, False)]
    """
    if not base_rate > 0:
        raise ValueError(f"the base rate must be > 0 requests/s, got {base_rate!r}")
    rates = {"quiet": base_rate, "burst": burst_factor * base_rate, "contention": base_rate, "recovery": base_rate}
    return back_to_back([(name, rates[name], float(durations[name]), name == "contention") for name in PHASES],
                        warmup_s=warmup_s, warmup_rate=base_rate)


def repeat_seed(seed: int, repeat: int) -> int:
    """The schedule seed of repeat ``repeat`` (0-based): every repeat draws its own arrivals and images.

    Example:
        >>> [repeat_seed(0, r) for r in range(3)]
        [0, 1, 2]
    """
    return int(seed) + int(repeat)


def interleaved(repeats: int, runs: Mapping[str, Sequence[str]]) -> List[Tuple[int, str, str]]:
    """The order of the runs: repeat 1 of every mode's every policy, then repeat 2, ...

    Example:
        >>> interleaved(2, {"http": ["depth2", "controller"]})
        [(0, 'http', 'depth2'), (0, 'http', 'controller'), (1, 'http', 'depth2'), (1, 'http', 'controller')]
    """
    return [(r, mode, p) for r in range(repeats) for mode, policies in runs.items() for p in policies]


def request_submit(server: Any, items: Sequence[int]) -> Any:
    """The submit of request ``i`` (image ``items[i]``) to ``server`` for :func:`run_open_loop`: a callback one
    in-process, an async one over HTTP (run on the client's event loop, ``server.loop``)."""
    if not is_async(server.submit):
        return lambda i, t, done: server.submit(int(items[i]), t, done)

    async def submit(i: int, t: float) -> Mapping[str, Any]:
        return await server.submit(int(items[i]), t)

    return submit


def run_closed_loop(submit: Any, n_items: int, concurrency: int, duration_s: float,
                    loop: Optional[asyncio.AbstractEventLoop] = None) -> ClosedLoopResult:
    """:func:`coopnets.bench.openloop.closed_loop` (1-s warm-up) from synchronous code, on ``loop`` when given."""
    coro = closed_loop(submit, n_items, concurrency, duration_s, warm_s=1.0)
    return asyncio.run(coro) if loop is None else asyncio.run_coroutine_threadsafe(coro, loop).result()


def probe_attainment(server: Any, rate: float, args: argparse.Namespace, n_items: int, seed: int) -> float:
    """SLO attainment of a short open-loop Poisson probe at ``rate`` (its first half second not scored)."""
    schedule = poisson_schedule([Phase("probe", 0.0, args.probe_s, rate)], n_items, seed)
    outcomes, _ = run_open_loop(schedule.times, request_submit(server, schedule.item),
                                drain_s=max(2.0, 3 * args.slo_ms / 1e3), loop=server.loop)
    lat = latencies_ms(schedule.times, outcomes)[schedule.times >= min(0.5, args.probe_s / 2)]
    return float((lat <= args.slo_ms).mean()) if len(lat) else math.nan


# --- metrics (the generic ones are coopnets.bench.report's) ----------------------------------------
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


def analyse_run(schedule: Schedule, outcomes: Sequence[Outcome], labels: np.ndarray, slo_ms: float,
                overhead: Optional[Mapping[str, Mapping[str, float]]] = None) -> Dict[str, Any]:
    """:func:`coopnets.bench.report.analyse` of one run with per-request correctness (the answer's class index
    against the image's label), plus decision overhead and mean batch size per phase (``overhead`` from the
    server's ``/stats``, else from the in-process decisions)."""
    preds = np.array([o.pred for o in outcomes], dtype=np.int64)
    correct = (preds == labels[schedule.item]) & np.array([not o.error for o in outcomes], dtype=bool)
    result = analyse(schedule, outcomes, slo_ms, correct)
    for name, s in result["phases"].items():
        if overhead is not None:
            s.update(overhead.get(name, {}))
        else:
            sel = np.flatnonzero(schedule.phase == schedule.index(name))
            s.update(decision_overhead([outcomes[k].decision for k in sel]))
    return result


#: per-phase figures averaged over repeats (mean and Student-t interval) ...
MEAN_KEYS = ("attainment", "admitted_attainment", "effective_accuracy", "accuracy", "goodput_per_s", "requests",
             "answered", "shed", "expired", "errors", "unanswered", "overhead", "mean_batch_size", "send_lag_p99_ms",
             "client_minus_server_p50_ms")
#: ... of which these are shares (their interval is clipped to [0, 1]) and the rest counts or times (clipped at 0)
SHARE_KEYS = ("attainment", "admitted_attainment", "effective_accuracy", "accuracy")
#: ... and summarised by the median and its distribution-free interval (percentiles; may be infinite)
MEDIAN_KEYS = ("p50_ms", "p99_ms", "recovery_s")


def _finite(values: Sequence[Any]) -> List[float]:
    return [float(v) for v in values if v is not None and isinstance(v, (int, float)) and math.isfinite(float(v))]


def summarize_repeats(runs: Sequence[Mapping[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Per phase: every :data:`MEAN_KEYS` figure as ``harness.t_interval`` over the repeats (NaN ones left out),
    the interval clipped to the values a share or a count can take, every :data:`MEDIAN_KEYS` one as
    ``harness.median_interval``, the per-repeat values of the main ones, the
    totals of the counts and the depth histogram summed over the repeats.

    Example:
        >>> run = lambda a: {"phases": {"quiet": {"attainment": a, "rate": 5.0, "shed": 1, "p99_ms": 50.0,
        ...                                       "depth_histogram": {1: 2}}}}
        >>> s = summarize_repeats([run(0.98), run(1.0)])["quiet"]
        >>> round(s["attainment"]["mean"], 3), s["attainment"]["n"], s["total"]["shed"], s["depth_histogram"], s["rate"]
        (0.99, 2, 2, {1: 4}, 5.0)
    """
    out: Dict[str, Dict[str, Any]] = {}
    names = [n for n in runs[0]["phases"]] if runs else []
    for name in names:
        rows = [r["phases"][name] for r in runs]
        s: Dict[str, Any] = {"rate": rows[0].get("rate"), "repeats": len(rows)}
        for k in MEAN_KEYS:
            vals = _finite([row.get(k) for row in rows])
            iv = dict(harness.t_interval(vals)) if vals else {"mean": math.nan, "lo": math.nan, "hi": math.nan, "n": 0}
            top = 1.0 if k in SHARE_KEYS else math.inf
            for b in ("lo", "hi"):
                if math.isfinite(iv[b]):
                    iv[b] = min(max(iv[b], 0.0), top)
            s[k] = iv
        for k in MEDIAN_KEYS:
            vals = [float(row[k]) for row in rows if row.get(k) is not None and not math.isnan(float(row[k]))]
            s[k] = harness.median_interval(vals)
        s["per_repeat"] = {k: [row.get(k) for row in rows]
                           for k in ("attainment", "admitted_attainment", "effective_accuracy", "shed", "expired")}
        s["total"] = {k: int(sum(row.get(k) or 0 for row in rows))
                      for k in ("requests", "answered", "shed", "expired", "errors", "unanswered")}
        hist: Dict[int, int] = {}
        for row in rows:
            for d, n in (row.get("depth_histogram") or {}).items():
                hist[int(d)] = hist.get(int(d), 0) + int(n)
        s["depth_histogram"] = dict(sorted(hist.items()))
        out[name] = s
    return out


def mean_of(summary: Mapping[str, Any], phase: str, key: str) -> float:
    v = summary.get(phase, {}).get(key) or {}
    return float(v.get("mean", v.get("median", math.nan)))


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


def load_digits_split(model: Any, split: str = "test") -> LabelledSplit:
    """The digits ``split`` as the checkpoint sees it: raw 8x8 digits -> RGB image -> the checkpoint's timm
    eval transform (what ``coopnets serve`` does to a POSTed PNG); checked against the training tensors.
    The PNGs are :func:`coopnets.bench.images.digits_images`' (what ``coopnets bench serve --dataset digits``
    sends)."""
    import timm
    import torch

    from coopnets.train.data import digits_splits

    images, labels = digits_images(split)
    cfg = timm.data.resolve_data_config(model=model)
    transform = timm.data.create_transform(**cfg)
    pngs = [png_bytes(im) for im in images]
    tensors = torch.stack([transform(im) for im in images])
    reference = getattr(digits_splits(img_size=int(cfg["input_size"][-1])), split)
    ref_x, ref_y = reference.tensors
    if not np.array_equal(ref_y.numpy(), labels) or ref_x.shape != tensors.shape:
        raise SystemExit(f"the digits {split} split rebuilt here does not match coopnets.train.data's "
                         f"(labels or shapes differ): the benchmark would not score the split it claims to.")
    diff = float((ref_x - tensors).abs().max())
    return LabelledSplit(split, labels, tensors, pngs, diff)


def write_image_folder(split: LabelledSplit, label_names: Sequence[str], root: Path) -> Path:
    """``split`` as an ImageFolder for ``coopnets serve --calibration-data``: ``root/<label name>/<k>.png``, the
    PNG bytes the HTTP requests carry, each in the folder named by its class's label name.

    Example:
        >>> import tempfile
        >>> s = LabelledSplit("val", np.array([1, 0, 1]), None, [b"a", b"b", b"c"])
        >>> root = write_image_folder(s, ["zero", "one"], Path(tempfile.mkdtemp()) / "val")
        >>> sorted(str(p.relative_to(root)) for p in root.rglob("*.png"))
        ['one/0000.png', 'one/0002.png', 'zero/0001.png']
    """
    bad = [n for n in label_names if not str(n) or "/" in str(n) or str(n) in (".", "..") or str(n).startswith(".")]
    if bad:
        raise ValueError(f"label names {bad[:3]} cannot name class folders; the calibration ImageFolder needs "
                         f"plain names")
    root.mkdir(parents=True, exist_ok=True)
    for k, (png, y) in enumerate(zip(split.pngs, split.labels)):
        folder = root / str(label_names[int(y)])
        folder.mkdir(exist_ok=True)
        (folder / f"{k:04d}.png").write_bytes(png)
    return root


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


def checkpoint_tags(records: Sequence[Mapping[str, Any]]) -> List[str]:
    """A short file-name-safe name per checkpoint (backbone and input size), made unique.

    Example:
        >>> checkpoint_tags([{"backbone": "mobilenetv3_small_100", "input_size": [3, 128, 128]},
        ...                  {"backbone": "mobilenetv3_small_100", "input_size": [3, 128, 128]}, {"path": "x/ck"}])
        ['mobilenetv3_small_100_128px', 'mobilenetv3_small_100_128px-2', 'ck']
    """
    tags: List[str] = []
    for r in records:
        size = (r.get("input_size") or [None])[-1]
        base = f"{r['backbone']}_{size}px" if r.get("backbone") and size else Path(str(r.get("path", "model"))).name
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", base) or "model"
        tag, k = base, 2
        while tag in tags:
            tag, k = f"{base}-{k}", k + 1
        tags.append(tag)
    return tags


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


@dataclass
class Checkpoint:
    """One checkpoint under test: the model, its data, its depth check and where its calibration folder is."""

    path: Path
    tag: str
    model: Any
    record: Dict[str, Any]
    data: LabelledSplit  # the test split: the requests
    val: LabelledSplit  # the validation split: the controllers' calibration
    depth_info: Dict[str, Any]
    static: Dict[str, Any]
    calibration_dir: Path
    plans: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    family: Optional[Any] = None  # the model-switching baseline (a ModelFamily), served as policy "family"
    family_path: Optional[Path] = None
    family_info: Dict[str, Any] = field(default_factory=dict)

    @property
    def num_depths(self) -> int:
        return int(self.model.num_depths)


def prepare_checkpoint(path: Path, tag: str, args: argparse.Namespace, work: Path, bar: Any,
                       family: Optional[Path] = None) -> Checkpoint:
    """Load ``path``, measure its depths (stop unless they differ enough, or ``--no-depth-check``), choose the
    static depth and write the calibration ImageFolder; with ``family`` (an ``independent`` sweep), load the
    model family too and measure its members (:func:`family_record`)."""
    from coopnets.inference.budget import depth_for_latency

    bar.set_postfix_str(f"{tag}: depth check")
    model = load_checkpoint(path)
    record = checkpoint_record(path)
    data = load_digits_split(model, "test")
    val = load_digits_split(model, "val")
    sizes = sorted({1, args.max_batch_size})
    test_acc = per_depth_accuracy(model, data)
    val_acc = per_depth_accuracy(model, val)
    latency = depth_latencies(model, tuple(data.tensors.shape[1:]), sizes, args.latency_repeats, bar)
    check = check_depths(test_acc, latency)
    bar.write(f"{tag}: test accuracy per depth {[round(100 * a, 1) for a in test_acc]} %, full/depth1 latency "
              f"{ {n: round(v, 2) for n, v in check['latency_ratios'].items()} }x: "
              f"{'met' if check['met'] else 'NOT MET'}")
    if not check["met"] and not args.no_depth_check:
        raise SystemExit(
            f"{path}: the depths do not differ enough for this comparison to mean anything: full depth "
            f"is {100 * check['accuracy_gap']:.1f} points more accurate than depth 1 on the test split (needs "
            f">= {100 * TARGETS['min_accuracy_gap']:.0f}) and {check['min_latency_ratio']:.2f}x slower at worst "
            f"over batch sizes {sizes} (needs >= {TARGETS['min_latency_ratio']:g}x). Train a checkpoint whose "
            f"depths differ (e.g. a smaller --train-subset), or pass --no-depth-check.")
    static_depth, measured = depth_for_latency(model, args.slo_ms, batch_size=args.max_batch_size,
                                               input_size=tuple(data.tensors.shape[1:]))
    names = model.pretrained_cfg.get("label_names") or [str(k) for k in range(model.num_classes)]
    calibration_dir = write_image_folder(val, names, work / f"calibration-{tag}")
    ck = Checkpoint(path, tag, model, record, data, val,
                    {"test_accuracy": test_acc, "val_accuracy": val_acc, "latency": latency, "check": check},
                    {"depth": int(static_depth), "measured_ms": measured}, calibration_dir)
    if family is not None:
        bar.set_postfix_str(f"{tag}: the model family")
        ck.family, ck.family_path, ck.family_info = family_record(family, ck, args, bar)
    return ck


def family_record(path: Path, ck: Checkpoint, args: argparse.Namespace, bar: Any) -> Tuple[Any, Path, Dict[str, Any]]:
    """The model family of ``path`` (:meth:`ModelFamily.from_sweep`) beside checkpoint ``ck``: each member's test
    and validation accuracy, latency at the served batch sizes, parameter bytes and load time, and the one
    network's parameter bytes."""
    from coopnets.inference.profiler import parameter_bytes
    from coopnets.serving.family import ModelFamily

    family = ModelFamily.from_sweep(path).eval()
    if family.num_depths != ck.num_depths:
        raise SystemExit(f"--family {path}: {family.num_depths} members, but {ck.path} has {ck.num_depths} depths; "
                         f"give the independent sweep of the same backbone")
    test_acc, val_acc = per_depth_accuracy(family, ck.data), per_depth_accuracy(family, ck.val)
    latency = depth_latencies(family, tuple(ck.data.tensors.shape[1:]), sorted({1, args.max_batch_size}),
                              args.latency_repeats, bar)
    cfg = json.loads((path / "depth1" / "config.json").read_text()) if (path / "depth1" / "config.json").is_file() else {}
    info = {"path": str(path.relative_to(harness.REPO)) if path.is_relative_to(harness.REPO) else str(path),
            "members": family.describe()["family"], "test_accuracy": test_acc, "val_accuracy": val_acc,
            "latency": latency, "parameter_bytes": family.parameter_bytes(),
            "one_network_parameter_bytes": parameter_bytes(ck.model),
            "training_command": cfg.get("command") or "(not recorded)"}
    bar.write(f"{ck.tag} family: test accuracy per member {[round(100 * a, 1) for a in test_acc]} %, "
              f"{info['parameter_bytes'] / 2**20:.1f} MiB of weights against {info['one_network_parameter_bytes'] / 2**20:.1f}")
    return family, path, info


# --- policies ---------------------------------------------------------------------------------
def policy_names(requested: Optional[Sequence[str]], num_depths: int, family: bool = False) -> List[str]:
    """``depth1..depthN``, ``static``, ``controller``, ``controller+ee`` and, with a model family, ``family``
    (default all; ``fixed`` = every depth).

    Example:
        >>> policy_names(None, 3)
        ['depth1', 'depth2', 'depth3', 'static', 'controller', 'controller+ee']
        >>> policy_names(["controller", "fixed"], 2)
        ['depth1', 'depth2', 'controller']
        >>> policy_names(["depth2", "controller", "family"], 2, family=True)
        ['depth2', 'controller', 'family']
    """
    every = [f"depth{d}" for d in range(1, num_depths + 1)] + ["static", *CONTROLLERS] + ([FAMILY] if family else [])
    if not requested:
        return every
    wanted = set()
    for p in requested:
        if p == "fixed":
            wanted.update(every[:num_depths])
        elif p in every:
            wanted.add(p)
        else:
            hint = " (family needs --family)" if p == FAMILY else ""
            raise SystemExit(f"unknown policy {p!r}{hint}: choose from {', '.join(every)} or 'fixed'")
    return [p for p in every if p in wanted]


def fixed_depth(policy: str, static_depth: Optional[int]) -> Optional[int]:
    if policy.startswith("depth"):
        return int(policy[5:])
    if policy == "static":
        return static_depth
    return None


def serve_args(policy: str, static_depth: Optional[int], args: argparse.Namespace, calibration_dir: Path,
               engine: str = "local", replicas: "int | str" = 1, calibrate: bool = True) -> List[str]:
    """The ``coopnets serve`` arguments (after MODEL) of ``policy``; ``calibrate=False``: a depth-only controller
    trades depths by the checkpoint's recorded validation accuracies instead of measuring them on
    ``calibration_dir`` at start-up (a replica then starts sooner).

    Example:
        >>> a = argparse.Namespace(slo_ms=100.0, max_batch_size=8, batch_wait_ms=5.0, torch_threads=1, server_args="")
        >>> " ".join(serve_args("controller", 4, a, Path("/cal")))
        '--slo-ms 100 --max-batch-size 8 --batch-wait-ms 5 --engine local --torch-threads 1 --calibration-data /cal --no-early-exit'
        >>> " ".join(serve_args("static", 3, a, Path("/cal"), engine="ray", replicas=2)[6:])
        '--engine ray --num-replicas 2 --depth 3'
        >>> " ".join(serve_args("controller", 3, a, Path("/cal"), engine="ray", replicas="auto", calibrate=False)[6:])
        '--engine ray --num-replicas auto'
    """
    out = ["--slo-ms", f"{args.slo_ms:g}", "--max-batch-size", str(args.max_batch_size),
           "--batch-wait-ms", f"{args.batch_wait_ms:g}"]
    if engine == "local":
        out += ["--engine", "local", "--torch-threads", str(args.torch_threads)]
    else:
        out += ["--engine", "ray", "--num-replicas", str(replicas)]
    depth = fixed_depth(policy, static_depth)
    if depth is not None:
        out += ["--depth", str(depth)]
    elif (policy in CONTROLLERS or policy == FAMILY) and (calibrate or policy == "controller+ee"):
        # the family: the depth-only controller over its members
        out += ["--calibration-data", str(calibration_dir)] + (["--no-early-exit"] if policy != "controller+ee" else [])
    return out + shlex.split(args.server_args or "")


class InProcessServer:
    """A policy served by :class:`~coopnets.serving.DynamicBatcher` + :class:`~coopnets.serving.DepthController`
    (no shedding, no expiry: every request is computed, however late)."""

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
        self.loop: Optional[asyncio.AbstractEventLoop] = None  # callback submit: the runners use their own loop

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
        if self.batcher.queued:  # what the drain did not answer is not served later
            self.batcher.fail_queued(RuntimeError("the benchmark's drain time is over"))
        self.batcher.close(timeout=120)


class HttpServer:
    """``coopnets serve`` as a :class:`harness.ServeProcess` and an :class:`HttpClient` on an event loop of its own
    thread (``loop``; :meth:`submit` is async and runs there)."""

    def __init__(self, checkpoint: Path, args: Sequence[str], pngs: Sequence[bytes], log: Path,
                 timeout_s: float) -> None:
        self.process = harness.ServeProcess(str(checkpoint), list(args), log, timeout_s=timeout_s)
        self.pngs = pngs
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="http-client", daemon=True)
        self.thread.start()
        self.client = HttpClient(self.process.url, max_connections=4096, connect_timeout_s=30)

    @property
    def command(self) -> str:
        return " ".join(self.process.command)

    @property
    def pid(self) -> int:
        """The server's pid, also the id of its session (:func:`harness.session_pids`)."""
        return self.process.proc.pid

    @property
    def startup_s(self) -> float:
        return self.process.startup_s

    async def submit(self, item: int, scheduled: float) -> Mapping[str, Any]:
        """POST image ``item``; the result (``pred``, ``depth``, ``server_ms``, ``status``, or ``error``)."""
        return await self.client.predict(self.pngs[item])

    def stats(self) -> Dict[str, Any]:
        return self.process.stats()

    def close(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.client.close(), self.loop).result(10)
        except Exception:
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.process.close()


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
    """Per phase: decision and run time of the servers' controllers and the mean batch size between the
    ``/stats`` snapshots taken at the phase's start and end (differences of the cumulative counters).

    Example:
        >>> snap = lambda n, ms, sizes: {"batch_size_histogram": sizes, "per_replica": {"r": {"controller": {
        ...     "decisions": n, "runs": n, "mean_decide_ms": 0.01, "mean_run_ms": ms}}}}
        >>> o = http_overhead([("quiet", snap(0, 0, {})), ("end", snap(10, 20.0, {"4": 5, "8": 5}))])["quiet"]
        >>> o["batches"], round(o["overhead"], 4), o["mean_batch_size"]
        (10.0, 0.0005, 6.0)
    """

    def totals(stats: Mapping[str, Any]) -> Tuple[float, float, float, float, float, float]:
        decide = run = decisions = runs = 0.0
        for rep in (stats.get("per_replica") or {}).values():
            c = rep.get("controller") or {}
            decisions += c.get("decisions", 0) or 0
            runs += c.get("runs", 0) or 0
            decide += (c.get("mean_decide_ms") or 0) * (c.get("decisions") or 0)
            run += (c.get("mean_run_ms") or 0) * (c.get("runs") or 0)
        sizes = stats.get("batch_size_histogram") or {}
        return decide, run, decisions, runs, float(sum(sizes.values())), float(sum(int(k) * v for k, v in sizes.items()))

    out = {}
    for (name, a), (_, b) in zip(snapshots, snapshots[1:]):
        da, ra, na, ma, ba, sa = totals(a)
        db, rb, nb, mb, bb, sb = totals(b)
        batches = mb - ma
        out[name] = {"batches": batches, "mean_decide_ms": (db - da) / (nb - na) if nb > na else math.nan,
                     "mean_run_ms": (rb - ra) / batches if batches else math.nan,
                     "overhead": (db - da) / (rb - ra) if rb > ra else math.nan,
                     "mean_batch_size": (sb - sa) / (bb - ba) if bb > ba else math.nan}
    return out


# --- the server's processes: memory, replicas -------------------------------------------------
def vm_rss_mib(pid: int) -> float:
    """``VmRSS`` of ``pid`` from ``/proc/PID/status``, MiB (NaN when it is gone or has none)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return math.nan


def process_title(pid: int) -> str:
    """``/proc/PID/cmdline`` as one line (Ray's workers write their title there)."""
    try:
        return " ".join(Path(f"/proc/{pid}/cmdline").read_bytes().decode("utf-8", "replace").split("\0")).strip()
    except OSError:
        return ""


class RssSampler:
    """Every ``period_s``, the summed VmRSS of every process of the server's session (``pids()``), on a thread.

    ``samples`` are ``(perf_counter time, MiB, processes)``; ``error`` the failure that stopped the sampling.
    """

    def __init__(self, pids: Callable[[], Sequence[int]], period_s: float = 0.5) -> None:
        self.pids, self.period_s = pids, float(period_s)
        self.samples: List[Tuple[float, float, int]] = []
        self.error = ""
        self.join_s = 10.0  # longest wait for the thread at stop()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=type(self).__name__, daemon=True)

    def sample(self) -> None:
        values = [v for v in (vm_rss_mib(p) for p in self.pids()) if math.isfinite(v)]
        self.samples.append((time.perf_counter(), float(sum(values)), len(values)))

    def _run(self) -> None:
        while True:
            try:
                self.sample()
            except Exception as e:  # reported with the results, not as a thread's traceback
                self.error = f"{type(e).__name__}: {e}"
                return
            if self._stop.wait(self.period_s):
                return

    def start(self) -> "RssSampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.join_s)


def replica_pids(session: Sequence[int]) -> List[int]:
    """The pids among ``session`` whose process title names a Ray Serve replica (:data:`REPLICA_TITLE`)."""
    return sorted(p for p in session if REPLICA_TITLE in process_title(p))


# --- one policy, one mode, one repeat ----------------------------------------------------------
def base_rate_given(mode: str, args: argparse.Namespace) -> Optional[float]:
    return args.base_rate if mode == "inprocess" else (args.http_base_rate or args.base_rate)


def load_fraction(mode: str, args: argparse.Namespace) -> float:
    return args.load_fraction if mode == "inprocess" else args.http_load_fraction


def min_burst_overload(mode: str, args: argparse.Namespace) -> float:
    """The least burst rate the base-rate probes keep, in multiples of full depth's capacity: 1.1 in-process
    (no shedding: any overload queues without bound), ``--http-min-burst-overload`` (2.2) over HTTP, where the
    server sheds and full depth still answers about capacity / burst rate of the burst in time, so the burst
    must ask for over twice its capacity for full depth to attain < 50 %."""
    return 1.1 if mode == "inprocess" else args.http_min_burst_overload


def start_server(mode: str, policy: str, ck: Checkpoint, args: argparse.Namespace, log: Path) -> Any:
    family = policy == FAMILY
    if mode == "inprocess":
        return InProcessServer(ck.family if family else ck.model, policy, args, ck.data, ck.val, ck.static["depth"])
    return HttpServer(ck.family_path if family else ck.path,
                      serve_args(policy, ck.static["depth"], args, ck.calibration_dir, args.engine, args.num_replicas),
                      ck.data.pngs, log, args.server_timeout_s)


def set_base_rate(mode: str, server: Any, capacity: float, args: argparse.Namespace, state: Dict[str, Any],
                  n_items: int, bar: Any, label: str) -> None:
    """The base rate from full depth's ``capacity``: ``load_fraction`` of it, checked by open-loop probes."""
    if not capacity:
        raise RuntimeError(f"{label}: no request was answered while measuring full depth's capacity")
    state["capacity"] = capacity
    rate, probes = load_fraction(mode, args) * capacity, []
    # the burst must still overload full depth: never below min_burst_overload x its capacity / the burst factor
    floor = min(rate, min_burst_overload(mode, args) * capacity / args.burst_factor)
    for k in range(args.base_rate_probes):  # check that full depth fits the SLO there; else 0.8x, again
        bar.set_postfix_str(f"{label}: probing {rate:.0f} req/s")
        att = probe_attainment(server, rate, args, n_items, args.seed + 7919 * (k + 1))
        probes.append({"rate": rate, "attainment": att})
        if att >= TARGETS["attainment"] or rate <= floor or k + 1 == args.base_rate_probes:
            break
        rate = max(0.8 * rate, floor)
    state["probes"] = probes
    state["base_rate"] = rate


def run_policy(mode: str, policy: str, repeat: int, ck: Checkpoint, args: argparse.Namespace,
               state: Dict[str, Any], log_dir: Path, bar: Any) -> Dict[str, Any]:
    """Serve ``policy`` in ``mode`` through the warm-up and the phases of repeat ``repeat``; the analysed result."""
    started = time.perf_counter()
    label = f"{ck.tag} {mode} {policy} #{repeat + 1}"
    bar.set_postfix_str(f"{label}: starting")
    server = start_server(mode, policy, ck, args, log_dir / f"serve-{ck.tag}-{policy}-{repeat + 1}.log")
    contention = Contention()
    try:
        capacity = None
        if repeat == 0 and policy.startswith("depth") and (state.get("base_rate") is None or args.capacity_per_depth):
            bar.set_postfix_str(f"{label}: measuring capacity")
            closed = run_closed_loop(server.submit, len(ck.data), 4 * args.max_batch_size, args.calibration_s,
                                     loop=server.loop)
            capacity = closed.answers_per_s
            state["capacities"][policy] = capacity
            if policy == f"depth{ck.num_depths}":
                state["capacity"] = capacity
            if not capacity:
                raise RuntimeError(f"{label}: no request was answered 200 in the closed loop ({closed.errors} errors, "
                                   f"by status {closed.errors_by_status}, first: {closed.first_errors[:2]})")
        if state.get("base_rate") is None:
            set_base_rate(mode, server, capacity or 0.0, args, state, len(ck.data), bar, label)
        phases = build_phases(state["base_rate"], dict(zip(PHASES, args.durations)), args.burst_factor,
                              args.warmup_s)
        schedule = poisson_schedule(phases, len(ck.data), repeat_seed(args.seed, repeat))
        state["phases"] = phases
        events: List[Tuple[float, Callable[[], Any]]] = []
        cont = next(p for p in phases if p.contention)
        events += [(cont.start, lambda: contention.start(cont.name)), (cont.end, contention.stop)]
        snapper = Snapshots(server.stats) if mode == "http" else None
        if snapper is not None:  # /stats at every phase boundary, each GET on its own thread (never delays the rest)
            for ph in phases:
                if ph.name != "warmup":
                    events.append((ph.start, lambda name=ph.name: snapper.take(name)))
            events.append((phases[-1].end, lambda: snapper.take("end")))
        bar.set_postfix_str(f"{label}: {len(schedule)} requests")
        sampler = RssSampler(lambda: harness.session_pids(server.pid), period_s=1.0) if mode == "http" else None
        if sampler is not None:  # the server's resident memory through the run
            sampler.start()
        try:
            with harness.progress_bar(total=len(schedule), desc=label, unit="req", leave=False) as rbar:
                outcomes, _ = run_open_loop(schedule.times, request_submit(server, schedule.item), events=events,
                                            drain_s=args.drain_s, bar=rbar, loop=server.loop)
        finally:
            if sampler is not None:
                sampler.stop()
        snapshots = snapper.ordered([p.name for p in phases if p.name != "warmup"] + ["end"]) if snapper else []
        result = analyse_run(schedule, outcomes, ck.data.labels, args.slo_ms,
                             http_overhead(snapshots) if mode == "http" else None)
        result.update({"seed": repeat_seed(args.seed, repeat), "contention_process": contention.record,
                       "capacity": capacity})
        if mode == "inprocess":
            result["options"] = server.options
            result["controller_stats"] = {k: v for k, v in server.controller.stats().items()
                                          if k not in ("depth_histogram", "options")}
        else:
            result["startup_s"] = server.startup_s
            result["server_command"] = server.command
            result["server_stats"] = {k: v for k, v in (snapshots[-1][1] if snapshots else {}).items()
                                      if k not in ("per_replica",)}
            rss = [mib for _, mib, _ in sampler.samples] if sampler is not None else []
            result["memory"] = {"rss_median_mib": float(np.median(rss)) if rss else math.nan,
                                "rss_max_mib": float(max(rss)) if rss else math.nan,
                                "parameter_bytes": (result["server_stats"].get("model") or {}).get("parameter_bytes")}
        return result
    finally:
        contention.stop()
        server.close()
        bar.set_postfix_str(f"{label}: done in {time.perf_counter() - started:.0f} s")


def plan_runs(mode: str, policies: Sequence[str], static_depth: Optional[int], num_depths: int,
              base_given: bool) -> Dict[str, Any]:
    """What ``mode`` runs: ``runs`` (full depth first: its capacity sets the base rate) and ``aliases``
    (``static`` when its depth is run anyway: one run serves both rows).

    Example:
        >>> plan_runs("http", ["depth1", "depth2", "static", "controller", "controller+ee"], 2, 2, False)
        {'runs': ['depth2', 'depth1', 'controller', 'controller+ee'], 'aliases': {'static': 'depth2'}}
    """
    full = f"depth{num_depths}"
    aliases = {}
    if "static" in policies and f"depth{static_depth}" in policies:
        aliases["static"] = f"depth{static_depth}"
    runs = [p for p in policies if p not in aliases]
    if not base_given and full not in runs:
        runs.insert(0, full)
    runs.sort(key=lambda p: p != full)
    return {"runs": runs, "aliases": aliases}


def estimate_s(args: argparse.Namespace, plans: Sequence[Mapping[str, Mapping[str, Any]]]) -> float:
    """A rough duration of the whole run: phases, warm-up, drain allowance, capacity, probes, server starts and
    the overload and replica-death experiments, over every checkpoint (``plans``: one per checkpoint)."""
    per = args.warmup_s + sum(args.durations) + min(args.drain_s, 3.0)
    total = 0.0
    for by_mode in plans:
        total += 20.0  # loading, depth check
        for mode, plan in by_mode.items():
            start = START_S[args.engine] if mode == "http" else 3.0
            total += args.repeats * len(plan["runs"]) * (per + start)
            fixed = sum(p.startswith("depth") for p in plan["runs"]) if args.capacity_per_depth else 1
            total += fixed * (args.calibration_s + 2.0)
            if not base_rate_given(mode, args):
                total += 2 * (args.probe_s + 2.0)
        if args.overload:
            total += START_S[args.engine] + args.warmup_s + 1.5 * sum(args.overload_s) + args.overload_after_s + 5.0
        if args.replica_kill:
            total += START_S["ray"] + args.calibration_s + 1.0 + args.warmup_s + args.replica_kill_s + 5.0
    return total


# --- overload ---------------------------------------------------------------------------------
def overload_capacity(state: Mapping[str, Any], args: argparse.Namespace) -> Tuple[float, str]:
    """Full depth's HTTP capacity the overload rates are multiples of (estimated from a given base rate)."""
    if state.get("capacity"):
        return float(state["capacity"]), "measured"
    return float(state["base_rate"]) / args.http_load_fraction, "estimated: base rate / --http-load-fraction"


def overload_phases(capacity: float, base_rate: float, args: argparse.Namespace) -> List[Phase]:
    """Warm-up at the base rate, one phase per ``--overload-factors`` (``5x``, ``10x``: that many times full
    depth's capacity, ``--overload-s`` long), then ``after`` at the base rate (``--overload-after-s``).

    Example:
        >>> a = argparse.Namespace(overload_factors=[5, 10], overload_s=[8, 30], overload_after_s=5, warmup_s=2)
        >>> [(p.name, p.start, p.rate) for p in overload_phases(100, 40, a)]
        [('warmup', 0.0, 40.0), ('5x', 2.0, 500.0), ('10x', 10.0, 1000.0), ('after', 40.0, 40.0)]
    """
    specs = [(f"{f:g}x", f * capacity, float(s), False) for f, s in zip(args.overload_factors, args.overload_s)]
    if args.overload_after_s > 0:
        specs.append(("after", base_rate, float(args.overload_after_s), False))
    return back_to_back(specs, warmup_s=args.warmup_s, warmup_rate=base_rate)


def overload_summary(schedule: Schedule, outcomes: Sequence[Outcome], labels: np.ndarray, slo_ms: float,
                     samples: Sequence[Tuple[float, float, int]], start: float) -> Dict[str, Any]:
    """Per phase: the :func:`coopnets.bench.report.analyse` figures, answered late (200 after the SLO, from the
    scheduled time and from the actual send), the attainment of the admitted requests from the send, and the
    send rate reached; and the memory samples (time from the run's start) with start/max/end and the growth.

    Example:
        >>> from coopnets.bench.schedule import Phase, Schedule
        >>> s = Schedule([Phase("a", 0.0, 1.0, 4.0)], np.array([0.0, 0.25, 0.5, 0.75]), np.zeros(4, int), np.zeros(4, int))
        >>> outs = [Outcome(sent=0.0, done=0.05, status=200), Outcome(sent=0.3, done=0.5, status=200),
        ...         Outcome(sent=0.5, done=0.51, status=503, error="HTTP 503: shed"), Outcome()]
        >>> r = overload_summary(s, outs, np.zeros(1, int), 100, [(10.0, 500.0, 1), (11.0, 520.0, 1)], 10.0)
        >>> a = r["phases"]["a"]
        >>> a["shed"], a["late"], a["late_from_send"], a["unanswered"], round(a["admitted_attainment_from_send"], 3)
        (1, 1, 1, 1, 0.333)
        >>> r["rss"]["start_mib"], r["rss"]["max_mib"], r["rss"]["growth_mib"]
        (500.0, 520.0, 20.0)
    """
    res = analyse_run(schedule, outcomes, labels, slo_ms, overhead={})
    sent = np.array([o.sent for o in outcomes], dtype=float)
    done = np.array([o.done for o in outcomes], dtype=float)
    kinds = np.array([classify(o) for o in outcomes], dtype=object)
    lat = latencies_ms(schedule.times, outcomes)
    from_send = np.where(kinds == "ok", (done - sent) * 1e3, math.inf)
    for name, s in res["phases"].items():
        sel = schedule.phase == schedule.index(name)
        ok = sel & (kinds == "ok")
        admitted = int(sel.sum() - (sel & (kinds == "shed")).sum())
        s["late"] = int((ok & (lat > slo_ms)).sum())
        s["late_from_send"] = int((ok & (from_send > slo_ms)).sum())
        s["admitted_attainment_from_send"] = (float((sel & (from_send <= slo_ms)).sum() / admitted)
                                              if admitted else math.nan)
        sends = np.sort(sent[sel & np.isfinite(sent)])
        s["sent_rate"] = (len(sends) / (sends[-1] - sends[0])) if len(sends) > 1 and sends[-1] > sends[0] else math.nan
        s["not_sent"] = int((sel & ~np.isfinite(sent)).sum())
    t = np.array([x[0] - start for x in samples], dtype=float)
    mib = np.array([x[1] for x in samples], dtype=float)
    rss: Dict[str, Any] = {"t": t.tolist(), "mib": mib.tolist(), "processes": [x[2] for x in samples]}
    if len(mib):
        first = next((p for p in schedule.phases if p.name != "warmup"), schedule.phases[0])
        before = np.flatnonzero(t <= first.start)
        k0 = int(before[-1]) if len(before) else 0
        rss.update({"idle_mib": float(mib[0]), "start_mib": float(mib[k0]), "start_t": float(t[k0]),
                    "max_mib": float(mib[k0:].max()), "end_mib": float(mib[-1])})
        rss["growth_mib"] = rss["max_mib"] - rss["start_mib"]
        rss["end_growth_mib"] = rss["end_mib"] - rss["start_mib"]
        slopes = {}
        for p in schedule.phases:
            sel = (t >= p.start) & (t < p.end)
            if sel.sum() >= 3:
                slopes[p.name] = float(np.polyfit(t[sel], mib[sel], 1)[0] * 60)
        rss["slope_mib_per_min"] = slopes
    res["rss"] = rss
    return res


def run_overload(ck: Checkpoint, args: argparse.Namespace, state: Mapping[str, Any], log_dir: Path,
                 bar: Any) -> Dict[str, Any]:
    """The ``--overload-policy`` server under :func:`overload_phases`, its memory sampled every 0.5 s."""
    capacity, source = overload_capacity(state, args)
    phases = overload_phases(capacity, state["base_rate"], args)
    schedule = poisson_schedule(phases, len(ck.data), args.seed + 104729)
    label = f"{ck.tag} overload ({args.overload_policy})"
    bar.set_postfix_str(f"{label}: starting")
    server = HttpServer(ck.path, serve_args(args.overload_policy, ck.static["depth"], args, ck.calibration_dir,
                                            args.engine, args.num_replicas),
                        ck.data.pngs, log_dir / f"serve-{ck.tag}-overload.log", args.server_timeout_s)
    sampler = RssSampler(lambda: harness.session_pids(server.pid), period_s=0.5)
    try:
        sampler.start()
        bar.set_postfix_str(f"{label}: {len(schedule)} requests")
        with harness.progress_bar(total=len(schedule), desc=label, unit="req", leave=False) as rbar:
            # a sender that falls behind the schedule may finish sending up to the overload's length late
            outcomes, start = run_open_loop(schedule.times, request_submit(server, schedule.item),
                                            drain_s=args.drain_s + sum(args.overload_s), bar=rbar, loop=server.loop)
        time.sleep(1.0)  # two more samples once the load is over
        opened = server.client.opened
        try:
            stats = {k: v for k, v in server.stats().items() if k != "per_replica"}
        except Exception as e:
            stats = {"error": f"{type(e).__name__}: {e}"}
    finally:
        sampler.stop()
        server.close()
    out = overload_summary(schedule, outcomes, ck.data.labels, args.slo_ms, sampler.samples, start)
    if sampler.error:
        out["rss"]["error"] = sampler.error
    out.update({"policy": args.overload_policy, "capacity": capacity, "capacity_source": source,
                "base_rate": state["base_rate"], "factors": list(args.overload_factors),
                "durations_s": list(args.overload_s), "server_command": server.command, "server_stats": stats,
                "connections_opened": opened,
                "phase_list": [vars(p) for p in phases]})
    rss = out["rss"]
    bar.write(f"{ck.tag} overload: shed {sum(s['shed'] for s in out['phases'].values())}, memory "
              f"{rss.get('start_mib', math.nan):.0f} -> max {rss.get('max_mib', math.nan):.0f} -> end "
              f"{rss.get('end_mib', math.nan):.0f} MiB")
    return out


# --- replica death ----------------------------------------------------------------------------
def aligned_windows(t_sched: np.ndarray, on_time: np.ndarray, start: float, end: float, kill_at: float,
                 width: float = 1.0) -> List[Dict[str, float]]:
    """Attainment of the requests scheduled in each ``width``-s window of ``[start, end)``, windows aligned at
    ``kill_at`` (the window starting there is the first after the kill).

    Example:
        >>> w = aligned_windows(np.array([0.2, 1.1, 1.6, 2.5]), np.array([True, False, True, True]), 0.0, 3.0, 1.0)
        >>> [(x["start"], x["n"], x["attainment"]) for x in w]
        [(0.0, 1, 1.0), (1.0, 2, 0.5), (2.0, 1, 1.0)]
    """
    first = kill_at - math.floor((kill_at - start) / width + 1e-9) * width
    edges = [start] if first > start + 1e-9 else []
    k = 0
    while first + k * width < end - 1e-9:
        edges.append(first + k * width)
        k += 1
    edges.append(end)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (t_sched >= lo) & (t_sched < hi)
        n = int(sel.sum())
        out.append({"start": round(lo, 6), "end": round(hi, 6), "n": n,
                    "attainment": float(on_time[sel].mean()) if n else math.nan})
    return out


def kill_recovery(windows: Sequence[Mapping[str, float]], kill_at: float, level: float) -> Dict[str, float]:
    """From the kill: ``first_below_s`` (start of the first window under ``level``, NaN: none), ``back_s`` (the end
    of the last window under ``level`` minus the kill: 0 when none is, ``inf`` when the last one still is).

    Example:
        >>> w = [{"start": 0.0, "end": 1.0, "n": 5, "attainment": 1.0}, {"start": 1.0, "end": 2.0, "n": 5, "attainment": 0.6},
        ...      {"start": 2.0, "end": 3.0, "n": 5, "attainment": 0.9}, {"start": 3.0, "end": 4.0, "n": 5, "attainment": 1.0}]
        >>> kill_recovery(w, 1.0, 0.99)
        {'first_below_s': 0.0, 'back_s': 2.0}
        >>> kill_recovery(w[:3], 1.0, 0.99)["back_s"], kill_recovery(w[:1] + w[3:], 1.0, 0.99)["back_s"]
        (inf, 0.0)
    """
    after = [w for w in windows if w["start"] >= kill_at - 1e-9 and w["n"] > 0]
    bad = [i for i, w in enumerate(after) if w["attainment"] < level]
    if not bad:
        return {"first_below_s": math.nan, "back_s": 0.0}
    first = after[bad[0]]["start"] - kill_at
    if bad[-1] == len(after) - 1:
        return {"first_below_s": first, "back_s": math.inf}
    return {"first_below_s": first, "back_s": after[bad[-1]]["end"] - kill_at}


def replica_kill_summary(schedule: Schedule, outcomes: Sequence[Outcome], labels: np.ndarray, slo_ms: float,
                         kill_at: float) -> Dict[str, Any]:
    """What the clients saw around a replica's death at ``kill_at`` (s of the schedule; the warm-up not scored).

    Example:
        >>> from coopnets.bench.schedule import Phase, Schedule
        >>> s = Schedule([Phase("run", 0.0, 3.0, 2.0)], np.array([0.5, 1.2, 1.5, 2.5]), np.zeros(4, int), np.zeros(4, int))
        >>> outs = [Outcome(done=0.55, status=200), Outcome(done=1.25, status=0, error="connection failed: reset"),
        ...         Outcome(done=1.6, status=500, error="HTTP 500: died"), Outcome()]
        >>> r = replica_kill_summary(s, outs, np.zeros(1, int), 100.0, 1.0)
        >>> r["answered_200"], r["errors_by_status"], r["connection_failures"], r["hung"], r["attainment_before"]
        (1, {'0': 1, '500': 1}, 1, 1, 1.0)
    """
    run_i = [i for i, p in enumerate(schedule.phases) if p.name != "warmup"]
    sel = np.isin(schedule.phase, run_i)
    t = schedule.times[sel]
    outs = [o for o, k in zip(outcomes, sel) if k]
    lat = latencies_ms(t, outs)
    on_time = lat <= slo_ms
    kinds = [classify(o) for o in outs]
    by_status: Dict[str, int] = {}
    for o, k in zip(outs, kinds):
        if k not in ("ok", "unanswered"):
            by_status[str(o.status)] = by_status.get(str(o.status), 0) + 1
    done = np.array([o.done for o in outs], dtype=float)
    limit = slo_ms / 1e3 + TARGETS["kill_grace_s"]
    hung = ~np.isfinite(done) | (done - t > limit)
    phases = [schedule.phases[i] for i in run_i]
    start, end = phases[0].start, phases[-1].end
    windows = aligned_windows(t, on_time, start, end, kill_at)
    before = t < kill_at
    return {"requests": len(outs), "answered_200": kinds.count("ok"), "on_time": int(on_time.sum()),
            "attainment": float(on_time.mean()) if len(outs) else math.nan,
            "attainment_before": float(on_time[before].mean()) if before.any() else math.nan,
            "attainment_after": float(on_time[~before].mean()) if (~before).any() else math.nan,
            "errors_by_status": dict(sorted(by_status.items(), key=lambda kv: int(kv[0]))),
            "connection_failures": by_status.get("0", 0), "shed": kinds.count("shed"),
            "expired": kinds.count("expired"), "unanswered": kinds.count("unanswered"),
            "hung": int(hung.sum()), "hung_limit_s": limit, "windows": windows,
            **kill_recovery(windows, kill_at, TARGETS["kill_window_attainment"]),
            "series": {"t": t.tolist(), "latency_ms": lat.tolist(), "kind": kinds}}


def run_replica_kill(ck: Checkpoint, args: argparse.Namespace, state: Mapping[str, Any], log_dir: Path,
                     bar: Any) -> Dict[str, Any]:
    """``coopnets serve --engine ray --num-replicas N`` with ``--replica-kill-policy``, open loop at the base rate
    (or ``--replica-kill-load`` of the Ray server's closed-loop capacity, measured first, when that is lower: Ray
    Serve's request path costs several ms of CPU per request, and a run overloaded before the kill would say
    nothing about the kill); one replica process SIGKILLed ``--replica-kill-at-s`` into the run."""
    label = f"{ck.tag} replica kill"
    bar.set_postfix_str(f"{label}: starting Ray")
    server = HttpServer(ck.path, serve_args(args.replica_kill_policy, ck.static["depth"], args, ck.calibration_dir,
                                            "ray", args.replica_kill_replicas),
                        ck.data.pngs, log_dir / f"serve-{ck.tag}-replica-kill.log", args.server_timeout_s)
    record: Dict[str, Any] = {}
    try:
        if args.replica_kill_rate:
            rate, ray_capacity, source = args.replica_kill_rate, None, "given"
        else:
            bar.set_postfix_str(f"{label}: measuring capacity")
            ray_capacity = run_closed_loop(server.submit, len(ck.data), 4 * args.max_batch_size, args.calibration_s,
                                           loop=server.loop).answers_per_s
            rate = min(state["base_rate"], args.replica_kill_load * ray_capacity)
            source = ("the HTTP base rate" if rate == state["base_rate"] else
                      f"{args.replica_kill_load:g} x the Ray server's closed-loop capacity, under the base rate "
                      f"{state['base_rate']:.0f} req/s")
        if not rate > 0:
            raise RuntimeError(f"{label}: the Ray server answered nothing in its closed loop")
    except BaseException:
        server.close()
        raise
    phases = back_to_back([("run", rate, args.replica_kill_s, False)], warmup_s=args.warmup_s, warmup_rate=rate)
    kill_at = phases[-1].start + args.replica_kill_at_s
    schedule = poisson_schedule(phases, len(ck.data), args.seed + 15485863)

    def kill() -> None:
        session = harness.session_pids(server.pid)
        pids = replica_pids(session)
        record["replicas_before"] = {p: process_title(p) for p in pids}
        if not pids:
            record["error"] = (f"no process of the server's session has {REPLICA_TITLE!r} in its title "
                               f"({len(session)} processes)")
            return
        pid = pids[0]
        if pid not in harness.session_pids(server.pid):  # only a process this benchmark started
            record["error"] = f"replica {pid} left the server's session before the kill"
            return
        record.update(pid=pid, title=process_title(pid), clock=time.perf_counter())
        os.kill(pid, signal.SIGKILL)

    try:
        bar.set_postfix_str(f"{label}: {len(schedule)} requests")
        with harness.progress_bar(total=len(schedule), desc=label, unit="req", leave=False) as rbar:
            outcomes, start = run_open_loop(schedule.times, request_submit(server, schedule.item),
                                            events=[(kill_at, kill)], drain_s=args.drain_s, bar=rbar,
                                            loop=server.loop)
        record["replicas_after"] = {p: process_title(p) for p in replica_pids(harness.session_pids(server.pid))}
    finally:
        server.close()
    killed_at = record["clock"] - start if "clock" in record else kill_at
    out = replica_kill_summary(schedule, outcomes, ck.data.labels, args.slo_ms, killed_at)
    out.update({"rate": rate, "rate_source": source, "ray_capacity": ray_capacity,
                "policy": args.replica_kill_policy, "replicas": args.replica_kill_replicas,
                "kill_scheduled_at": kill_at, "killed_at": killed_at, "startup_s": server.startup_s,
                "server_command": server.command, "phase_list": [vars(p) for p in phases],
                **{k: v for k, v in record.items() if k != "clock"}})
    bar.write(f"{ck.tag} replica kill: pid {record.get('pid', '-')}, {out['answered_200']}/{out['requests']} answered "
              f"200, errors {out['errors_by_status']}, hung {out['hung']}, back at 99 % after {out['back_s']:.1f} s")
    return out


# --- autoscaling alone against depth with autoscaling -----------------------------------------------
#: the three servers of the step experiment: (name, policy, Ray Serve autoscaling 1 -> 2 replicas)
AUTOSCALE_RUNS = (("full depth + autoscaling", "full", True), ("controller, 1 replica", "controller", False),
                  ("controller + autoscaling", "controller", True))
#: depth shares are reported over these stretches of the step experiment
SEGMENTS = ("before the step", "step, one replica serving", "step, two serving", "after the step")


def autoscaling_config(args: argparse.Namespace) -> Dict[str, Any]:
    """Ray Serve ``AutoscalingConfig`` of the step experiment: 1 -> 2 replicas, reacting within seconds, never
    scaling down during the run.

    Example:
        >>> c = autoscaling_config(argparse.Namespace(autoscale_target=2.0, autoscale_upscale_delay_s=1.0))
        >>> c["min_replicas"], c["max_replicas"], c["target_ongoing_requests"], c["downscale_delay_s"]
        (1, 2, 2.0, 600.0)
    """
    return {"min_replicas": 1, "max_replicas": 2, "initial_replicas": 1,
            "target_ongoing_requests": float(args.autoscale_target), "upscale_delay_s": float(args.autoscale_upscale_delay_s),
            "downscale_delay_s": 600.0, "look_back_period_s": 2.0, "metrics_interval_s": 0.5}


class StatsPoller(RssSampler):
    """``GET /stats`` every ``period_s`` on a thread: ``samples`` of ``(perf_counter time, replicas RUNNING,
    {replica: requests answered})``. A failed poll (a slow or refused ``/stats`` under load) is skipped, not fatal."""

    def __init__(self, get: Callable[[], Dict[str, Any]], period_s: float = 0.5) -> None:
        super().__init__(lambda: [], period_s)
        self.get = get
        self.join_s = 35.0  # a /stats call in flight may take up to its 30-s timeout

    def sample(self) -> None:
        try:
            st = self.get()
        except Exception:  # the next poll tries again
            return
        answered = {r: int(v.get("requests") or 0) for r, v in (st.get("per_replica") or {}).items()}
        running = int((st.get("cluster") or {}).get("replicas") or len(answered))
        self.samples.append((time.perf_counter(), running, answered))



def second_replica(samples: Sequence[Tuple[float, int, Mapping[str, int]]], start: float) -> Dict[str, float]:
    """When a second replica was RUNNING and when it had answered (``answered_s``), s from ``start`` (the open
    loop's clock 0); NaN when it never did.

    Example:
        >>> second_replica([(10.0, 1, {"a": 5}), (11.0, 2, {"a": 9, "b": 0}), (12.0, 2, {"a": 9, "b": 3})], 10.0)
        {'running_s': 1.0, 'answered_s': 2.0}
    """
    running = next((t - start for t, n, _ in samples if n >= 2), math.nan)
    answered = next((t - start for t, _, a in samples if sum(1 for v in a.values() if v > 0) >= 2), math.nan)
    return {"running_s": running, "answered_s": answered}


def depth_shares(t_sched: np.ndarray, depths: np.ndarray, edges: Sequence[float]) -> List[Dict[int, float]]:
    """Per stretch ``[edges[i], edges[i+1])``: the share of the answered requests (depth > 0) at each depth.

    Example:
        >>> depth_shares(np.array([0.5, 1.5, 1.7, 2.5]), np.array([4, 1, 4, 0]), [0, 1, 2, 3])
        [{4: 1.0}, {1: 0.5, 4: 0.5}, {}]
    """
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        d = depths[(t_sched >= lo) & (t_sched < hi) & (depths > 0)]
        out.append({int(k): float(np.mean(d == k)) for k in sorted(set(d.tolist()))} if len(d) else {})
    return out


def run_autoscale(ck: Checkpoint, args: argparse.Namespace, state: Mapping[str, Any], log_dir: Path,
                  bar: Any) -> Dict[str, Any]:
    """The step load (quiet, ``--autoscale-factor`` x for ``--autoscale-step-s``, quiet) against the three
    :data:`AUTOSCALE_RUNS` servers on Ray Serve, one after the other on the same schedule."""
    rate = args.autoscale_rate or args.autoscale_load * state["capacity"]
    quiet, step, after = args.autoscale_durations
    phases = back_to_back([("quiet", rate, quiet, False), ("step", args.autoscale_factor * rate, step, False),
                           ("after", rate, after, False)], warmup_s=args.warmup_s, warmup_rate=rate)
    step_start, step_end = phases[-2].start, phases[-2].end
    schedule = poisson_schedule(phases, len(ck.data), args.seed + 32452843)
    config = autoscaling_config(args)
    runs: Dict[str, Any] = {}
    for name, policy, auto in AUTOSCALE_RUNS:
        policy = f"depth{ck.num_depths}" if policy == "full" else policy
        label = f"{ck.tag} autoscaling: {name}"
        bar.set_postfix_str(f"{label}: starting Ray")
        sargs = serve_args(policy, ck.static["depth"], args, ck.calibration_dir, "ray", "auto" if auto else 1,
                           calibrate=False)  # recorded validation accuracies: a new replica starts sooner
        if auto:
            sargs += ["--autoscaling-config", json.dumps(config)]
        try:
            server = HttpServer(ck.path, sargs, ck.data.pngs, log_dir / f"serve-{ck.tag}-autoscale-{policy}-{auto}.log",
                                args.server_timeout_s)
        except RuntimeError as e:  # a server that does not come up is reported, not fatal
            runs[name] = {"error": " ".join(str(e).split())[:600]}
            continue
        poller = StatsPoller(server.stats, 0.5)
        try:
            poller.start()
            with harness.progress_bar(total=len(schedule), desc=label, unit="req", leave=False) as rbar:
                outcomes, start = run_open_loop(schedule.times, request_submit(server, schedule.item),
                                                drain_s=args.drain_s, bar=rbar, loop=server.loop)
        finally:
            poller.stop()
            server.close()
        result = analyse_run(schedule, outcomes, ck.data.labels, args.slo_ms)
        t = np.asarray(schedule.times, dtype=float)
        lat = latencies_ms(schedule.times, outcomes)
        depths = np.array([o.depth if o.status == 200 and not o.error else 0 for o in outcomes], dtype=np.int64)
        second = second_replica(poller.samples, start)
        serves = second["answered_s"] if auto else math.nan
        edges = [phases[1].start, step_start, min(serves, step_end) if math.isfinite(serves) else step_end, step_end,
                 phases[-1].end]
        result.update({
            "policy": policy, "autoscaling": auto, "server_command": server.command, "startup_s": server.startup_s,
            "second_replica": second, "second_serves_after_step_s": serves - step_start if auto else math.nan,
            "windows": aligned_windows(t, lat <= args.slo_ms, phases[1].start, phases[-1].end, step_start),
            "depth_shares": dict(zip(SEGMENTS, depth_shares(t, depths, edges))),
            "replicas_polled": [(ts - start, n) for ts, n, _ in poller.samples],
            "series": {"t": t.tolist(), "latency_ms": lat.tolist(), "depth": depths.tolist()}})
        runs[name] = result
        bar.write(f"{label}: attainment " + " / ".join(f"{100 * result['phases'][p.name]['attainment']:.1f}"
                                                         for p in phases[1:])
                  + (f" %; second replica serves {result['second_serves_after_step_s']:.1f} s after the step" if auto else " %"))
        bar.update(1)
    return {"rate": rate, "factor": args.autoscale_factor, "durations_s": list(args.autoscale_durations),
            "config": config, "step_start": step_start, "step_end": step_end,
            "phase_list": [vars(p) for p in phases], "runs": runs}


def autoscale_figure(title: str, au: Mapping[str, Any], slo_ms: float) -> Any:
    """Per run: 1-s attainment across the step (top) and the mean depth answered per 1-s window (bottom), the
    step shaded, the second replica's first answer marked."""
    plt = harness.pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True)
    for name, run in au["runs"].items():
        if "windows" not in run:
            continue
        w = run["windows"]
        x = [(v["start"] + v["end"]) / 2 - au["step_start"] for v in w]
        line, = top.plot(x, [100 * v["attainment"] for v in w], marker=".", label=name)
        t = np.asarray(run["series"]["t"]) - au["step_start"]
        d = np.asarray(run["series"]["depth"])
        means = [float(d[(t >= v["start"] - au["step_start"]) & (t < v["end"] - au["step_start"]) & (d > 0)].mean())
                 if ((t >= v["start"] - au["step_start"]) & (t < v["end"] - au["step_start"]) & (d > 0)).any() else math.nan
                 for v in w]
        bottom.plot(x, means, marker=".", color=line.get_color(), label=name)
        serves = run.get("second_serves_after_step_s", math.nan)
        if math.isfinite(serves):
            for ax in (top, bottom):
                ax.axvline(serves, color=line.get_color(), linestyle=":", linewidth=1)
    for ax in (top, bottom):
        ax.axvspan(0, au["step_end"] - au["step_start"], color="0.9", zorder=0)
    top.set_ylabel(f"1-s attainment % (SLO {slo_ms:g} ms)")
    top.set_ylim(-2, 102)
    top.legend(loc="lower left", fontsize=8)
    bottom.set_ylabel("mean depth answered")
    bottom.set_xlabel("s from the step (shaded: the step; dotted: the second replica's first answer)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


# --- a checkpoint: every mode, policy and repeat, then the experiments --------------------------------
def run_checkpoint(ck: Checkpoint, policies: Sequence[str], args: argparse.Namespace, log_dir: Path,
                   bar: Any) -> Dict[str, Any]:
    states = {m: {"base_rate": base_rate_given(m, args), "capacity": None, "probes": [], "capacities": {},
                  "phases": []} for m in args.modes}
    runs: Dict[str, Dict[str, List[Dict[str, Any]]]] = {m: {p: [] for p in ck.plans[m]["runs"]} for m in args.modes}
    for repeat, mode, policy in interleaved(args.repeats, {m: ck.plans[m]["runs"] for m in args.modes}):
        runs[mode][policy].append(run_policy(mode, policy, repeat, ck, args, states[mode], log_dir, bar))
        bar.update(1)
    modes: Dict[str, Any] = {}
    for mode in args.modes:
        plan, st = ck.plans[mode], states[mode]
        pol: Dict[str, Any] = {}
        for p in [p for p in policies if p in runs[mode] or p in plan["aliases"]] + \
                 [p for p in runs[mode] if p not in policies]:
            if p in plan["aliases"]:
                same = plan["aliases"][p]
                pol[p] = {**_policy_result(runs[mode][same]), "same_run_as": same}
            else:
                pol[p] = _policy_result(runs[mode][p])
        modes[mode] = {"policies": pol, "aliases": plan["aliases"], "base_rate": st["base_rate"],
                       "capacity": st["capacity"], "capacities": st["capacities"], "base_rate_probes": st["probes"],
                       "base_rate_source": ("given" if base_rate_given(mode, args)
                                            else f"{load_fraction(mode, args):g} x full depth's measured capacity"),
                       "phases": [vars(p) for p in st["phases"]]}
    out: Dict[str, Any] = {"tag": ck.tag, "checkpoint": ck.record, "depths": ck.depth_info, "static": ck.static,
                           "modes": modes, "overload": None, "replica_kill": None, "autoscale": None,
                           "family": ck.family_info or None}
    if "http" in args.modes and args.overload:
        try:
            out["overload"] = run_overload(ck, args, states["http"], log_dir, bar)
        except RuntimeError as e:  # a server that does not come up is reported, not fatal
            out["overload"] = {"error": " ".join(str(e).split())[:600]}
        bar.update(1)
    if "http" in args.modes and args.replica_kill:
        try:
            out["replica_kill"] = run_replica_kill(ck, args, states["http"], log_dir, bar)
        except RuntimeError as e:
            out["replica_kill"] = {"error": " ".join(str(e).split())[:600]}
        bar.update(1)
    if "http" in args.modes and args.autoscale:
        out["autoscale"] = run_autoscale(ck, args, states["http"], log_dir, bar)
    out["targets"] = evaluate_targets(out, ck.num_depths)
    return out


def _policy_result(runs: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    first = runs[0]
    return {"summary": summarize_repeats(runs), "repeats": runs, "series": first.get("series"),
            "capacity": first.get("capacity"), "options": first.get("options")}


# --- targets ----------------------------------------------------------------------------------
def best_fixed(pol: Mapping[str, Any], phase: str) -> Tuple[float, str]:
    """The best fixed depth in hindsight for ``phase``: the highest mean effective accuracy of the fixed-depth
    policies (``depthK``, and ``static`` when its depth was not run) on the same schedules."""
    fixed = [p for p in pol if (p.startswith("depth") or p == "static") and not pol[p].get("same_run_as")]
    if not fixed:
        return math.nan, "-"
    return max((mean_of(pol[p]["summary"], phase, "effective_accuracy"), p) for p in fixed)


def _pct_iv(iv: Mapping[str, Any]) -> str:
    return harness.format_interval(iv, "{:.1f}", scale=100) if iv and iv.get("n") else "-"


def evaluate_targets(res: Mapping[str, Any], num_depths: int) -> List[Dict[str, Any]]:
    """Every target of the issue, per mode and controller policy, and the overload, replica-death, model-family
    and autoscaling ones: ``met`` and the figures behind it (means over the repeats; ``None``: not measurable here)."""
    rows: List[Dict[str, Any]] = []
    full = f"depth{num_depths}"

    def add(target: str, mode: str, policy: str, figure: str, met: Optional[bool]) -> None:
        rows.append({"target": target, "mode": mode, "policy": policy, "figure": figure, "met": met})

    family_targets(res, add)
    au = res.get("autoscale")
    for name, run in ((au or {}).get("runs") or {}).items():
        if run.get("autoscaling") and "second_replica" in run:
            serves = run["second_serves_after_step_s"]
            add("autoscaling: the second replica serves during the step", "http", name,
                f"{serves:.1f} s after the step starts" if math.isfinite(serves) else "never",
                bool(math.isfinite(serves) and serves < au["step_end"] - au["step_start"]))

    for mode, mres in res["modes"].items():
        pol = mres["policies"]
        if full in pol:
            s = pol[full]["summary"]
            a = mean_of(s, "burst", "attainment")
            add("load: full depth attains < 50 % in the burst", mode, full, f"{_pct_iv(s['burst']['attainment'])} %",
                a < TARGETS["full_burst_attainment_below"])
            q = mean_of(s, "quiet", "attainment")
            add("load: full depth fits the SLO in the quiet phase (>= 99 %)", mode, full,
                f"{_pct_iv(s['quiet']['attainment'])} %", q >= TARGETS["attainment"])
        for c in CONTROLLERS:
            if c not in pol:
                continue
            s = pol[c]["summary"]
            figs = []
            for n in PHASES:
                worst = min(_finite(s[n]["per_repeat"]["attainment"]), default=math.nan)
                figs.append(f"{n} {_pct_iv(s[n]['attainment'])} (worst repeat {100 * worst:.1f}; admitted "
                            f"{_pct_iv(s[n]['admitted_attainment'])}; shed {s[n]['total']['shed']}, expired "
                            f"{s[n]['total']['expired']})")
            add("SLO attainment >= 99 % of all requests in every phase", mode, c, "; ".join(figs),
                all(mean_of(s, n, "attainment") >= TARGETS["attainment"] for n in PHASES))
            figs, diffs = [], []
            for n in PHASES:
                best, which = best_fixed(pol, n)
                if math.isnan(best):
                    continue
                d = mean_of(s, n, "effective_accuracy") - best
                diffs.append(d)
                figs.append(f"{n} {_pct_iv(s[n]['effective_accuracy'])} vs {which} {100 * best:.1f} ({100 * d:+.1f})")
            add("effective accuracy within 0.5 points of the best fixed depth in hindsight, every phase", mode, c,
                "; ".join(figs) or "no fixed depth run",
                all(d >= -TARGETS["best_fixed_points"] - 1e-9 for d in diffs) if len(diffs) == len(PHASES) else None)
            steps = {n: s[n]["recovery_s"] for n in PHASES if s[n]["recovery_s"].get("n")}
            add("recovery: 1-s p99 back under the SLO within 2 s of each load step (median of repeats)", mode, c,
                ", ".join(f"{n} {v['median']:.0f} s" if math.isfinite(v["median"]) else f"{n} never"
                          for n, v in steps.items()) or "-",
                all(v["median"] <= TARGETS["recovery_s"] for v in steps.values()) if steps else None)
            ovh = [mean_of(s, n, "overhead") for n in PHASES]
            known = [o for o in ovh if math.isfinite(o)]
            add("decision overhead < 1 % of batch time", mode, c,
                ", ".join(f"{n} {100 * o:.3f} %" if math.isfinite(o) else f"{n} n/a" for n, o in zip(PHASES, ovh)),
                (max(known) < TARGETS["overhead"]) if known else None)
    ov = res.get("overload")
    if ov and "phases" in ov:
        loaded = [n for n in ov["phases"] if n != "after"]
        figs = [f"{n}: {fmt_pct(ov['phases'][n]['admitted_attainment_from_send'])} % from the send "
                f"({fmt_pct(ov['phases'][n]['admitted_attainment'])} % from the schedule), shed "
                f"{ov['phases'][n]['shed']}, late {ov['phases'][n]['late']}" for n in loaded]
        add("overload: >= 99 % of the admitted requests on time", "http", ov["policy"], "; ".join(figs),
            all(ov["phases"][n]["admitted_attainment_from_send"] >= TARGETS["overload_admitted_attainment"]
                for n in loaded))
        rss = ov["rss"]
        if "start_mib" in rss:
            add(f"overload: memory flat (max at most {TARGETS['rss_growth_mib']:g} MiB above the start)", "http",
                ov["policy"], f"start {rss['start_mib']:.0f} MiB, max {rss['max_mib']:.0f}, end {rss['end_mib']:.0f} "
                f"({rss['growth_mib']:+.0f} MiB at most)", rss["growth_mib"] <= TARGETS["rss_growth_mib"])
        else:
            add("overload: memory flat", "http", ov["policy"], f"no memory sample ({rss.get('error', 'none taken')})",
                None)
    elif ov:
        add("overload", "http", "-", ov.get("error", "not run"), False)
    rk = res.get("replica_kill")
    if rk and "requests" in rk:
        add("replica death: no connection reset, none unanswered past deadline + 1 s", "http (ray)", rk["policy"],
            f"{rk['connection_failures']} connection failures, {rk['hung']} past deadline + "
            f"{TARGETS['kill_grace_s']:g} s, errors by status {rk['errors_by_status'] or 'none'}",
            rk["connection_failures"] == 0 and rk["hung"] == 0 and "error" not in rk)
        back = rk["back_s"]
        add("replica death: time until the 1-s attainment is >= 99 % again (reported)", "http (ray)", rk["policy"],
            ("never" if math.isinf(back) else f"{back:.0f} s") + f" (before the kill {fmt_pct(rk['attainment_before'])} %)",
            None)
    elif rk:
        add("replica death", "http (ray)", "-", rk.get("error", "not run"), False)
    return rows


# --- the report -------------------------------------------------------------------------------
def fmt_ms(v: Optional[float]) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return "inf" if math.isinf(v) else f"{v:.1f}"


def fmt_pct(v: Optional[float], digits: int = 1) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.{digits}f}"


def hist_text(h: Mapping[Any, int]) -> str:
    total = sum(h.values())
    return " ".join(f"{d}:{100 * n / total:.0f}%" for d, n in sorted(h.items(), key=lambda kv: int(kv[0]))) if total else "-"


def _ms_iv(iv: Mapping[str, Any]) -> str:
    if not iv or not iv.get("n"):
        return "-"
    if any(isinstance(iv.get(k), float) and math.isinf(iv[k]) for k in ("median", "lo", "hi")):
        return fmt_ms(iv["median"]) + (f" [{fmt_ms(iv['lo'])}, {fmt_ms(iv['hi'])}]" if iv["n"] > 1 else "")
    return harness.format_interval(iv, "{:.1f}") if iv["n"] > 1 else f"{iv['median']:.1f}"


def _recovery_iv(iv: Mapping[str, Any]) -> str:
    """A recovery time's median over the repeats ('never': the phase's last window still missed the SLO)."""
    text = "never" if math.isinf(iv["median"]) else f"{iv['median']:.0f}"
    if iv["n"] > 1 and iv["lo"] != iv["hi"]:
        text += " [" + ", ".join("never" if math.isinf(v) else f"{v:.0f}" for v in (iv["lo"], iv["hi"])) + "]"
    return text


def _num(iv: Mapping[str, Any], fmt: str = "{:.1f}") -> str:
    return fmt.format(iv["mean"]) if iv and iv.get("n") and math.isfinite(iv["mean"]) else "-"


# --- the one network against the model family ------------------------------------------------------
#: the family comparison: the one network's policy, and its memory at most this share of the family's
ONE_NETWORK = "controller"
FAMILY_MEMORY_SHARE = 0.5


def family_targets(res: Mapping[str, Any], add: Callable[..., None]) -> None:
    """The one network (``controller``) against the family (``family``), per mode: effective accuracy at least
    the family's in every phase, and its memory (parameter bytes; over HTTP also the server's median RSS) at
    most :data:`FAMILY_MEMORY_SHARE` of the family's.

    Example:
        >>> ph = lambda a: {n: {"effective_accuracy": {"mean": a, "n": 3}} for n in PHASES}
        >>> pol = {"controller": {"summary": ph(0.9), "repeats": [{"memory": {"rss_median_mib": 400}}]},
        ...        "family": {"summary": ph(0.8), "repeats": [{"memory": {"rss_median_mib": 500}}]}}
        >>> rows = []
        >>> family_targets({"modes": {"http": {"policies": pol}}, "family": {"parameter_bytes": 100,
        ...                 "one_network_parameter_bytes": 60}}, lambda *a: rows.append(a))
        >>> [(r[0][:30], r[4]) for r in rows]  # 0.6x the weights, 0.8x the RSS
        [('family: effective accuracy >= ', True), ('family: memory <= 1/2 of the f', False), ('family: server memory (median ', False)]
    """
    fam = res.get("family")
    if not fam:
        return
    for mode, mres in res["modes"].items():
        pol = mres["policies"]
        if ONE_NETWORK not in pol or FAMILY not in pol:
            continue
        one, other = pol[ONE_NETWORK]["summary"], pol[FAMILY]["summary"]
        diffs = {n: mean_of(one, n, "effective_accuracy") - mean_of(other, n, "effective_accuracy") for n in PHASES}
        add("family: effective accuracy >= the family's in every phase", mode, f"{ONE_NETWORK} vs {FAMILY}",
            "; ".join(f"{n} {_pct_iv(one[n]['effective_accuracy'])} vs {_pct_iv(other[n]['effective_accuracy'])} "
                      f"({100 * d:+.1f})" for n, d in diffs.items()),
            all(d >= 0 for d in diffs.values()))
        if mode == "inprocess":
            continue
        share = fam["one_network_parameter_bytes"] / fam["parameter_bytes"]
        add(f"family: memory <= 1/{round(1 / FAMILY_MEMORY_SHARE)} of the family's (parameter bytes)", mode,
            f"{ONE_NETWORK} vs {FAMILY}",
            f"{fam['one_network_parameter_bytes'] / 2**20:.1f} vs {fam['parameter_bytes'] / 2**20:.1f} MiB ({share:.2f}x)",
            share <= FAMILY_MEMORY_SHARE)
        rss = [float(np.median(_finite([(r.get("memory") or {}).get("rss_median_mib") for r in pol[p]["repeats"]])
                               or [math.nan])) for p in (ONE_NETWORK, FAMILY)]
        add(f"family: server memory (median RSS) <= 1/{round(1 / FAMILY_MEMORY_SHARE)} of the family's", mode,
            f"{ONE_NETWORK} vs {FAMILY}", f"{rss[0]:.0f} vs {rss[1]:.0f} MiB ({rss[0] / rss[1]:.2f}x)",
            rss[0] / rss[1] <= FAMILY_MEMORY_SHARE if all(map(math.isfinite, rss)) else None)


def family_section(report: harness.Report, ck: Checkpoint, res: Mapping[str, Any]) -> None:
    """The model family beside the one network: members, memory, switch cost, and per phase attainment and
    effective accuracy of both controllers."""
    fam = res["family"]
    report.heading(f"{ck.tag}: one network against a model family", 3)
    report.text(f"The family: `{fam['path']}`, one separately trained network per depth, each on the same data and "
                "epochs as the one network (the `independent` recipe: member d is run d's truncated network, "
                "its stem, stages and exit head up to depth d); run 1 was trained with the command below, run d "
                "the same with `--recipe-opt depth=d`:")
    report.code(fam["training_command"])
    la, fla = ck.depth_info["latency"], fam["latency"]
    sizes = sorted(la)
    rows = []
    for d, m in enumerate(fam["members"], 1):
        rows.append([d, m["name"], fmt_pct(ck.depth_info["test_accuracy"][d - 1]), fmt_pct(fam["test_accuracy"][d - 1]),
                     fmt_pct(ck.depth_info["val_accuracy"][d - 1]), fmt_pct(fam["val_accuracy"][d - 1]),
                     f"{m['parameter_bytes'] / 2**20:.2f}", f"{m['load_s']:.2f}"]
                    + [f"{la[n]['median_ms'][d]:.2f} / {fla[n]['median_ms'][d]:.2f}" for n in sizes])
    report.table(["depth", "member", "one network test %", "member test %", "one network val %", "member val %",
                  "member weights MiB", "member load s (from disk)"]
                 + [f"ms at batch {n} (one network / member)" for n in sizes], rows)
    mem_rows = []
    for mode, mres in res["modes"].items():
        pol = mres["policies"]
        if FAMILY not in pol or mode != "http":
            continue
        for p, wb in ((ONE_NETWORK, fam["one_network_parameter_bytes"]), (FAMILY, fam["parameter_bytes"])):
            rss = [(r.get("memory") or {}) for r in pol[p]["repeats"]]
            mem_rows.append([p, f"{wb / 2**20:.1f}",
                             " / ".join(f"{m.get('rss_median_mib', math.nan):.0f}" for m in rss),
                             " / ".join(f"{m.get('rss_max_mib', math.nan):.0f}" for m in rss)])
    if mem_rows:
        report.text("Memory: weights (parameters and buffers, counted by the server and reported in `/stats`), and the "
                    "server's resident memory (VmRSS of its process, every 1 s through each run; per repeat). Switch "
                    "cost: every member stays loaded, so a switch between sizes costs nothing beyond running the "
                    "other member; a server that loaded members on demand would pay the member's load time above "
                    "(safetensors from disk and the export to its depth) at each switch.")
        report.table(["policy", "weights MiB", "RSS median MiB (per repeat)", "RSS max MiB (per repeat)"], mem_rows)
    for mode, mres in res["modes"].items():
        pol = mres["policies"]
        if FAMILY not in pol or ONE_NETWORK not in pol:
            continue
        one, other = pol[ONE_NETWORK]["summary"], pol[FAMILY]["summary"]
        rows = [[n, _pct_iv(one[n]["attainment"]), _pct_iv(other[n]["attainment"]), _pct_iv(one[n]["effective_accuracy"]),
                 _pct_iv(other[n]["effective_accuracy"]),
                 f"{100 * (mean_of(one, n, 'effective_accuracy') - mean_of(other, n, 'effective_accuracy')):+.1f}",
                 hist_text(one[n]["depth_histogram"]), hist_text(other[n]["depth_histogram"])] for n in PHASES]
        report.text(f"{mode}: the same depth-only controller, same latency model and calibration images, choosing a "
                    "depth of the one network or a member of the family per batch:")
        report.table(["phase", "one network attainment %", "family attainment %", "one network effective accuracy %",
                      "family effective accuracy %", "difference, points", "one network depths", "family members"],
                     rows)


def autoscale_section(report: harness.Report, args: argparse.Namespace, ck: Checkpoint, au: Mapping[str, Any]) -> None:
    report.heading(f"{ck.tag}: autoscaling alone against depth with autoscaling", 3)
    q, st, af = au["durations_s"]
    report.text(
        f"Ray Serve (`coopnets serve --engine ray`, Python proxy, one CPU and one torch thread per replica), open "
        f"loop: {au['rate']:.1f} req/s for {q:g} s, {au['factor']:g}x ({au['factor'] * au['rate']:.1f} req/s) for "
        f"{st:g} s, then {au['rate']:.1f} req/s for {af:g} s, after a {args.warmup_s:g}-s warm-up; the same schedule "
        f"for the three servers, one after the other. Autoscaling: `--num-replicas auto --autoscaling-config "
        f"'{json.dumps(au['config'])}'`. The controller trades depths by the checkpoint's recorded validation "
        "accuracies (no `--calibration-data`, so a new replica only loads and profiles before it serves). "
        "The machine has 2 cores: the load generator, Ray's proxy and controller and "
        "the replicas share them, so the second replica gets the core the first does not use minus what the proxy "
        "and the client take; the rate is kept low enough (a share of one local server's full-depth capacity) "
        "that two replicas at full depth can carry the step.")
    rows = []
    for name, run in au["runs"].items():
        if "phases" not in run:
            rows.append([name, f"not measured: {run.get('error')}"] + [""] * 8)
            continue
        ph = run["phases"]
        serves = run["second_serves_after_step_s"]
        sec = run["second_replica"]
        rows.append([name] + [fmt_pct(ph[n]["attainment"]) for n in ("quiet", "step", "after")]
                    + [fmt_pct(ph[n]["effective_accuracy"]) for n in ("quiet", "step", "after")]
                    + [("-" if not run["autoscaling"] else
                        f"{serves:.1f}" if math.isfinite(serves) else "never")
                       + ("" if not run["autoscaling"] or not math.isfinite(sec["running_s"])
                          else f" (RUNNING {sec['running_s'] - au['step_start']:.1f})"),
                       f"{run['startup_s']:.0f}"])
    report.table(["server", "attainment % quiet", "step", "after", "effective accuracy % quiet", "step", "after",
                  "second replica answers, s after the step starts (RUNNING in /stats)", "server start s"], rows)
    rows = []
    for name, run in au["runs"].items():
        if "depth_shares" in run:
            rows.append([name] + [" ".join(f"d{d}:{100 * v:.0f}%" for d, v in sorted(run["depth_shares"][seg].items()))
                                  or "-" for seg in SEGMENTS])
    report.text("Share of the answered requests at each depth, before, during (one replica / two serving) and after "
                "the step (a server without autoscaling has one replica throughout):")
    report.table(["server", *SEGMENTS], rows)
    rows = []
    for name, run in au["runs"].items():
        if "windows" in run:
            w = [v for v in run["windows"] if au["step_start"] - 3 <= v["start"] < au["step_end"] + 3]
            rows.append([name, " ".join(fmt_pct(v["attainment"], 0) for v in w)])
    report.text("Attainment % in 1-s windows from 3 s before the step to 3 s after it:")
    report.table(["server", "1-s windows"], rows)
    report.image(f"{NAME}_{ck.tag}_autoscale.png", f"{ck.tag}: autoscaling alone against depth with autoscaling")


def mode_table(res: Mapping[str, Any]) -> Tuple[List[str], List[List[Any]]]:
    head = ["policy", "phase", "rate req/s", "requests per run", "attainment % (all)", "attainment % (admitted)",
            "shed per run", "expired per run", "p50 ms", "p99 ms", "effective accuracy %", "accuracy % (answered)",
            "depth histogram (answered, all repeats)", "mean batch", "decision overhead %"]
    rows = []
    for p, r in res["policies"].items():
        label = p + (f" (= {r['same_run_as']})" if r.get("same_run_as") else "")
        for n in PHASES:
            s = r["summary"][n]
            ovh = s["overhead"]
            rows.append([label, n, f"{s['rate']:.0f}", _num(s["requests"], "{:.0f}"), _pct_iv(s["attainment"]),
                         _pct_iv(s["admitted_attainment"]), _num(s["shed"]), _num(s["expired"]), _ms_iv(s["p50_ms"]),
                         _ms_iv(s["p99_ms"]), _pct_iv(s["effective_accuracy"]), _pct_iv(s["accuracy"]),
                         hist_text(s["depth_histogram"]), _num(s["mean_batch_size"]),
                         f"{100 * ovh['mean']:.3f}" if ovh.get("n") and math.isfinite(ovh["mean"]) else "-"])
    return head, rows


def hindsight_table(res: Mapping[str, Any]) -> Tuple[List[str], List[List[Any]]]:
    pol = res["policies"]
    ctrls = [c for c in CONTROLLERS if c in pol]
    head = ["phase", "best fixed depth in hindsight", "its effective accuracy %"] + [
        f"{c} effective accuracy % (difference, points)" for c in ctrls]
    rows = []
    for n in PHASES:
        best, which = best_fixed(pol, n)
        rows.append([n, which, fmt_pct(best)] + [
            f"{_pct_iv(pol[c]['summary'][n]['effective_accuracy'])} "
            f"({100 * (mean_of(pol[c]['summary'], n, 'effective_accuracy') - best):+.1f})" for c in ctrls])
    return head, rows


def figure(title: str, res: Mapping[str, Any], slo_ms: float, num_depths: int) -> Any:
    """Latency from the scheduled arrival (refusals and failures marked by kind) and chosen depth over time, one
    row per policy (its first repeat)."""
    plt = harness.pyplot()
    pols = [p for p in res["policies"] if not res["policies"][p].get("same_run_as")]
    fig, axes = plt.subplots(len(pols), 2, figsize=(14, 2.1 * len(pols) + 0.8), squeeze=False, sharex=True)
    phases = res["phases"]
    finite = [v for p in pols for v in res["policies"][p]["series"]["latency_ms"] if math.isfinite(v)]
    y_top = 2.0 * max(finite + [slo_ms])
    y_bottom = max(0.1, 0.5 * min(finite + [slo_ms]))
    marks = {"shed": ("x", "tab:red"), "expired": ("v", "tab:orange"), "error": ("+", "black"),
             "unanswered": ("|", "tab:purple")}
    for row, p in zip(axes, pols):
        s = res["policies"][p]["series"]
        t = np.asarray(s["t"])
        lat = np.asarray(s["latency_ms"], dtype=float)
        depth = np.asarray(s["depth"], dtype=float)
        kind = np.asarray(s["kind"], dtype=object)
        ok = kind == "ok"
        row[0].scatter(t[ok], np.clip(lat[ok], 0.1, None), s=2, alpha=0.35, color="tab:blue", lw=0)
        for k, (marker, colour) in marks.items():
            sel = kind == k
            if sel.any():
                row[0].scatter(t[sel], np.full(sel.sum(), y_top / 1.5), s=8, color=colour, marker=marker, lw=0.7,
                               label=f"{k} ({sel.sum()})")
        row[0].axhline(slo_ms, color="tab:red", lw=1, ls="--", label=f"SLO {slo_ms:g} ms")
        row[0].set_yscale("log")
        row[0].set_ylim(y_bottom, y_top)
        row[0].set_ylabel(f"{p}\nlatency ms")
        row[0].legend(loc="upper right", fontsize=6, ncol=3)
        okd = ok & (depth > 0)
        row[1].scatter(t[okd], depth[okd] + np.random.default_rng(0).uniform(-0.15, 0.15, okd.sum()), s=2, alpha=0.25,
                       color="tab:green", lw=0)
        win = 0.5
        edges = np.arange(phases[0]["start"], phases[-1]["start"] + phases[-1]["duration"] + win, win)
        centres, means = [], []
        for lo, hi in zip(edges[:-1], edges[1:]):
            sel = okd & (t >= lo) & (t < hi)
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
    for ax, head in zip(axes[0], ("latency from scheduled arrival (log; refusals marked above)",
                                  "depth each request ran to")):
        ax.set_title(head)
        for ph in phases:
            ax.text(ph["start"], 1.0, f" {ph['name']}", transform=ax.get_xaxis_transform(), fontsize=7, va="top")
    axes[0][1].legend(loc="lower right", fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("scheduled arrival, s (warm-up excluded from the tables; orange: contention)")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def series_arrays(run: Mapping[str, Any]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A run's per-request ``series``: scheduled time (s), kind of outcome, latency (ms), as arrays."""
    s = run["series"]
    return (np.asarray(s["t"], dtype=float), np.asarray(s["kind"], dtype=object),
            np.asarray(s["latency_ms"], dtype=float))


def overload_figure(title: str, ov: Mapping[str, Any], slo_ms: float) -> Any:
    """Outcomes per 0.5 s (on time, late, shed, expired, other) and the server's memory over time."""
    plt = harness.pyplot()
    fig, (ax, axm) = plt.subplots(2, 1, figsize=(12, 6.5), sharex=True, gridspec_kw={"height_ratios": [2, 1.3]})
    t, kind, lat = series_arrays(ov)
    phases = ov["phase_list"]
    end = max(p["start"] + p["duration"] for p in phases)
    edges = np.arange(0.0, end + 0.5, 0.5)
    groups = {"on time": (kind == "ok") & (lat <= slo_ms), "late (200)": (kind == "ok") & (lat > slo_ms),
              "shed (503)": kind == "shed", "expired (504)": kind == "expired",
              "other error / unanswered": np.isin(kind, ["error", "unanswered"])}
    colours = ["tab:green", "tab:orange", "tab:red", "tab:purple", "black"]
    for (name, sel), colour in zip(groups.items(), colours):
        counts, _ = np.histogram(t[sel], bins=edges)
        if counts.any():
            ax.plot(edges[:-1] + 0.25, counts / 0.5, label=name, color=colour, lw=1)
    ax.set_yscale("symlog", linthresh=10)
    ax.set_ylabel("requests/s (by scheduled time)")
    ax.legend(loc="upper left", fontsize=7, ncol=3)
    rss = ov["rss"]
    axm.plot(rss["t"], rss["mib"], color="tab:blue", lw=1.2, marker=".", ms=3)
    axm.set_ylabel("server RSS, MiB\n(sum over its processes)")
    axm.set_xlabel("time from the run's start, s")
    for a in (ax, axm):
        for p in phases:
            a.axvline(p["start"], color="grey", lw=0.6)
    for p in phases:
        ax.text(p["start"], 1.0, f" {p['name']} ({p['rate']:.0f}/s)", transform=ax.get_xaxis_transform(), fontsize=8,
                va="bottom")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def replica_kill_figure(title: str, rk: Mapping[str, Any], slo_ms: float) -> Any:
    plt = harness.pyplot()
    fig, (ax, axa) = plt.subplots(2, 1, figsize=(12, 5.5), sharex=True, gridspec_kw={"height_ratios": [2, 1.2]})
    t, kind, lat = series_arrays(rk)
    ok = kind == "ok"
    ax.scatter(t[ok], np.clip(lat[ok], 0.1, None), s=3, alpha=0.5, lw=0, color="tab:blue", label="answered 200")
    top = 2.0 * max([slo_ms] + [v for v in lat[ok] if math.isfinite(v)])
    for k, marker, colour in (("shed", "x", "tab:red"), ("expired", "v", "tab:orange"), ("error", "+", "black"),
                              ("unanswered", "|", "tab:purple")):
        sel = kind == k
        if sel.any():
            ax.scatter(t[sel], np.full(sel.sum(), top / 1.5), marker=marker, s=12, color=colour, label=f"{k} ({sel.sum()})")
    ax.axhline(slo_ms, color="tab:red", ls="--", lw=1, label=f"SLO {slo_ms:g} ms")
    ax.set_yscale("log")
    ax.set_ylim(0.5, top)
    ax.set_ylabel("latency ms")
    ax.legend(loc="upper left", fontsize=7, ncol=3)
    w = rk["windows"]
    axa.step([x["start"] for x in w] + [w[-1]["end"]], [100 * x["attainment"] for x in w] + [100 * w[-1]["attainment"]],
             where="post", color="black")
    axa.axhline(100 * TARGETS["kill_window_attainment"], color="tab:red", ls="--", lw=1)
    axa.set_ylabel("1-s attainment %")
    axa.set_xlabel("scheduled arrival, s")
    for a in (ax, axa):
        a.axvline(rk["killed_at"], color="tab:red", lw=1.5)
    ax.text(rk["killed_at"], 1.0, " SIGKILL to one replica", transform=ax.get_xaxis_transform(), fontsize=8,
            va="bottom", color="tab:red")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _settings_text(args: argparse.Namespace) -> str:
    return (f"Phases (warm-up of {args.warmup_s:g} s first, not scored): "
            + ", ".join(f"{n} {d:g} s" for n, d in zip(PHASES, args.durations))
            + f"; burst = {args.burst_factor:g}x the base rate; contention = the base rate while a Python busy-loop "
            "child process, pinned to one core, runs (started and killed by pid by the benchmark); recovery = the "
            f"base rate again. SLO {args.slo_ms:g} ms per request; max batch {args.max_batch_size}, batch wait "
            f"{args.batch_wait_ms:g} ms; {args.repeats} repeat(s) per policy, seeds {args.seed}.."
            f"{args.seed + args.repeats - 1} (one per repeat, shared by the policies), run interleaved (repeat 1 of "
            f"every policy, then repeat 2...); drain {args.drain_s:g} s after the last arrival. Torch threads: "
            f"{args.torch_threads} in the benchmark process and in every `coopnets serve --engine local` "
            "(`--torch-threads`); one per Ray replica (`--replica-cpus 1`).")


def build_report(report: harness.Report, args: argparse.Namespace, results: Mapping[str, Any],
                 checkpoints: Sequence[Checkpoint]) -> None:
    report.clear()
    data = checkpoints[0].data
    report.text(
        "Open-loop load test (`benchmarks/serving.py`): requests arrive at seeded Poisson times per phase whether or "
        "not earlier ones are answered, and each request's latency is counted from its *scheduled* arrival, so "
        "queueing and a late sender count. Every policy gets the same schedule and images in a repeat. "
        "Effective accuracy: share of *all* requests answered correctly *and* within the SLO, measured per request "
        f"on the digits {data.split} split ({len(data)} labelled images, each checkpoint's own preprocessing; "
        "the split the checkpoints were neither trained nor selected on): shed (503), expired (504), failed and "
        "unanswered requests count as late and wrong. Attainment is given over all requests and over the admitted "
        "ones (all but the shed). Figures are the mean over the repeats with a 95 % Student-t interval "
        "`mean [lo, hi]` (clipped to the values a share or a count can take); latency percentiles the median "
        "over the repeats with its distribution-free interval (for 3 repeats: their range); shed and expired are "
        "per run (totals in the JSON).",
        _settings_text(args))
    report.heading("Targets")
    rows = []
    for tag, res in results.items():
        for t in res["targets"]:
            rows.append([tag, t["target"], t["mode"], t["policy"], t["figure"],
                         "n/a" if t["met"] is None else ("met" if t["met"] else "**missed**")])
    report.table(["checkpoint", "target", "mode", "policy", "figures", "met"], rows)
    for ck in checkpoints:
        res = results[ck.tag]
        _checkpoint_section(report, args, ck, res)
    report.note("Latency is answer time minus *scheduled* arrival (the sender's own lag is inside it). p50/p99 are "
                "nearest-rank over a phase's requests in one run; refused and unanswered requests sort last "
                "('inf' when the percentile falls on them). Recovery: 1-s windows aligned at the load step, "
                "over the phase after it; the time until the last window whose p99 exceeds the SLO ends. Decision "
                "overhead: the controller's time deciding over its time running the batch.")
    report.note("In-process mode: the batcher neither sheds nor expires (every request is computed, however late), "
                "as in the earlier runs of this benchmark; over HTTP `coopnets serve` sheds (503) what even the "
                "shallowest depth of the policy cannot answer in time and drops (504) what waited past its "
                "deadline, for every policy alike (a fixed depth's shallowest depth is itself).")
    report.note("Runs of different policies are interleaved by repeat on a machine that may carry other load; the "
                "load average at the start and end is in the machine line above.")


def _checkpoint_section(report: harness.Report, args: argparse.Namespace, ck: Checkpoint, res: Mapping[str, Any]) -> None:
    rec, info = ck.record, ck.depth_info
    report.heading(f"Checkpoint `{ck.tag}`")
    la = info["latency"]
    sizes = sorted(la)
    report.text(f"`{rec['path']}` ({rec['backbone']}, {rec['num_depths']} depths, input {rec['input_size']}, "
                f"{rec['size_mb']:.1f} MB), trained with:")
    report.code(rec["training_command"])
    recorded = {r.get("depth"): r.get("accuracy") for r in rec["per_depth"]}
    rows = []
    for d in range(1, ck.num_depths + 1):
        rows.append([d, fmt_pct(info["test_accuracy"][d - 1]), fmt_pct(info["val_accuracy"][d - 1]),
                     fmt_pct(recorded.get(d))] + [f"{la[n]['median_ms'][d]:.2f}" for n in sizes])
    report.table(["depth", "test accuracy % (measured here)", "val accuracy %", "recorded in checkpoint %"]
                 + [f"ms at batch {n}" for n in sizes], rows)
    chk = info["check"]
    report.text(
        f"Depths must differ: full depth is {100 * chk['accuracy_gap']:.1f} points more accurate than depth 1 on the "
        f"test split (needs >= {100 * TARGETS['min_accuracy_gap']:.0f}: {'met' if chk['accuracy_met'] else 'MISSED'}) "
        "and " + ", ".join(f"{harness.format_interval(la[n]['full_over_depth1'], unit='x')} slower at batch {n}"
                           for n in sizes)
        + f" (paired interleaved timing, median [95 % interval]; needs >= {TARGETS['min_latency_ratio']:g}x: "
        f"{'met' if chk['latency_met'] else 'MISSED'})."
        + ("" if chk["met"] else " **The comparison below is not meaningful: this checkpoint's depths do not differ "
                                 "enough (run with --no-depth-check).**")
        + f" The digits images rebuilt here differ from the training tensors by at most "
        f"{ck.data.max_abs_diff_vs_training:.3f} (normalised units; 8-bit PNG rounding and PIL's resize).",
        f"Static budget: `depth_for_latency(model, {args.slo_ms:g}, batch_size={args.max_batch_size})` chose depth "
        f"{ck.static['depth']} (measured, deepest first: "
        + ", ".join(f"{t:.1f} ms" for t in ck.static["measured_ms"]) + "); it is served as that fixed depth, so "
        "its rows are that depth's runs. Controllers: per-depth accuracies measured on the digits validation split "
        f"({len(ck.val)} labelled images; over HTTP written as an ImageFolder of PNGs and passed as "
        "`--calibration-data`); `controller` is depth only (`--no-early-exit`), `controller+ee` adds the early-exit "
        "options fitted on the same images.")
    for mode, mres in res["modes"].items():
        report.heading(f"{ck.tag}: {mode}", 3)
        desc = ("in-process: `DynamicBatcher` + `DepthController` in the benchmark process, no HTTP, no shedding "
                "or expiry; images preprocessed ahead (not timed)" if mode == "inprocess" else
                f"over HTTP: one `coopnets serve --engine {args.engine}` subprocess per policy and repeat, PNG "
                "images POSTed to /predict by coopnets.bench's asyncio keep-alive client in the benchmark process; "
                "decoding and preprocessing are in the latency; decision overhead and batch size from the server's "
                "/stats, differenced between phase boundaries")
        cap = (f"full depth's measured capacity {mres['capacity']:.0f} req/s (closed loop, "
               f"{4 * args.max_batch_size} outstanding, {args.calibration_s:g} s), " if mres["capacity"] else "")
        probes = mres.get("base_rate_probes") or []
        probed = ("; open-loop probes of full depth, rate: attainment: "
                  + ", ".join(f"{p['rate']:.0f} req/s: {fmt_pct(p['attainment'])} %" for p in probes)) if probes else ""
        report.text(f"{desc}. Base rate {mres['base_rate']:.1f} req/s ({cap}{mres['base_rate_source']}{probed}).")
        caps = mres.get("capacities") or {}
        if caps:
            report.text("Closed-loop capacity per fixed depth (requests/s answered 200 with "
                        f"{4 * args.max_batch_size} outstanding, {args.calibration_s:g} s, first repeat): "
                        + ", ".join(f"{p} {c:.0f}" for p, c in sorted(caps.items()))
                        + f". The burst asks for {mres['base_rate'] * args.burst_factor:.0f} req/s.")
        head, rows = mode_table(mres)
        report.table(head, rows)
        if any(c in mres["policies"] for c in CONTROLLERS):
            head, rows = hindsight_table(mres)
            report.text("Effective accuracy against the best fixed depth in hindsight (the fixed depth with the "
                        "highest mean effective accuracy in that phase, on the same schedules):")
            report.table(head, rows)
        srows = []
        for p, r in mres["policies"].items():
            if r.get("same_run_as"):
                continue
            s = r["summary"]
            lag = max((mean_of(s, n, "send_lag_p99_ms") for n in PHASES), default=math.nan)
            shares = [c.get("core_share") for run in r["repeats"] for c in (run.get("contention_process") or [])]
            errs: Dict[str, int] = {}
            for run in r["repeats"]:
                for n in PHASES:
                    for k, v in (run["phases"][n].get("errors_by_status") or {}).items():
                        errs[k] = errs.get(k, 0) + v
            extra = ([" / ".join(fmt_ms(mean_of(s, n, "client_minus_server_p50_ms")) for n in PHASES)]
                     if mode == "http" else [])
            srows.append([p, " / ".join(_recovery_iv(s[n]["recovery_s"]) if s[n]["recovery_s"].get("n") else "-"
                                        for n in PHASES[1:]), f"{lag:.1f}"] + extra
                         + [fmt_pct(float(np.mean(_finite(shares))) if _finite(shares) else math.nan, 0),
                            " ".join(f"{k}:{v}" for k, v in sorted(errs.items())) or "0",
                            sum(s[n]["total"]["unanswered"] for n in PHASES)])
        extra_head = ["client minus server latency p50 ms (quiet / burst / contention / recovery)"] if mode == "http" else []
        report.table(["policy", "recovery s after burst / contention / recovery starts (median)",
                      "sender lag p99 ms (worst phase, mean)"] + extra_head
                     + ["busy process % of a core", "other errors by status (all repeats)", "unanswered (all repeats)"],
                     srows)
        report.image(f"{NAME}_{ck.tag}_{mode}.png", f"{ck.tag} {mode}: latency and depth over time")
    ov = res.get("overload")
    if ov is not None:
        report.heading(f"{ck.tag}: overload", 3)
        if "error" in ov:
            report.text(f"Not measured: {ov['error']}")
        else:
            rss = ov["rss"]
            report.text(
                f"`{ov['policy']}` over HTTP ({ov['server_command'].split(' --host')[0]} ...), the load in multiples "
                f"of full depth's HTTP capacity ({ov['capacity']:.0f} req/s, {ov['capacity_source']}): "
                + ", ".join(f"{f:g}x for {d:g} s" for f, d in zip(ov["factors"], ov["durations_s"]))
                + f", after a {args.warmup_s:g}-s warm-up at the base rate and followed by "
                f"{args.overload_after_s:g} s at the base rate ({ov['base_rate']:.0f} req/s). 'From the send': "
                "latency from the moment the client actually sent the request (the load generator shares the two "
                "cores and falls behind the schedule at these rates; its lag is the 'sender lag' column); 'from the "
                "schedule': from the scheduled arrival, as everywhere else.")
            rows = []
            for n, s in ov["phases"].items():
                errs = s.get("errors_by_status") or {}
                sent = f"{s['sent_rate']:.0f}" if math.isfinite(s["sent_rate"]) else "-"
                rows.append([n, f"{s['rate']:.0f}", s["requests"], sent, f"{s['send_lag_p99_ms']:.0f}", s["answered"],
                             s["late"], s["late_from_send"], s["shed"], s["expired"],
                             " ".join(f"{k}:{v}" for k, v in errs.items()) or "0",
                             f"{s['unanswered']} ({s['not_sent']} never sent)" if s["not_sent"] else s["unanswered"],
                             fmt_pct(s["attainment"]), fmt_pct(s["admitted_attainment"]),
                             fmt_pct(s["admitted_attainment_from_send"]), fmt_ms(s["p99_ms"])])
            report.table(["phase", "rate asked req/s", "requests", "sent req/s", "sender lag p99 ms", "answered 200",
                          "answered late (from schedule)", "answered late (from send)", "shed", "expired",
                          "other errors", "unanswered", "attainment % (all)", "admitted attainment % (schedule)",
                          "admitted attainment % (send)", "p99 ms"], rows)
            if "start_mib" in rss:
                slopes = ", ".join(f"{k} {v:+.1f}" for k, v in rss.get("slope_mib_per_min", {}).items())
                report.text(
                    f"Server memory (VmRSS summed over the processes of its session, every 0.5 s, "
                    f"{len(rss['mib'])} samples, {max(rss['processes'])} process(es)): idle after start "
                    f"{rss['idle_mib']:.0f} MiB, at the start of the overload {rss['start_mib']:.0f} MiB, max "
                    f"{rss['max_mib']:.0f} MiB ({rss['growth_mib']:+.0f}), at the end {rss['end_mib']:.0f} MiB "
                    f"({rss['end_growth_mib']:+.0f}); trend per phase, MiB/min (least squares): {slopes or '-'}. "
                    f"The client opened {ov['connections_opened']} keep-alive connections (at most 4096 at once).")
            if rss.get("error"):
                report.text(f"Memory sampling stopped: {rss['error']}.")
            report.image(f"{NAME}_{ck.tag}_overload.png", f"{ck.tag}: overload, outcomes and memory over time")
    if res.get("family"):
        family_section(report, ck, res)
    if res.get("autoscale"):
        autoscale_section(report, args, ck, res["autoscale"])
    rk = res.get("replica_kill")
    if rk is not None:
        report.heading(f"{ck.tag}: replica death", 3)
        if "requests" not in rk:
            report.text(f"Not measured: {rk.get('error')}")
        else:
            after = [w for w in rk["windows"] if w["start"] >= rk["killed_at"] - 1e-9][:12]
            report.text(
                f"`coopnets serve --engine ray --num-replicas {rk['replicas']}` with `{rk['policy']}` (started in "
                f"{rk['startup_s']:.0f} s; closed-loop capacity "
                + (f"{rk['ray_capacity']:.0f} req/s" if rk.get("ray_capacity") else "not measured")
                + f"), open loop at {rk['rate']:.0f} req/s ({rk['rate_source']}) for {args.replica_kill_s:g} s after a "
                f"{args.warmup_s:g}-s warm-up; at {rk['killed_at']:.1f} s SIGKILL to replica process "
                f"{rk.get('pid', '-')} (`{(rk.get('title') or '-')[:80]}`), found among the server's session by its "
                f"title. Replica processes before: {len(rk.get('replicas_before') or {})}, after the run: "
                f"{len(rk.get('replicas_after') or {})}." + (f" **{rk['error']}**" if rk.get("error") else ""))
            report.table(["requests", "answered 200", "on time", "errors by status", "connection failures (status 0)",
                          f"unanswered at deadline + {TARGETS['kill_grace_s']:g} s", "attainment % before the kill",
                          "after", "until >= 99 % again, s", "1-s attainment % from the kill"],
                         [[rk["requests"], rk["answered_200"], rk["on_time"],
                           " ".join(f"{k}:{v}" for k, v in rk["errors_by_status"].items()) or "0",
                           rk["connection_failures"], rk["hung"], fmt_pct(rk["attainment_before"]),
                           fmt_pct(rk["attainment_after"]), "never" if math.isinf(rk["back_s"]) else f"{rk['back_s']:.0f}",
                           " ".join(fmt_pct(w["attainment"], 0) for w in after)]])
            report.image(f"{NAME}_{ck.tag}_replica_kill.png", f"{ck.tag}: replica death")


def slim(results: Mapping[str, Any]) -> Dict[str, Any]:
    """The results without the per-request series (the figures' data) and decisions: the JSON."""
    out: Dict[str, Any] = {}
    for tag, res in results.items():
        modes = {}
        for mode, mres in res["modes"].items():
            pols = {}
            for p, r in mres["policies"].items():
                pols[p] = {**{k: v for k, v in r.items() if k not in ("series", "repeats")},
                           "repeats": [{k: v for k, v in run.items() if k != "series"} for run in r["repeats"]]}
            modes[mode] = {**mres, "policies": pols}
        drop = lambda d: None if d is None else {k: v for k, v in d.items() if k != "series"}  # noqa: E731
        au = res.get("autoscale")
        if au is not None:
            au = {**au, "runs": {n: drop(r) for n, r in au["runs"].items()}}
        out[tag] = {**res, "modes": modes, "overload": drop(res.get("overload")),
                    "replica_kill": drop(res.get("replica_kill")), "autoscale": au}
    return out


# --- main -------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", type=Path, action="append", default=None,
                   help=f"save_pretrained checkpoint folder; repeat for several (one section each; default {CHECKPOINT})")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--policies", nargs="+", default=None,
                   help="depthK..., static, controller, controller+ee, or 'fixed' (every depth); default all")
    p.add_argument("--repeats", type=int, default=3, help="runs per policy, each on its own seed, interleaved")
    p.add_argument("--slo-ms", type=float, default=100.0, help="latency objective per request, ms")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--batch-wait-ms", type=float, default=None, help="default min(5, slo/20), as coopnets serve")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="coopnets serve --engine of the HTTP policies and the overload")
    p.add_argument("--num-replicas", type=int, default=1, help="with --engine ray: replicas per server")
    p.add_argument("--server-args", default="", help="more coopnets serve arguments for every server (one string)")
    p.add_argument("--base-rate", type=float, default=None,
                   help="base rate, requests/s (default: --load-fraction x full depth's measured capacity, per mode)")
    p.add_argument("--http-base-rate", type=float, default=None, help="base rate over HTTP (default --base-rate)")
    p.add_argument("--load-fraction", type=float, default=0.65, help="in-process base rate / full depth's capacity")
    p.add_argument("--http-load-fraction", type=float, default=0.75,
                   help="HTTP base rate / full depth's capacity over HTTP (the server sheds: the burst must ask for "
                        "over twice full depth's capacity for full depth to attain < 50 %%)")
    p.add_argument("--http-min-burst-overload", type=float, default=2.2,
                   help="over HTTP the base-rate probes keep the burst at least this many times full depth's capacity")
    p.add_argument("--no-capacity-per-depth", dest="capacity_per_depth", action="store_false",
                   help="measure the closed-loop capacity of full depth only (default: of every fixed depth run)")
    p.add_argument("--burst-factor", type=float, default=3.0, help="burst rate / base rate")
    p.add_argument("--durations", type=float, nargs=4, default=list(DEFAULT_DURATIONS),
                   metavar=("QUIET", "BURST", "CONTENTION", "RECOVERY"), help="phase lengths, s")
    p.add_argument("--warmup-s", type=float, default=4.0, help="warm-up at the base rate before the phases (not scored)")
    p.add_argument("--calibration-s", type=float, default=4.0, help="closed-loop capacity measurement, s")
    p.add_argument("--base-rate-probes", type=int, default=4,
                   help="open-loop probes of full depth at the base rate: while it attains < 99 %%, the rate x 0.8 "
                        "(not below the rate whose burst asks for 1.1 x full depth's capacity in-process, "
                        "--http-min-burst-overload x over HTTP)")
    p.add_argument("--probe-s", type=float, default=4.0, help="length of one base-rate probe, s")
    p.add_argument("--drain-s", type=float, default=10.0,
                   help="after the last arrival, wait at most this long for answers (the rest count as unanswered)")
    p.add_argument("--overload", action=argparse.BooleanOptionalAction, default=None,
                   help="the overload experiment (default: on when the HTTP mode runs)")
    p.add_argument("--overload-policy", default="controller", choices=["controller", "controller+ee"])
    p.add_argument("--overload-factors", type=float, nargs="+", default=[5.0, 10.0],
                   help="overload rates, multiples of full depth's HTTP capacity")
    p.add_argument("--overload-s", type=float, nargs="+", default=[8.0, 30.0], help="length of each overload, s")
    p.add_argument("--overload-after-s", type=float, default=5.0, help="base rate after the overload, s (0: none)")
    p.add_argument("--replica-kill", action=argparse.BooleanOptionalAction, default=None,
                   help="the replica-death experiment on Ray Serve (default: on when the HTTP mode runs)")
    p.add_argument("--replica-kill-policy", default="controller", choices=["controller", "controller+ee"])
    p.add_argument("--replica-kill-replicas", type=int, default=2)
    p.add_argument("--replica-kill-rate", type=float, default=None,
                   help="requests/s (default: the HTTP base rate, or --replica-kill-load x the Ray server's measured "
                        "capacity when that is lower)")
    p.add_argument("--replica-kill-load", type=float, default=0.4,
                   help="the most load of the replica-death run, as a share of the Ray server's closed-loop capacity")
    p.add_argument("--replica-kill-s", type=float, default=20.0, help="length of the run, s")
    p.add_argument("--replica-kill-at-s", type=float, default=7.0, help="the SIGKILL, s into the run")
    p.add_argument("--family", type=Path, action="append", default=None,
                   help="an `independent` sweep folder (coopnets train --method independent: one network per depth), "
                        "served as policy 'family', the model-switching baseline; one per --checkpoint, in order")
    p.add_argument("--autoscale", action="store_true",
                   help="the step experiment on Ray Serve: full depth with autoscaling 1 -> 2 replicas, the controller "
                        "on one replica, the controller with autoscaling")
    p.add_argument("--autoscale-load", type=float, default=0.35,
                   help="base rate of the step experiment, as a share of one local server's full-depth capacity")
    p.add_argument("--autoscale-rate", type=float, default=None, help="base rate of the step experiment, req/s")
    p.add_argument("--autoscale-factor", type=float, default=3.0, help="the step, in multiples of the base rate")
    p.add_argument("--autoscale-durations", type=float, nargs=3, default=[20.0, 30.0, 30.0],
                   metavar=("QUIET", "STEP", "AFTER"), help="phase lengths of the step experiment, s")
    p.add_argument("--autoscale-target", type=float, default=2.0,
                   help="Ray Serve target_ongoing_requests per replica of the autoscaling servers")
    p.add_argument("--autoscale-upscale-delay-s", type=float, default=1.0, help="Ray Serve upscale_delay_s")
    p.add_argument("--seed", type=int, default=0, help="seed of the first repeat (repeat k: seed + k - 1)")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch threads of the benchmark process and of every local-engine server")
    p.add_argument("--latency-repeats", type=int, default=20, help="timed rounds of the depth check")
    p.add_argument("--server-timeout-s", type=float, default=300.0, help="longest wait for coopnets serve's /healthz")
    p.add_argument("--no-depth-check", action="store_true",
                   help="go on when the checkpoint's depths do not differ enough (tests with untrained models)")
    p.add_argument("--log-dir", type=Path, default=None,
                   help="keep every coopnets serve log here (default: a temporary folder, removed at the end)")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    from coopnets.cli.errors import bad_value

    if args.repeats < 1:
        raise bad_value("--repeats", args.repeats, "must be >= 1")
    if len(args.overload_factors) != len(args.overload_s):
        raise bad_value("--overload-s", " ".join(f"{v:g}" for v in args.overload_s),
                        f"give one length per --overload-factors value ({len(args.overload_factors)})")
    for name in ("slo_ms", "warmup_s", "calibration_s", "probe_s", "burst_factor", "replica_kill_s"):
        v = getattr(args, name)
        if not (math.isfinite(v) and (v > 0 or (name == "warmup_s" and v == 0))):
            raise bad_value("--" + name.replace("_", "-"), v, "must be a number > 0")
    if any(not (math.isfinite(v) and v > 0) for v in [*args.durations, *args.overload_factors, *args.overload_s]):
        raise bad_value("--durations/--overload-factors/--overload-s", "", "every value must be a number > 0")
    if not 0 <= args.replica_kill_at_s < args.replica_kill_s:
        raise bad_value("--replica-kill-at-s", args.replica_kill_at_s,
                        f"must be in [0, --replica-kill-s {args.replica_kill_s:g})")
    if args.batch_wait_ms is None:
        args.batch_wait_ms = min(5.0, args.slo_ms / 20)
    args.checkpoint = [c.resolve() for c in (args.checkpoint or [CHECKPOINT])]
    args.family = [f.resolve() for f in (args.family or [])]
    if len(args.family) > len(args.checkpoint):
        raise bad_value("--family", args.family[-1], f"one per --checkpoint at most ({len(args.checkpoint)} given)")
    if args.autoscale and "http" not in args.modes:
        raise bad_value("--autoscale", "", "runs over HTTP: add http to --modes")
    if args.overload is None:
        args.overload = "http" in args.modes
    if args.replica_kill is None:
        args.replica_kill = "http" in args.modes
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
    for path in args.checkpoint:  # every checkpoint's weights are there, before an hour of runs
        if not (path / "model.safetensors").is_file():
            load_checkpoint(path)  # raises, naming the path and how to make the weights
    report = harness.Report.start(NAME, TITLE, __file__, argv,
                                  torch_threads=f"{args.torch_threads} (benchmark process and every local-engine "
                                                "coopnets serve; 1 per Ray replica)")
    tags = checkpoint_tags([checkpoint_record(p) for p in args.checkpoint])
    sizes = len({1, args.max_batch_size})
    results: Dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="coopnets-serving-bench-") as tmp, \
            harness.progress_bar(total=sizes * len(args.checkpoint), desc="serving", unit="step") as bar:
        work = Path(tmp)
        checkpoints: List[Checkpoint] = []
        families = args.family + [None] * (len(args.checkpoint) - len(args.family))
        for path, tag, fam in zip(args.checkpoint, tags, families):  # every depth check first: a refused one stops at once
            ck = prepare_checkpoint(path, tag, args, work, bar, family=fam)
            policies = policy_names(args.policies, ck.num_depths, family=ck.family is not None)
            ck.plans = {m: plan_runs(m, policies, ck.static["depth"], ck.num_depths, base_rate_given(m, args) is not None)
                        for m in args.modes}
            checkpoints.append(ck)
        extra = (int(args.overload and "http" in args.modes) + int(args.replica_kill and "http" in args.modes)
                 + len(AUTOSCALE_RUNS) * int(args.autoscale))
        bar.total = sizes * len(checkpoints) + sum(args.repeats * sum(len(p["runs"]) for p in ck.plans.values()) + extra
                                                   for ck in checkpoints)
        bar.refresh()
        bar.write("; ".join(f"{ck.tag}: static depth {ck.static['depth']}, runs "
                            + ", ".join(f"{m}: {' '.join(p['runs'])}" for m, p in ck.plans.items())
                            for ck in checkpoints)
                  + f"; {args.repeats} repeat(s); expect about "
                  f"{estimate_s(args, [ck.plans for ck in checkpoints]) / 60:.0f} min")
        for ck in checkpoints:
            log_dir = args.log_dir or work
            log_dir.mkdir(parents=True, exist_ok=True)
            results[ck.tag] = run_checkpoint(ck, policy_names(args.policies, ck.num_depths, family=ck.family is not None),
                                             args, log_dir, bar)
            bar.write(f"{ck.tag}: done")
    report.finish()
    build_report(report, args, results, checkpoints)
    args.out.mkdir(parents=True, exist_ok=True)
    plt = harness.pyplot()
    for ck in checkpoints:
        res = results[ck.tag]
        for mode, mres in res["modes"].items():
            fig = figure(f"{ck.tag}, {mode}: latency and chosen depth over time per policy (first repeat)", mres,
                         args.slo_ms, ck.num_depths)
            fig.savefig(args.out / f"{NAME}_{ck.tag}_{mode}.png", dpi=110)
            plt.close(fig)
        if res.get("overload") and "series" in res["overload"]:
            fig = overload_figure(f"{ck.tag}: overload of `{res['overload']['policy']}`", res["overload"], args.slo_ms)
            fig.savefig(args.out / f"{NAME}_{ck.tag}_overload.png", dpi=100)
            plt.close(fig)
        if res.get("autoscale"):
            fig = autoscale_figure(f"{ck.tag}: a {args.autoscale_factor:g}x step, autoscaling alone against depth with "
                                   "autoscaling (Ray Serve, 1 -> 2 replicas)", res["autoscale"], args.slo_ms)
            fig.savefig(args.out / f"{NAME}_{ck.tag}_autoscale.png", dpi=100)
            plt.close(fig)
        if res.get("replica_kill") and "series" in res["replica_kill"]:
            fig = replica_kill_figure(f"{ck.tag}: one of {args.replica_kill_replicas} Ray Serve replicas killed",
                                      res["replica_kill"], args.slo_ms)
            fig.savefig(args.out / f"{NAME}_{ck.tag}_replica_kill.png", dpi=100)
            plt.close(fig)
    settings = {k: ([str(x) for x in v] if isinstance(v, list) and v and isinstance(v[0], Path)
                    else str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    report.keep_handwritten(args.out / f"{NAME}.md")  # a "(written by hand" section of an earlier run stays
    report.write(args.out, data=jsonable({"settings": settings, "targets_spec": TARGETS, "checkpoints": slim(results)}))
    print(report.markdown())
    return {"checkpoints": results}


if __name__ == "__main__":
    from coopnets.cli.errors import run_entry

    def run() -> int:
        main()  # the results dict is for callers in Python; the command's code is 0
        return 0

    sys.exit(run_entry(run, prog="benchmarks/serving.py"))
