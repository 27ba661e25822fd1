"""Early exit on a batch that really saves compute: per-sample exits with batch compaction.

:class:`EarlyExit` runs a depth-adaptive model (``exits`` plan) exit point by exit point
(stage by stage, or block by block with ``exit_points="blocks"``) through its
hand-written :class:`~coopnets.models.layouts.StageLayout` when the family has one,
else through generic segments cut from the backbone's traced graph at the exits
(:mod:`coopnets.models.segments`; every live value, skip connections included, is
compacted). After each stage it evaluates that
stage's exit head; the samples whose exit meets the criterion leave with those logits,
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
``torch.utils.flop_counter`` on one sample and cached.

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
from dataclasses import dataclass
from numbers import Integral, Real
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..models.layouts import LAYOUT_FAMILIES, Position, StageLayout, get_layout
from ..models.plans import ExitsPlan
from ..models.segments import build_segments

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
        """Full-depth FLOPs of the batch divided by the FLOPs spent (2.0 = half the compute)."""
        return len(self.exit_depths) * self.depth_flops[-1] / self.total_flops

    def exit_fractions(self) -> List[float]:
        """Share of the batch that left at each depth, shallowest first."""
        counts = torch.bincount(self.exit_depths - 1, minlength=len(self.depth_flops) or int(self.exit_depths.max()))
        return (counts.float() / len(self.exit_depths)).tolist()


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


class _LayoutRunner:
    """The hand-written :class:`~coopnets.models.layouts.StageLayout` path (fast, any image size),
    with the interface of :class:`~coopnets.models.segments.SegmentRunner`."""

    size_specific = False

    def __init__(self, model: DepthAdaptiveModel, layout: StageLayout) -> None:
        self.model, self.layout = model, layout
        positions = model.depth_plan.exit_positions(layout)  # feature ends, or block ends with exit_points="blocks"
        if None in positions:
            raise ValueError(
                f"Exit at feature_info index {model.exit_indices[positions.index(None)]} reads the stem output; "
                f"early exit supports exits placed after a stage block (exit_indices >= 1)."
            )
        self.stops: List[Position] = positions

    def start(self, x: torch.Tensor) -> dict:
        return {"h": self.layout.stem(x), "start": (0, 0), "hw": tuple(x.shape[-2:])}

    def advance(self, env: dict, k: int) -> Tuple[dict, torch.Tensor]:
        stop = self.stops[k]
        h = self.layout.run(env["h"], env["start"], stop)
        return {"h": h, "start": stop, "hw": env["hw"]}, self.layout.to_nchw(h, env["hw"])

    def finish(self, env: dict) -> torch.Tensor:
        layout = self.layout
        return self.model.backbone.forward_head(layout.finish(layout.run(env["h"], env["start"], layout.end)))

    def compact(self, env: dict, keep: torch.Tensor) -> dict:
        return dict(env, h=env["h"].index_select(0, keep))


class EarlyExit:
    """Batched early exit with compaction for a depth-adaptive model (``exits`` plan).

    Backbones with a hand-written stage layout (ResNet, ConvNeXt, EfficientNet,
    MobileNetV3, RegNet, ViT, Swin) run through it; every other backbone runs through
    generic segments cut from its traced graph at the exits
    (:func:`~coopnets.models.segments.build_segments`), built at construction for
    ``image_size`` and, when the trace fixed the spatial size, again for each new size.

    Args:
        model: a :class:`~coopnets.DepthAdaptiveModel` with ``plan="exits"``.
        criterion: ``"confidence"``, ``"entropy"`` or ``"patience"``.
        threshold: one threshold for every exit head, or one per exit head
            (``model.num_depths - 1`` values).
        image_size: (C, H, W) the segments are built and checked at (default: the
            model's ``input_size``); unused with a stage layout.

    Raises:
        ValueError: the model is not an ``exits``-plan model, or it has no stage layout
            and its backbone cannot be cut into segments (the sentence says why).

    Example:
        >>> import torch, coopnets
        >>> m = coopnets.create_model("coop_resnet18", num_classes=10).eval()
        >>> out = coopnets.EarlyExit(m, "patience", threshold=1)(torch.randn(2, 3, 64, 64))
        >>> bool((out.exit_depths >= 2).all())  # patience 1 needs two agreeing exits
        True
    """

    def __init__(
        self,
        model: DepthAdaptiveModel,
        criterion: str = "confidence",
        threshold: Threshold = 0.9,
        image_size: Optional[Sequence[int]] = None,
    ) -> None:
        if not isinstance(model.depth_plan, ExitsPlan):
            raise ValueError(
                f"Early exit needs plan='exits' (an exit head after each stage); this model uses "
                f"plan={model.plan!r}, whose depths all run every stage, so leaving early saves nothing."
            )
        self.model = model
        self.policy = ExitPolicy(criterion, threshold, model.num_depths - 1)
        self._costs: Dict[Tuple[int, ...], List[int]] = {}
        self._runners: Dict[Tuple[int, ...], object] = {}
        try:
            layout = get_layout(model.backbone)
        except NotImplementedError:
            layout = None
        self.layout = layout
        if layout is not None:
            self._layout_runner: Optional[_LayoutRunner] = _LayoutRunner(model, layout)
        else:
            self._layout_runner = None
            size = tuple(image_size or model.pretrained_cfg.get("input_size", (model.in_chans, 224, 224)))
            self.runner(size)

    @property
    def criterion(self) -> str:
        return self.policy.criterion

    @property
    def thresholds(self) -> List[float]:
        return list(self.policy.thresholds)

    @property
    def uses_layout(self) -> bool:
        """True when the hand-written stage layout runs the model (else generic traced segments)."""
        return self._layout_runner is not None

    def runner(self, image_size: Sequence[int]):
        """What runs the backbone exit by exit for images of ``image_size`` (C, H, W)."""
        if self._layout_runner is not None:
            return self._layout_runner
        key = tuple(int(s) for s in image_size)
        if key not in self._runners:
            reusable = [r for r in self._runners.values() if not r.size_specific]
            if reusable:
                self._runners[key] = reusable[0]
            else:
                try:
                    self._runners[key] = build_segments(self.model, key)
                except ValueError as err:
                    raise ValueError(
                        f"Early exit with compaction cannot run {self.model.backbone_name}: it has no hand-written "
                        f"stage layout ({', '.join(LAYOUT_FAMILIES)}) and {err} Evaluate the policy without the "
                        f"savings with EarlyExit.simulate(model.forward_exits(x)) or coopnets.inference.simulate."
                    ) from None
        return self._runners[key]

    # --- cost accounting ----------------------------------------------------------
    def step_flops(self, image_size: Sequence[int]) -> List[int]:
        """FLOPs of one sample per step: ``[stem, segment 1, head 1, ..., segment K-1, head K-1, final]``.

        The final step runs the last stages, the final norm and the backbone's own
        head. With generic segments the stem is part of segment 1 (``stem`` is 0).
        Measured once per ``(C, H, W)`` and cached.
        """
        key = tuple(int(s) for s in image_size)
        if key not in self._costs:
            runner, model = self.runner(key), self.model
            steps: List[int] = []

            def count(fn, *args):
                with FlopCounterMode(display=False) as counter:
                    result = fn(*args)
                steps.append(int(counter.get_total_flops()))
                return result

            with torch.inference_mode():
                env = count(runner.start, torch.zeros(1, *key, device=next(model.parameters()).device))
                for k in range(model.num_depths - 1):
                    env, feature = count(runner.advance, env, k)
                    count(model.exits[k], feature)
                count(runner.finish, env)
            self._costs[key] = steps
        return list(self._costs[key])

    def depth_flops(self, image_size: Sequence[int]) -> List[int]:
        """FLOPs of one sample that leaves at depth ``1..num_depths`` (heads evaluated on the way included)."""
        steps = self.step_flops(image_size)
        return [sum(steps[: 1 + 2 * d]) for d in range(1, self.model.num_depths)] + [sum(steps)]

    # --- the real pass ------------------------------------------------------------
    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> EarlyExitResult:
        """Run the batch ``x`` with per-sample early exit and compaction."""
        model = self.model
        model.check_input(x)
        n = x.shape[0]
        runner = self.runner(x.shape[1:])
        costs = self.depth_flops(x.shape[1:])
        out: Optional[torch.Tensor] = None
        depths = torch.full((n,), model.num_depths, dtype=torch.long, device=x.device)
        alive = torch.arange(n, device=x.device)  # original index of every row still running
        state = self.policy.start(n, x.device)
        env = runner.start(x)
        for k in range(model.num_depths - 1):
            env, feature = runner.advance(env, k)
            logits = model.exits[k](feature)
            if out is None:
                out = logits.new_empty(n, logits.shape[1])
            leave, state = self.policy.decide(logits, k, state)
            if leave.any():
                out[alive[leave]] = logits[leave]
                depths[alive[leave]] = k + 1
                keep = (~leave).nonzero().squeeze(1)
                alive = alive[keep]
                state = (state[0].index_select(0, keep), state[1].index_select(0, keep))
                if alive.numel() == 0:
                    break
                env = runner.compact(env, keep)
        if alive.numel():
            logits = runner.finish(env)
            if out is None:
                out = logits.new_empty(n, logits.shape[1])
            out[alive] = logits
        flops = torch.tensor(costs, dtype=torch.long, device=x.device)[depths - 1]
        return EarlyExitResult(logits=out, exit_depths=depths, flops=flops, depth_flops=costs)

    def simulate(self, all_logits: Sequence[torch.Tensor], image_size: Optional[Sequence[int]] = None) -> EarlyExitResult:
        """This policy applied to every depth's logits (see :func:`simulate`); FLOPs when ``image_size`` (C, H, W) is given."""
        costs = self.depth_flops(image_size) if image_size is not None else None
        return simulate(all_logits, self.criterion, self.policy.thresholds, costs)
