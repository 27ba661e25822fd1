"""Per-batch depth control: the most accurate way to run a batch that still meets its deadline.

A :class:`ServingOption` is one way to run a batch: a fixed depth (``forward_depth``) or
early exit with calibrated thresholds (:class:`~coopnets.EarlyExit`, the second knob).
Before each batch, :meth:`DepthController.decide` takes the batch size and how long each
request has waited; the batch's *slack* is ``min(slo_ms - waited_ms)``. Among the options
whose predicted run time, safety margin included (:meth:`LatencyModel.upper`), fits the
slack it picks the highest expected accuracy (ties: the faster); when none fits it picks
the shallowest depth and counts a *miss*. It first looks one batch ahead (``reserve_next``): this
batch's option plus the shallowest depth for the next batch must also fit the next batch's
slack, where the next batch is the requests queued behind this one (``backlog_waited_ms``,
oldest first) or, with none queued, requests arriving during this run (waited 0, as many
as in this batch). So a long deep run never leaves the requests behind it without time;
the look-ahead is dropped when it leaves no option.

:meth:`DepthController.run` decides, runs through the per-call ``forward_depth`` (or the
option's own :class:`~coopnets.EarlyExit`), never ``set_depth``, so concurrent callers
never see each other's depth, times the run and feeds :meth:`LatencyModel.observe`.
:meth:`DepthController.for_model` builds all of it from a model: accuracies from the
checkpoint's ``config.json`` (validation accuracies first: :mod:`.calibration`), the user, or labelled
calibration batches (which also add early-exit options via :func:`~coopnets.budget_curve`),
and the latency prior from profiling every option at a few batch sizes.

Example:
    >>> import torch, coopnets
    >>> from coopnets.serving import DepthController
    >>> m = coopnets.wrap("test_resnet", num_classes=10).eval()
    >>> ctl = DepthController.for_model(m, slo_ms=1e4, accuracies=[0.6, 0.7, 0.8, 0.9], input_size=(3, 32, 32),
    ...                                 max_batch_size=4, profile_batch_sizes=[1, 4], repeats=1)
    >>> logits, depths, decision = ctl.run(torch.randn(4, 3, 32, 32), waited_ms=[0.0] * 4)
    >>> logits.shape, decision.option.name, decision.fits, depths.tolist()
    (torch.Size([4, 10]), 'depth4', True, [4, 4, 4, 4])
    >>> late = ctl.decide(4, [1e4] * 4)        # no slack left: the shallowest depth, counted as a miss
    >>> late.fits, ctl.stats()["misses"], late.option.name
    (False, 1, 'depth1')
"""
from __future__ import annotations

import threading
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..inference import EarlyExit, budget_curve
from .arrivals import CAPACITY_HEADROOM, ArrivalRate
from .calibration import measured_accuracies, recorded_accuracies
from .latency import LatencyModel

if TYPE_CHECKING:
    from ..models.depth_adaptive import DepthAdaptiveModel

#: FLOPs budgets (fractions of full depth) of the early-exit options made from calibration data
EARLY_EXIT_RATIOS = (0.4, 0.55, 0.7, 0.85)


@dataclass(frozen=True)
class ServingOption:
    """One way to run a batch.

    Attributes:
        name: ``"depth3"``, ``"early_exit@0.6"``...; the latency model's key.
        depth: the depth run (early exit: the deepest depth it may reach).
        accuracy: expected accuracy in [0, 1].
        thresholds: early-exit ``confidence`` thresholds, one per exit head, or ``None``
            for a fixed depth.
    """

    name: str
    depth: int
    accuracy: float
    thresholds: Optional[Tuple[float, ...]] = None

    @property
    def early_exit(self) -> bool:
        return self.thresholds is not None


@dataclass
class Decision:
    """What :meth:`DepthController.decide` chose for one batch.

    Attributes:
        option: the option to run.
        batch_size: the batch's size.
        slack_ms: ``min`` over the batch of ``slo_ms - waited_ms``.
        predicted_ms: predicted run time, margin included.
        fits: ``predicted_ms <= slack_ms`` (``False``: no option fit, a miss).
        decide_ms: time spent deciding.
        run_ms: measured run time (set by :meth:`DepthController.run`; NaN before).
    """

    option: ServingOption
    batch_size: int
    slack_ms: float
    predicted_ms: float
    fits: bool
    decide_ms: float
    run_ms: float = float("nan")


class DepthController:
    """Picks, runs and learns the serving option of every batch (see the module docstring).

    Args:
        model: a depth-adaptive model in eval mode.
        options: the ways to run a batch; names must be unique.
        latency: the latency model (a prior for every option, see :meth:`LatencyModel.profile`).
        slo_ms: the latency objective per request, from its arrival (may be changed later).
        fixed: always run this option (a baseline: the controller is off, misses still counted).
        max_batch_size: the largest batch the caller forms (for the look-ahead).
        reserve_next: look one batch ahead (see the module docstring).
    """

    def __init__(
        self,
        model: "DepthAdaptiveModel",
        options: Sequence[ServingOption],
        latency: LatencyModel,
        slo_ms: float,
        *,
        fixed: Optional[str] = None,
        max_batch_size: int = 8,
        reserve_next: bool = True,
    ) -> None:
        if not options:
            raise ValueError("DepthController needs at least one ServingOption.")
        names = [o.name for o in options]
        if len(set(names)) != len(names):
            raise ValueError(f"ServingOption names must be unique, got {names}.")
        if fixed is not None and fixed not in names:
            raise ValueError(f"fixed={fixed!r} is not one of the options {names}.")
        if getattr(model, "training", False):
            raise ValueError("Serve a model in eval mode: call model.eval() first (BatchNorm would update "
                             "its statistics on every request).")
        if not slo_ms > 0:
            raise ValueError(f"slo_ms must be > 0, got {slo_ms!r}.")
        self.model, self.latency, self.slo_ms = model, latency, float(slo_ms)
        self.options: List[ServingOption] = list(options)
        self.fixed = next((o for o in options if o.name == fixed), None)
        self.max_batch_size = int(max_batch_size)
        self.reserve_next = bool(reserve_next)
        for o in self.options:
            if o.name not in latency.options:
                raise ValueError(f"The latency model has no prior for option {o.name!r}; profile it first.")
            model.resolve_depth(o.depth)
        # best accuracy first; equal accuracies in the profiled order of speed
        self._ranked = sorted(self.options, key=lambda o: (-o.accuracy, latency.predict(o.name, 1)))
        self._early_exits: Dict[str, EarlyExit] = {
            o.name: EarlyExit(model, "confidence", list(o.thresholds)) for o in self.options if o.early_exit
        }
        #: arrivals the engine reports (:meth:`observe_arrival`); the chosen option keeps up with their rate
        self.arrivals = ArrivalRate()
        self._lock = threading.RLock()
        self._device = next(model.parameters()).device
        self.reset_stats()

    # --- construction from a model ----------------------------------------------------
    @classmethod
    def for_model(
        cls,
        model: "DepthAdaptiveModel",
        slo_ms: float,
        *,
        accuracies: Optional[Sequence[float]] = None,
        calibration: Optional[Iterable[Tuple[Tensor, Tensor]]] = None,
        early_exit: bool = True,
        depth: Optional[int] = None,
        input_size: Optional[Sequence[int]] = None,
        max_batch_size: int = 8,
        profile_batch_sizes: Optional[Sequence[int]] = None,
        repeats: int = 3,
        reserve_next: bool = True,
        **latency_kwargs: Any,
    ) -> "DepthController":
        """A controller for ``model`` (put in eval mode): options, accuracies and the profiled latency prior.

        Args:
            accuracies: per-depth accuracy, depth 1 first. Default (``None`` or empty):
                measured on ``calibration`` if given, else the checkpoint's recorded validation
                accuracies (:func:`~coopnets.serving.calibration.recorded_accuracies`; test
                accuracies only when it records none, with a warning).
            calibration: labelled ``(images, labels)`` batches (e.g. from
                :func:`~coopnets.serving.calibration.load_calibration`); per-depth accuracy is measured
                on them and, with ``early_exit`` on an ``exits``-plan model, early-exit options
                are added (thresholds from :func:`~coopnets.budget_curve` at
                :data:`EARLY_EXIT_RATIOS`, with their measured accuracy; measured on the data
                they were fitted on, so somewhat optimistic). Its images also feed profiling.
            depth: serve only this depth (a baseline with the controller off; its accuracy is
                NaN when none is known).
            input_size: (C, H, W) profiled; default the calibration images', else the
                model's ``pretrained_cfg['input_size']``.
            max_batch_size: the largest batch served.
            profile_batch_sizes: default ``{1, max_batch_size // 2, max_batch_size}``.
            repeats: timed runs per profiled cell.
            reserve_next: look one batch ahead (see the module docstring).
            latency_kwargs: passed to :class:`LatencyModel`.

        Raises:
            ValueError: no accuracy table (the message says to pass ``accuracies=``), or a
                wrong number of accuracies.
        """
        model.eval()
        batches = list(calibration) if calibration is not None else []
        if accuracies is None or len(accuracies) == 0:
            try:
                if batches:
                    accuracies = measured_accuracies(model, batches)
                else:
                    recorded = recorded_accuracies(model)
                    if recorded.warning and depth is None:
                        warnings.warn(recorded.warning, UserWarning, stacklevel=2)
                    accuracies = recorded.values
            except ValueError:
                if depth is None:
                    raise
                accuracies = [float("nan")] * model.num_depths  # a fixed-depth baseline decides nothing
        accuracies = [float(a) for a in accuracies]
        if len(accuracies) != model.num_depths:
            raise ValueError(f"accuracies needs one value per depth ({model.num_depths}), got {len(accuracies)}.")
        options = [ServingOption(f"depth{d}", d, accuracies[d - 1]) for d in range(1, model.num_depths + 1)]
        if depth is not None:
            options = [options[model.resolve_depth(depth) - 1]]
        elif batches and early_exit and model.num_depths > 1:
            try:
                curve = budget_curve(model, batches, flops_ratios=EARLY_EXIT_RATIOS, criterion="confidence")
            except ValueError:  # no early exit for this model (plan, backbone): fixed depths only
                curve = []
            for ratio, cal in zip(EARLY_EXIT_RATIOS, curve):
                options.append(ServingOption(f"early_exit@{ratio:g}", model.num_depths, cal.accuracy,
                                             tuple(float(t) for t in cal.thresholds)))
        size = tuple(input_size or (batches[0][0].shape[1:] if batches else model.pretrained_cfg.get("input_size")))
        device = next(model.parameters()).device
        pool = torch.cat([x for x, _ in batches]) if batches else torch.randn(max_batch_size, *size)
        while len(pool) < max_batch_size:
            pool = torch.cat([pool, pool])
        pool = pool[:max_batch_size].to(device)
        sizes = profile_batch_sizes or sorted({1, max(1, max_batch_size // 2), max_batch_size})
        if max(sizes) > len(pool):
            pool = pool.repeat((max(sizes) + len(pool) - 1) // len(pool), 1, 1, 1)
        runners = {o.name: EarlyExit(model, "confidence", list(o.thresholds)) for o in options if o.early_exit}

        def run(option: ServingOption, n: int) -> None:
            with torch.inference_mode():
                if option.early_exit:
                    runners[option.name](pool[:n])
                else:
                    model.forward_depth(pool[:n], option.depth)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)

        latency = LatencyModel.profile(run, options, sizes, repeats=repeats, warmup=1, **latency_kwargs)
        return cls(model, options, latency, slo_ms, fixed=options[0].name if depth is not None else None,
                   max_batch_size=max(max_batch_size, max(sizes)), reserve_next=reserve_next)

    # --- deciding ---------------------------------------------------------------------
    def _capacity(self, option: ServingOption) -> float:
        """Requests per second ``option`` serves at full batches (predicted)."""
        return 1e3 * self.max_batch_size / max(self.latency.predict(option.name, self.max_batch_size), 1e-6)

    def _choose(self, n: int, slack: float) -> Tuple[Optional[ServingOption], float]:
        upper = self.latency.upper
        best: Optional[ServingOption] = None
        best_p = 0.0
        need = CAPACITY_HEADROOM * self.arrivals.per_second() if self.arrivals.seen else 0.0
        if need:  # keep up with the stream; when no option can, only the most capable ones
            need = min(need, max(self._capacity(o) for o in self.options))
        for o in self._ranked:
            if best is not None and o.accuracy < best.accuracy:
                break
            if need and self._capacity(o) < need:
                continue
            p = upper(o.name, n)
            if p <= slack and (best is None or p < best_p):
                best, best_p = o, p
        return best, best_p

    def _shallowest(self, n: int) -> Tuple[ServingOption, float]:
        """The shallowest plain depth (what runs when nothing fits) and its predicted time for ``n`` samples."""
        option = min(self.options, key=lambda o: (o.early_exit, o.depth))
        return option, self.latency.upper(option.name, n)

    def shallowest_ms(self, n: int) -> float:
        """Predicted time (margin included) of the shallowest plain depth for ``n`` samples: the fastest
        a batch can go, which admission control compares with deadlines."""
        return self._shallowest(n)[1]

    def observe_arrival(self, t: Optional[float] = None) -> None:
        """A request arrived at ``t`` (``time.perf_counter()`` seconds, default now); see :mod:`.arrivals`."""
        self.arrivals.observe(t)

    def decide(self, batch_size: int, waited_ms: Sequence[float], *,
               backlog_waited_ms: Sequence[float] = ()) -> Decision:
        """The option for a batch of ``batch_size`` whose requests have waited ``waited_ms`` so far.

        Args:
            backlog_waited_ms: waits of the requests queued behind this batch, oldest first
                (optional one-batch look-ahead; see the module docstring).
        """
        start = time.perf_counter()
        n = int(batch_size)
        slack = self.slo_ms - (max(waited_ms) if len(waited_ms) else 0.0)
        if self.fixed is not None:
            option, predicted = self.fixed, self.latency.upper(self.fixed.name, n)
        else:
            option, predicted = None, 0.0
            if self.reserve_next or len(backlog_waited_ms):
                nxt = min(max(len(backlog_waited_ms), n), self.max_batch_size)
                oldest = max(backlog_waited_ms[:nxt]) if len(backlog_waited_ms) else 0.0
                next_slack = self.slo_ms - oldest - self._shallowest(nxt)[1]
                if next_slack < slack:
                    option, predicted = self._choose(n, next_slack)
            if option is None:
                option, predicted = self._choose(n, slack)
            if option is None:
                option, predicted = self._shallowest(n)
        fits = predicted <= slack
        decision = Decision(option, n, slack, predicted, fits, (time.perf_counter() - start) * 1e3)
        with self._lock:
            self._decisions += 1
            self._misses += not fits
            self._decide_ms += decision.decide_ms
            self._chosen[option.name] = self._chosen.get(option.name, 0) + 1
        return decision

    # --- running ----------------------------------------------------------------------
    def run(self, x: Tensor, waited_ms: Sequence[float], *, backlog_waited_ms: Sequence[float] = (),
            on_decision: Optional[Callable[[Decision], None]] = None) -> Tuple[Tensor, Tensor, Decision]:
        """Decide, run the batch ``x`` and learn its latency; thread-safe (one batch at a time).

        Time spent waiting for another caller's batch is added to ``waited_ms`` (and the backlog's).
        ``on_decision`` is called with the decision before the batch runs (a batcher's admission
        control reads when the running batch should end).

        Returns:
            ``(logits (N, C), per-sample depth run (N,), decision)``.
        """
        entered = time.perf_counter()
        with self._lock:
            queued_ms = (time.perf_counter() - entered) * 1e3
            if queued_ms > 0.05:
                waited_ms = [w + queued_ms for w in waited_ms]
                backlog_waited_ms = [w + queued_ms for w in backlog_waited_ms]
            decision = self.decide(len(x), waited_ms, backlog_waited_ms=backlog_waited_ms)
            if on_decision is not None:
                on_decision(decision)
            option = decision.option
            if x.device != self._device:
                x = x.to(self._device)
            start = time.perf_counter()
            with torch.inference_mode():
                if option.early_exit:
                    out = self._early_exits[option.name](x)
                    logits, depths = out.logits, out.exit_depths
                else:
                    logits = self.model.forward_depth(x, option.depth)
                    depths = torch.full((len(x),), option.depth, dtype=torch.long, device=logits.device)
                if self._device.type == "cuda":
                    torch.cuda.synchronize(self._device)
            decision.run_ms = (time.perf_counter() - start) * 1e3
            self.latency.observe(option.name, len(x), decision.run_ms)
            self._run_ms += decision.run_ms
            self._runs += 1
            self._samples += len(x)
            counts = torch.bincount(depths.cpu(), minlength=self.model.num_depths + 1).tolist()
            for d in range(1, len(counts)):
                self._depth_hist[d] += counts[d]
        return logits, depths, decision

    # --- bookkeeping ------------------------------------------------------------------
    def reset_stats(self) -> None:
        """Zero the counters of :meth:`stats` (the latency model keeps what it learned)."""
        with getattr(self, "_lock", threading.RLock()):
            self._decisions = self._misses = self._runs = self._samples = 0
            self._decide_ms = self._run_ms = 0.0
            self._chosen: Dict[str, int] = {}
            self._depth_hist: Dict[int, int] = {d: 0 for d in range(1, self.model.num_depths + 1)}

    def stats(self) -> Dict[str, Any]:
        """Counters since the last :meth:`reset_stats`.

        Keys: ``decisions``, ``misses`` (no option fit), ``miss_rate``, ``options`` (decisions per
        option), ``depth_histogram`` (samples run per depth, early exits at the depth they left),
        ``runs``, ``samples``, ``mean_decide_ms``, ``mean_run_ms``, ``decide_overhead`` (mean decide
        time / mean run time), ``global_factor`` and ``margin`` of the latency model.
        """
        with self._lock:
            mean_decide = self._decide_ms / self._decisions if self._decisions else 0.0
            mean_run = self._run_ms / self._runs if self._runs else 0.0
            return {
                "decisions": self._decisions,
                "misses": self._misses,
                "miss_rate": self._misses / self._decisions if self._decisions else 0.0,
                "options": dict(self._chosen),
                "depth_histogram": dict(self._depth_hist),
                "runs": self._runs,
                "samples": self._samples,
                "mean_decide_ms": mean_decide,
                "mean_run_ms": mean_run,
                "decide_overhead": mean_decide / mean_run if mean_run else 0.0,
                "global_factor": self.latency.global_factor,
                "margin": self.latency.margin,
            }
