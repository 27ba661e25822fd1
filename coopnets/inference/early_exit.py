"""Early exit on a batch that really saves compute: per-sample exits with batch compaction.

:class:`EarlyExit` runs a depth-adaptive model (``exits`` plan) exit point by exit point
(stage by stage, or block by block with ``exit_points="blocks"``) through the plan's
resumable :class:`~coopnets.models.runners.Runner`: the hand-written stage layout when
the family has one, else generic segments cut from the backbone's traced graph at the
exits (every live value, skip connections included, is compacted). After each stage
it evaluates that stage's exit head; the samples whose exit meets the criterion leave with those logits,
and only the remaining samples (``index_select`` on the batch dimension) run the next
stages. The last depth (the backbone's own head) takes whatever is left.

Criteria (one threshold per exit head, or one for all):

``confidence``
    leave when the max softmax probability is **greater than** the threshold, in
    ``[0, 1]`` (SDN, MSDNet). ``1`` means "never leave here".
``entropy``
    leave when the softmax entropy (nats) is **less than** the threshold, ``>= 0``.
    ``0`` means "never leave here".
``patience``
    leave when the prediction has stayed the same for ``threshold`` consecutive exits
    (PABEE / SDN patience): with patience ``p`` a sample leaves at the first exit
    whose argmax equals the argmax of the ``p`` exits before it. An int ``>= 1``.

:func:`simulate` applies the same policy to the logits of every exit (from
:meth:`~coopnets.DepthAdaptiveModel.forward_exits`), the way most early-exit papers
evaluate; :class:`EarlyExit` gives the same predictions and exit depths while running
only what each sample needs.

FLOPs are accounted per sample: a sample leaving at depth ``d`` costs the stem, the
stage segments up to ``d`` and every exit head it was evaluated at (``1..d``). The cost
of each segment and head is measured once per input size with
``torch.utils.flop_counter`` on one sample and cached. :meth:`EarlyExit.depth_latency` is
the same account in milliseconds measured on this machine for a batch size
(:meth:`EarlyExit.leave_at`: a batch whose samples all leave at one depth), which is what
latency budgets fit on: on a CPU the shallow depths and the exit heads cost a larger
share of the time than of the FLOPs.

Example:
    >>> import torch, coopnets
    >>> m = coopnets.create_model("coop_resnet18", num_classes=10).eval()
    >>> ee = coopnets.EarlyExit(m, criterion="confidence", threshold=0.2)
    >>> out = ee(torch.randn(4, 3, 64, 64))
    >>> out.logits.shape, out.exit_depths.shape
    (torch.Size([4, 10]), torch.Size([4]))
    >>> bool(out.total_flops <= 4 * out.depth_flops[-1])
    True
    >>> sim = ee.simulate(m.forward_exits(torch.randn(4, 3, 64, 64)))
    >>> sim.exit_depths.shape
    torch.Size([4])
"""
from __future__ import annotations

import math
import statistics
import time
import warnings
from dataclasses import dataclass
from numbers import Integral, Real
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..models.runners import Runner

CRITERIA = ("confidence", "entropy", "patience")
Threshold = Union[float, int, Sequence[Union[float, int]]]
State = Tuple[torch.Tensor, torch.Tensor]  # (previous prediction, run length), for patience

if TYPE_CHECKING:
    from ..models.depth_adaptive import DepthAdaptiveModel


def check_thresholds(criterion: str, threshold: Threshold, num_exits: int) -> List[float]:
    """Validate ``threshold`` for ``criterion`` and expand it to one value per exit head.

    Raises:
        ValueError: unknown criterion, wrong number of per-exit thresholds, or a value
            out of range (confidence in [0, 1], entropy >= 0, patience an int >= 1).

    Example:
        >>> check_thresholds("confidence", 0.9, 3)
        [0.9, 0.9, 0.9]
        >>> check_thresholds("patience", [1, 2], 2)
        [1, 2]
    """
    if criterion not in CRITERIA:
        raise ValueError(f"Unknown early-exit criterion {criterion!r}; valid criteria: {', '.join(CRITERIA)}.")
    if isinstance(threshold, (str, bytes)):  # a string is one (wrong) value, not a sequence of per-exit ones
        raise ValueError(f"Invalid {criterion} threshold {threshold!r}: a threshold is a number, not a string "
                         f"(e.g. threshold={_example(criterion)}), or a list of one number per exit head.")
    values = list(threshold) if isinstance(threshold, Sequence) else [threshold] * num_exits
    if len(values) != num_exits:
        raise ValueError(
            f"Got {len(values)} per-exit thresholds, but the model has {num_exits} exit heads "
            f"before its final depth: pass one threshold or exactly {num_exits}."
        )
    for v in values:
        if criterion == "patience":
            ok = isinstance(v, Integral) and not isinstance(v, bool) and v >= 1
            rule = "an int >= 1 (consecutive exits with an unchanged prediction)"
        elif criterion == "confidence":
            ok = isinstance(v, Real) and 0.0 <= v <= 1.0
            rule = "a max-softmax probability in [0, 1]"
        else:
            ok = isinstance(v, Real) and v >= 0.0 and not math.isnan(v)
            rule = "an entropy in nats >= 0"
        if not ok:
            raise ValueError(f"Invalid {criterion} threshold {v!r}: each must be {rule}.")
    return values


def check_measurement(batch_size: int, repeats: int, warmup: int = 0) -> None:
    """Refuse a latency measurement that cannot run: ``batch_size`` and ``repeats`` must be ints >= 1,
    ``warmup`` an int >= 0 (one-line ``ValueError``).

    Example:
        >>> check_measurement(8, repeats=0)
        Traceback (most recent call last):
            ...
        ValueError: repeats must be an int >= 1, got 0.
    """
    for name, value, least in (("batch_size", batch_size, 1), ("repeats", repeats, 1), ("warmup", warmup, 0)):
        if not isinstance(value, Integral) or isinstance(value, bool) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}.")


def _example(criterion: str) -> str:
    return {"confidence": "0.9", "entropy": "0.5", "patience": "2"}.get(criterion, "0.9")


def confidence_score(logits: torch.Tensor, criterion: str) -> torch.Tensor:
    """Per-sample score that grows with confidence: max softmax (``confidence``) or minus entropy (``entropy``)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    if criterion == "confidence":
        return logp.max(dim=-1).values.exp()
    if criterion == "entropy":
        return (logp.exp() * logp).sum(dim=-1)
    raise ValueError(f"Criterion {criterion!r} has no confidence score; use 'confidence' or 'entropy'.")


class ExitPolicy:
    """The exit decision of one criterion with per-exit thresholds, shared by the real run and :func:`simulate`."""

    def __init__(self, criterion: str, threshold: Threshold, num_exits: int) -> None:
        self.criterion = criterion
        self.thresholds = check_thresholds(criterion, threshold, num_exits)

    def start(self, n: int, device: torch.device) -> State:
        """Per-sample state before the first exit."""
        return torch.full((n,), -1, dtype=torch.long, device=device), torch.zeros(n, dtype=torch.long, device=device)

    def decide(self, logits: torch.Tensor, exit_index: int, state: State) -> Tuple[torch.Tensor, State]:
        """Boolean mask of the samples that leave at exit head ``exit_index`` (0-based), and the new state."""
        t = self.thresholds[exit_index]
        pred, run = state
        if self.criterion == "patience":
            new_pred = logits.argmax(dim=-1)
            run = torch.where(new_pred == pred, run + 1, torch.zeros_like(run))
            return run >= t, (new_pred, run)
        if self.criterion == "confidence":
            return confidence_score(logits, "confidence") > t, state
        return confidence_score(logits, "entropy") > -t, state


@dataclass
class EarlyExitResult:
    """What an early-exit pass (real or simulated) produced, in the batch's original order.

    Attributes:
        logits: (N, C) logits of the exit each sample left at.
        exit_depths: (N,) depth each sample left at, 1..num_depths.
        flops: (N,) FLOPs spent on each sample (``None`` when simulated without costs).
        depth_flops: FLOPs of one sample leaving at each depth (empty when unknown).
    """

    logits: torch.Tensor
    exit_depths: torch.Tensor
    flops: Optional[torch.Tensor]
    depth_flops: List[int]

    @property
    def predictions(self) -> torch.Tensor:
        return self.logits.argmax(dim=-1)

    @property
    def total_flops(self) -> int:
        """FLOPs spent on the whole batch."""
        if self.flops is None:
            raise ValueError("No FLOPs: simulate() was called without depth_flops.")
        return int(self.flops.sum())

    @property
    def flops_saving(self) -> float:
        """Full-depth FLOPs of the batch divided by the FLOPs spent (2.0 = half the compute; 1.0 for an
        empty batch: nothing was run, so nothing was saved)."""
        if len(self.exit_depths) == 0:
            return 1.0
        return len(self.exit_depths) * self.depth_flops[-1] / self.total_flops

    def exit_fractions(self) -> List[float]:
        """Share of the batch that left at each depth, shallowest first (all 0 for an empty batch)."""
        n = len(self.exit_depths)
        minlength = len(self.depth_flops) or (int(self.exit_depths.max()) if n else 0)
        counts = torch.bincount(self.exit_depths - 1, minlength=minlength)
        return (counts.float() / max(n, 1)).tolist()


def simulate(
    all_logits: Sequence[torch.Tensor],
    criterion: str = "confidence",
    threshold: Threshold = 0.9,
    depth_flops: Optional[Sequence[int]] = None,
) -> EarlyExitResult:
    """Apply an early-exit policy to the logits of every depth (shallowest first).

    Nothing is saved here (all exits were computed); this is the reference the real
    :class:`EarlyExit` pass must match, and what calibration uses.

    Example:
        >>> import torch
        >>> confident, flat = torch.tensor([[9.0, 0.0]]), torch.tensor([[0.0, 0.0]])
        >>> simulate([confident, flat], "confidence", 0.9).exit_depths.tolist()
        [1]
        >>> simulate([flat, confident], "confidence", 0.9).exit_depths.tolist()
        [2]
    """
    if len(all_logits) < 2:
        raise ValueError(f"simulate needs the logits of at least 2 depths, got {len(all_logits)}.")
    policy = ExitPolicy(criterion, threshold, len(all_logits) - 1)
    n = all_logits[0].shape[0]
    device = all_logits[0].device
    depths = torch.full((n,), len(all_logits), dtype=torch.long, device=device)
    state = policy.start(n, device)
    for k, logits in enumerate(all_logits[:-1]):
        leave, state = policy.decide(logits, k, state)
        depths = torch.where(leave & (depths == len(all_logits)), torch.full_like(depths, k + 1), depths)
    stacked = torch.stack(list(all_logits))  # (D, N, C)
    logits = stacked[depths - 1, torch.arange(n, device=device)]
    costs = list(depth_flops or [])
    flops = torch.tensor(costs, dtype=torch.long, device=device)[depths - 1] if costs else None
    return EarlyExitResult(logits=logits, exit_depths=depths, flops=flops, depth_flops=costs)


#: a normalised image stays within a few units of 0; more than this is raw pixels (0..255)
_RAW_PIXELS = 20.0


def _data_cfg(model: "DepthAdaptiveModel", key: str) -> str:
    value = getattr(model, "pretrained_cfg", {}).get(key)
    return "as in its pretrained_cfg" if value is None else str(tuple(round(float(v), 3) for v in value))


class _PhaseClock:
    """Seconds per phase of an early-exit pass, added to ``timings`` (nothing is timed without it).

    On a GPU each lap waits for the device first, so a phase is charged its kernels, not their launch.
    """

    def __init__(self, timings: Optional[Dict[str, float]], device: torch.device) -> None:
        self.timings = timings
        self.sync = torch.cuda.synchronize if timings is not None and device.type == "cuda" else None
        self.last = time.perf_counter() if timings is not None else 0.0

    def lap(self, phase: str) -> None:
        """Charge the time since the previous lap to ``phase``."""
        if self.timings is not None:
            if self.sync is not None:
                self.sync()
            now = time.perf_counter()
            self.timings[phase] = self.timings.get(phase, 0.0) + now - self.last
            self.last = now


class EarlyExit:
    """Batched early exit with compaction for a depth-adaptive model (``exits`` plan).

    It drives the plan's resumable runner (:meth:`coopnets.models.plans.DepthPlan.early_exit_runner`):
    the model's own stage-layout runner for the families that have one (ResNet, ConvNeXt,
    EfficientNet, MobileNetV3, RegNet, ViT, Swin), else the backbone's traced segments
    (:mod:`coopnets.models.runners.segments`), which the plan builds once per input size
    (once for all sizes when the trace is shape-agnostic) and keeps. The per-step FLOPs
    are cached on that runner too, so a second ``EarlyExit`` of the same model traces and
    counts nothing again.

    Args:
        model: a :class:`~coopnets.DepthAdaptiveModel` with ``plan="exits"``.
        criterion: ``"confidence"``, ``"entropy"`` or ``"patience"``.
        threshold: one threshold for every exit head, or one per exit head
            (``model.num_depths - 1`` values).
        image_size: (C, H, W) the runner is built and checked for at construction
            (default: the model's :attr:`~coopnets.DepthAdaptiveModel.default_input_size`).

    Raises:
        ValueError: the model's plan cannot leave early, or it has no stage layout and its
            backbone cannot be cut into segments (the sentence says why). A call refuses a
            model in training mode (BatchNorm would normalise with the statistics of whichever
            samples are still in the batch: call ``model.eval()``) and an input that is not
            float images (``uint8`` pixels: convert and normalise them as the model was
            trained, ``timm.data.resolve_data_config(model=m)`` + ``create_transform``); an
            empty batch gives an empty result. Float input far outside the normalised range
            (pixel values 0..255) runs, with a warning.

    Example:
        >>> import torch, coopnets
        >>> m = coopnets.create_model("coop_resnet18", num_classes=10).eval()
        >>> out = coopnets.EarlyExit(m, "patience", threshold=1)(torch.randn(2, 3, 64, 64))
        >>> bool((out.exit_depths >= 2).all())  # patience 1 needs two agreeing exits
        True
        >>> empty = coopnets.EarlyExit(m, "confidence", 0.5)(torch.randn(0, 3, 64, 64))
        >>> tuple(empty.logits.shape), empty.total_flops, empty.flops_saving
        ((0, 10), 0, 1.0)
    """

    def __init__(
        self,
        model: DepthAdaptiveModel,
        criterion: str = "confidence",
        threshold: Threshold = 0.9,
        image_size: Optional[Sequence[int]] = None,
    ) -> None:
        self.model = model
        self.policy = ExitPolicy(criterion, threshold, model.num_depths - 1)
        self.runner(image_size or model.default_input_size)

    @property
    def criterion(self) -> str:
        return self.policy.criterion

    @property
    def thresholds(self) -> List[float]:
        return list(self.policy.thresholds)

    def runner(self, image_size: Sequence[int]) -> Runner:
        """The runner that takes the backbone exit by exit for images of ``image_size`` (C, H, W)."""
        return self.model.depth_plan.early_exit_runner(image_size)

    # --- cost accounting ----------------------------------------------------------
    def step_flops(self, image_size: Sequence[int]) -> List[int]:
        """FLOPs of one sample per step: ``[start, segment 1, head 1, ..., segment K-1, head K-1, final]``
        (:meth:`coopnets.models.runners.Runner.step_flops`, cached on the runner). With traced segments
        the stem is part of segment 1 (``start`` is 0)."""
        return self.runner(image_size).step_flops(image_size, self.model.exits)

    def depth_flops(self, image_size: Sequence[int]) -> List[int]:
        """FLOPs of one sample that leaves at depth ``1..num_depths`` (heads evaluated on the way included)."""
        return self.runner(image_size).depth_flops(image_size, self.model.exits)

    def step_latency(self, image_size: Sequence[int], batch_size: int = 1, repeats: int = 10,
                     warmup: int = 2) -> List[float]:
        """Measured milliseconds per step for a batch of ``batch_size`` random images of ``image_size``
        (C, H, W) on the model's device: ``[start, advance 0, head 0, ..., advance K-1, head K-1, finish]``
        like :meth:`step_flops`. Each step's median over ``repeats`` full passes of :meth:`leave_at`
        (after ``warmup`` untimed ones), every step timed inside the same pass.

        Raises:
            ValueError: ``batch_size`` or ``repeats`` below 1, or ``warmup`` below 0.
        """
        check_measurement(batch_size, repeats, warmup)
        x = torch.randn(batch_size, *image_size, device=next(self.model.parameters()).device)
        full = self.model.num_depths
        for _ in range(warmup):
            self.leave_at(x, full)
        passes: List[Dict[str, float]] = []
        for _ in range(repeats):
            passes.append({})
            self.leave_at(x, full, timings=passes[-1])
        return [1e3 * statistics.median(p[step] for p in passes) for step in passes[0]]

    def depth_latency(self, image_size: Sequence[int], batch_size: int = 1, repeats: int = 10,
                      warmup: int = 2) -> List[float]:
        """Measured milliseconds of a batch of ``batch_size`` whose samples all leave at depth
        ``1..num_depths``: the backbone to that exit and every exit head on the way, on this machine
        (:meth:`step_latency` summed per depth as :meth:`depth_flops` sums FLOPs; no exit decision or
        compaction, which a real pass adds).

        Example:
            >>> import coopnets
            >>> m = coopnets.wrap("test_resnet", num_classes=3).eval()
            >>> ms = coopnets.EarlyExit(m).depth_latency((3, 32, 32), batch_size=4, repeats=3)
            >>> len(ms) == m.num_depths and ms == sorted(ms)
            True
        """
        return Runner.depth_totals(self.step_latency(image_size, batch_size, repeats, warmup))

    @torch.inference_mode()
    def leave_at(self, x: torch.Tensor, depth: int, timings: Optional[Dict[str, float]] = None) -> torch.Tensor:
        """Every sample of ``x`` leaves at ``depth``: its logits there, at the cost a sample leaving there
        pays under early exit (the runner to that exit and every exit head on the way, or the whole backbone
        after every exit head at full depth), without exit decisions or compaction. The same as a call with
        thresholds that make every sample leave at ``depth``, less the decisions.

        ``timings``, when given, is filled with the seconds of each step (``start``, ``advance k``,
        ``head k``, ``finish``), in the order they ran.

        Example:
            >>> import torch, coopnets
            >>> m = coopnets.wrap("test_resnet", num_classes=3).eval()
            >>> x = torch.randn(2, 3, 32, 32)
            >>> torch.allclose(coopnets.EarlyExit(m).leave_at(x, 2), m.forward_depth(x, 2), atol=1e-5)
            True
        """
        model = self.model
        if not isinstance(depth, Integral) or isinstance(depth, bool) or not 1 <= depth <= model.num_depths:
            raise ValueError(f"depth must be an int in [1, {model.num_depths}], got {depth!r}.")
        self.check_call(x)
        runner = self.runner(x.shape[1:])
        clock = _PhaseClock(timings, x.device)
        env = runner.start(x)
        clock.lap("start")
        for k in range(min(depth, model.num_depths - 1)):
            env, feature = runner.advance(env, k)
            clock.lap(f"advance {k}")
            logits = model.exits[k](feature)
            clock.lap(f"head {k}")
        if depth == model.num_depths:
            logits = runner.finish(env)
            clock.lap("finish")
        return logits

    # --- the real pass ------------------------------------------------------------
    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, timings: Optional[Dict[str, float]] = None) -> EarlyExitResult:
        """Run the batch ``x`` with per-sample early exit and compaction.

        ``timings``, when given, is filled with the seconds spent per phase (``backbone``:
        the runner's start/advance/finish, ``heads``, ``decide``, ``compact``), for
        benchmarks that ask where the time goes.
        """
        model = self.model
        self.check_call(x)
        n, num_exits = x.shape[0], model.num_depths - 1
        runner = self.runner(x.shape[1:])
        costs = runner.depth_flops(x.shape[1:], model.exits)
        if n == 0:  # nothing to run: an empty result of the right shapes
            none = torch.zeros(0, dtype=torch.long, device=x.device)
            return EarlyExitResult(logits=x.new_empty(0, model.num_classes), exit_depths=none, flops=none.clone(),
                                   depth_flops=costs)
        clock = _PhaseClock(timings, x.device)
        out: Optional[torch.Tensor] = None
        depths = torch.full((n,), model.num_depths, dtype=torch.long, device=x.device)
        alive = torch.arange(n, device=x.device)  # original index of every row still running
        state = self.policy.start(n, x.device)
        env = runner.start(x)
        for k in range(num_exits):
            env, feature = runner.advance(env, k)
            clock.lap("backbone")
            logits = model.exits[k](feature)
            clock.lap("heads")
            if out is None:
                out = logits.new_empty(n, logits.shape[1])
            leave, state = self.policy.decide(logits, k, state)
            gone = leave.nonzero().squeeze(1)
            if gone.numel():
                out[alive[gone]] = logits[gone]
                depths[alive[gone]] = k + 1
                if gone.numel() == alive.numel():
                    alive = alive[:0]
                    clock.lap("decide")
                    break
                keep = (~leave).nonzero().squeeze(1)
                alive = alive[keep]
                clock.lap("decide")
                state = (state[0].index_select(0, keep), state[1].index_select(0, keep))
                env = runner.compact(env, keep)
                clock.lap("compact")
            else:
                clock.lap("decide")
        if alive.numel():
            logits = runner.finish(env)
            if out is None:
                out = logits.new_empty(n, logits.shape[1])
            out[alive] = logits
            clock.lap("backbone")
        flops = torch.tensor(costs, dtype=torch.long, device=x.device)[depths - 1]
        return EarlyExitResult(logits=out, exit_depths=depths, flops=flops, depth_flops=costs)

    def check_call(self, x: torch.Tensor) -> None:
        """Refuse what would give wrong answers deep inside the network (see the class's ``Raises``)."""
        model = self.model
        if model.training:
            raise ValueError("EarlyExit needs the model in eval mode (model.eval()): in training mode BatchNorm would "
                             "normalise with the statistics of the samples still in the batch and Dropout would drop.")
        model.check_input(x)  # shape, and float images (uint8 pixels are refused there)
        if x.numel() and float(x.detach().abs().amax()) > _RAW_PIXELS:
            warnings.warn(f"EarlyExit input reaches {float(x.detach().abs().amax()):.4g}: the model was trained on "
                          f"normalised images (mean {_data_cfg(model, 'mean')}, std {_data_cfg(model, 'std')}, values "
                          f"within a few units of 0), so raw 0..255 pixels give meaningless predictions and exits.",
                          UserWarning, stacklevel=3)

    def simulate(self, all_logits: Sequence[torch.Tensor], image_size: Optional[Sequence[int]] = None) -> EarlyExitResult:
        """This policy applied to every depth's logits (see :func:`simulate`); FLOPs when ``image_size`` (C, H, W) is given."""
        costs = self.depth_flops(image_size) if image_size is not None else None
        return simulate(all_logits, self.criterion, self.policy.thresholds, costs)
