"""Compute budgets: early-exit thresholds for a FLOPs or a milliseconds budget, a fixed depth for a latency budget.

**Early-exit budgets (MSDNet budgeted batch).** :func:`calibrate` runs every exit on
held-out data once, then fits one threshold per exit head so that a *geometric* share of
the samples leaves at each depth: ``P(leave at depth d) = q^d / sum_j q^j``. The ratio
``q`` is solved by bisection so that the expected cost, under the model's real cost of
leaving at each depth, equals the budget; exit ``d``'s threshold is then the score that
lets exactly that many of the still-running samples leave. The cost of leaving at depth
``d`` always includes every exit head the sample was evaluated at (``1..d``), in one of
two units:

* ``target_flops``: FLOPs per sample (:meth:`EarlyExit.depth_flops`). It does not depend
  on the machine, and on a CPU that is what it misses: the shallow depths take a larger
  share of the latency than of the FLOPs (at batch 8 on one core, depth 1 of ResNet-50,
  MobileNetV3-L and EfficientNet-B0 takes 0.36-0.59 of the full-depth latency for 0.19-0.20
  of its FLOPs: early stages move large activations for few FLOPs per byte), and the exit
  heads, small kernels on small maps, cost more time than their FLOPs; so a FLOPs budget
  promises a larger saving than the clock shows (``benchmarks/results/latency_zoo.md``).
* ``target_ms``: milliseconds per batch of ``batch_size`` images on this machine
  (:meth:`EarlyExit.depth_latency`: a batch whose samples all leave at depth ``d``, timed
  through the same runner the early-exit pass uses, at the calibration images' size). The
  expected cost ``sum_d P(d) ms_d`` leaves out the exit decisions and the compaction, which
  the real pass adds.

The result (:class:`Calibration`) names its unit and reports the thresholds, the costs
they were fitted on, what they spend on that data (and their FLOPs) and the accuracy
there. :func:`budget_curve` does this for several budgets from one pass.

**Latency budget for one depth.** :func:`depth_for_latency` measures the depths deepest
first on this machine (with :func:`coopnets.inference.profiler.measure_latency`) and returns
the deepest whose median latency fits; :func:`set_depth_for_budget` applies it.

Example:
    >>> import torch, coopnets
    >>> m = coopnets.create_model("coop_resnet18", num_classes=10).eval()
    >>> data = [(torch.randn(8, 3, 64, 64), torch.randint(0, 10, (8,))) for _ in range(2)]
    >>> ee = coopnets.EarlyExit(m)
    >>> full = ee.depth_flops((3, 64, 64))[-1]
    >>> cal = coopnets.calibrate(m, data, target_flops=0.7 * full)
    >>> len(cal.thresholds) == m.num_depths - 1, cal.unit
    (True, 'flops')
    >>> bool(cal.expected_flops <= full)
    True
    >>> rows = coopnets.budget_curve(m, data, ms_ratios=(0.8, 1.0), batch_size=8, repeats=3)
    >>> [r.unit for r in rows], rows[-1].exit_fractions[-1]  # the full budget: everyone runs to the end
    (['ms', 'ms'], 1.0)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Real
from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from ..models._utils import eval_mode
from .early_exit import EarlyExit, EarlyExitResult, check_measurement, confidence_score, simulate
from .profiler import measure_latency

CALIBRATION_CRITERIA = ("confidence", "entropy")
#: the units of an early-exit budget, and what one cost in it measures
COST_UNITS: Dict[str, str] = {"flops": "FLOPs per sample", "ms": "ms per batch"}
#: :func:`budget_curve`'s budgets when none are given: fractions of the full-depth cost
DEFAULT_RATIOS = (0.4, 0.55, 0.7, 0.85, 1.0)

if TYPE_CHECKING:
    from ..models.depth_adaptive import DepthAdaptiveModel


@dataclass
class Calibration:
    """Thresholds fitted for one budget, and what they achieve on the calibration data.

    Attributes:
        criterion: ``confidence`` or ``entropy``.
        thresholds: one per exit head (pass to :class:`EarlyExit`).
        unit: what the budget and the costs are in: ``"flops"`` (FLOPs per sample) or ``"ms"``
            (milliseconds per batch of ``batch_size`` images, measured on this machine).
        target: the budget, in ``unit``.
        depth_costs: the cost of leaving at each depth (every exit head on the way included), in
            ``unit``: what the thresholds were fitted on.
        expected_cost: what the thresholds spend on the calibration data, in ``unit``
            (``sum_d exit_fractions[d] * depth_costs[d]``).
        expected_flops: FLOPs per sample the thresholds spend on the calibration data (any unit).
        full_flops: FLOPs per sample at full depth.
        accuracy: top-1 accuracy on the calibration data under these thresholds.
        exit_fractions: share of samples leaving at each depth.
        geometric_q: the solved ratio of the geometric exit distribution.
        batch_size: the batch size the costs were measured at (``unit == "ms"``), else None.
    """

    criterion: str
    thresholds: List[float]
    unit: str
    target: float
    depth_costs: List[float]
    expected_cost: float
    expected_flops: float
    full_flops: int
    accuracy: float
    exit_fractions: List[float] = field(default_factory=list)
    geometric_q: float = 1.0
    batch_size: Optional[int] = None

    def early_exit(self, model: DepthAdaptiveModel) -> EarlyExit:
        """An :class:`EarlyExit` of ``model`` with these thresholds."""
        return EarlyExit(model, self.criterion, self.thresholds)


def collect_exit_logits(
    model: DepthAdaptiveModel, loader: Iterable[Tuple[torch.Tensor, torch.Tensor]]
) -> Tuple[List[torch.Tensor], torch.Tensor, Tuple[int, ...]]:
    """Every depth's logits on ``loader`` (batches of ``(images, labels)``) from one shared pass per batch.

    Returns ``(logits per depth, labels, image size (C, H, W))``.
    """
    device = next(model.parameters()).device
    per_depth: List[List[torch.Tensor]] = []
    labels: List[torch.Tensor] = []
    image_size: Tuple[int, ...] = ()
    with eval_mode(model), torch.inference_mode():
        for x, y in loader:
            image_size = tuple(x.shape[1:])
            outs = model.forward_exits(x.to(device))
            per_depth = per_depth or [[] for _ in outs]
            for acc, out in zip(per_depth, outs):
                acc.append(out.float().cpu())
            labels.append(torch.as_tensor(y).cpu())
    if not labels:
        raise ValueError("The calibration loader yielded no batches.")
    return [torch.cat(a) for a in per_depth], torch.cat(labels), image_size


def geometric_exit_distribution(depth_costs: Sequence[float], target: float,
                                unit: str = "flops") -> Tuple[List[float], float]:
    """MSDNet's exit distribution ``p_d ~ q^d`` whose expected cost equals ``target``.

    ``depth_costs``: the cost of leaving at each depth, in ``unit`` (a key of :data:`COST_UNITS`,
    which only names the budget in the error). Returns ``(p_1..p_D, q)``. The expected cost grows
    with ``q``, so ``q`` is found by bisection on ``log q``.

    Raises:
        ValueError: ``target`` outside ``[depth_costs[0], depth_costs[-1]]`` (the message names that range).

    Example:
        >>> p, q = geometric_exit_distribution([1.0, 2.0, 3.0], 2.0)
        >>> [round(v, 3) for v in p], round(q, 3)
        ([0.333, 0.333, 0.333], 1.0)
    """
    lo_cost, hi_cost = float(depth_costs[0]), float(depth_costs[-1])
    if not lo_cost <= target <= hi_cost:
        raise ValueError(
            f"target_{unit}={target:.4g} is outside what early exit can spend ({COST_UNITS[unit]}): "
            f"[{lo_cost:.4g} (everyone leaves at depth 1), {hi_cost:.4g} (full depth)]."
        )

    def dist(log_q: float) -> List[float]:
        logits = torch.tensor([log_q * d for d in range(len(depth_costs))], dtype=torch.float64)
        return torch.softmax(logits, 0).tolist()

    def cost(log_q: float) -> float:
        return sum(p * c for p, c in zip(dist(log_q), depth_costs))

    lo, hi = -50.0, 50.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(mid) < target else (lo, mid)
    return dist((lo + hi) / 2), math.exp((lo + hi) / 2)


def _check_criterion(criterion: str) -> None:
    if criterion not in CALIBRATION_CRITERIA:
        raise ValueError(
            f"calibrate fits score thresholds; criterion must be one of {', '.join(CALIBRATION_CRITERIA)}, "
            f"got {criterion!r} (patience has integer thresholds: pick them directly)."
        )


def _check_budget(target_flops: Optional[float], target_ms: Optional[float]) -> Tuple[str, float]:
    """``(unit, budget)`` of the one budget given (one-line ``ValueError`` for none, both, or a bad value)."""
    given = [(unit, v) for unit, v in (("flops", target_flops), ("ms", target_ms)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"Give exactly one budget, target_flops ({COST_UNITS['flops']}) or target_ms "
                         f"({COST_UNITS['ms']} of batch_size images); got {'both' if given else 'neither'}.")
    unit, value = given[0]
    if not isinstance(value, Real) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"target_{unit} must be a number > 0 ({COST_UNITS[unit]}), got {value!r}.")
    return unit, float(value)


def depth_costs(model: DepthAdaptiveModel, image_size: Sequence[int]) -> List[int]:
    """FLOPs of one sample leaving at each depth under early exit (see :meth:`EarlyExit.depth_flops`)."""
    return EarlyExit(model).depth_flops(image_size)


def _measured_costs(model: DepthAdaptiveModel, image_size: Sequence[int], unit: str, batch_size: int,
                    repeats: int) -> Tuple[List[int], Optional[List[float]]]:
    """The FLOPs of leaving at each depth and, for ``unit == "ms"``, its latency measured here."""
    ee = EarlyExit(model)
    with eval_mode(model):
        ms = ee.depth_latency(image_size, batch_size, repeats) if unit == "ms" else None
    return ee.depth_flops(image_size), ms


def fit_thresholds(
    all_logits: Sequence[torch.Tensor],
    labels: torch.Tensor,
    depth_flops: Sequence[int],
    target: float,
    criterion: str = "confidence",
    *,
    depth_ms: Optional[Sequence[float]] = None,
    batch_size: Optional[int] = None,
) -> Calibration:
    """Fit per-exit thresholds on precomputed logits (see :func:`calibrate`).

    ``target`` is in FLOPs per sample, fitted on ``depth_flops``; or, with ``depth_ms`` (the
    milliseconds of a batch of ``batch_size`` leaving at each depth), in ms per batch, fitted on those.
    """
    _check_criterion(criterion)
    unit, costs = ("ms", list(depth_ms)) if depth_ms is not None else ("flops", list(depth_flops))
    probs, q = geometric_exit_distribution(costs, target, unit)
    n = len(labels)
    remaining = torch.ones(n, dtype=torch.bool)
    thresholds: List[float] = []
    for d, logits in enumerate(all_logits[:-1]):
        score = confidence_score(logits, criterion)
        quota = min(int(round(probs[d] * n)), int(remaining.sum()))
        candidates = score[remaining].sort(descending=True).values
        # samples leave when score > s: the (quota+1)-th best score lets `quota` leave (fewer on ties)
        if quota < len(candidates):
            s = candidates[quota].item()
        else:  # everyone left leaves: confidence > 0 and entropy < inf always hold
            s = 0.0 if criterion == "confidence" else -math.inf
        thresholds.append(s if criterion == "confidence" else -s)
        remaining &= ~(score > s)
    result: EarlyExitResult = simulate(all_logits, criterion, thresholds, depth_flops)
    fractions = result.exit_fractions()
    return Calibration(
        criterion=criterion,
        thresholds=thresholds,
        unit=unit,
        target=float(target),
        depth_costs=costs,
        expected_cost=sum(f * c for f, c in zip(fractions, costs)),
        expected_flops=result.total_flops / n,
        full_flops=int(depth_flops[-1]),
        accuracy=(result.predictions == labels).float().mean().item(),
        exit_fractions=fractions,
        geometric_q=q,
        batch_size=batch_size if unit == "ms" else None,
    )


def calibrate(
    model: DepthAdaptiveModel,
    val_loader: Iterable[Tuple[torch.Tensor, torch.Tensor]],
    target_flops: Optional[float] = None,
    criterion: str = "confidence",
    *,
    target_ms: Optional[float] = None,
    batch_size: int = 1,
    repeats: int = 10,
) -> Calibration:
    """Per-exit thresholds on held-out data so the expected cost meets one budget (see the module docstring).

    Args:
        model: an ``exits``-plan model with a stage layout (see :class:`EarlyExit`).
        val_loader: held-out batches of ``(images, labels)`` (all of one image size).
        target_flops: FLOPs budget per sample, between depth 1's and full depth's cost
            (``EarlyExit(model).depth_flops((C, H, W))``; exit heads on the way included).
            On a CPU it overstates the time saved: shallow depths and exit heads take a
            larger share of the latency than of the FLOPs; ``target_ms`` budgets the time.
        criterion: ``confidence`` or ``entropy``.
        target_ms: latency budget in milliseconds per batch of ``batch_size`` images on this
            machine, between depth 1's and full depth's measured cost
            (``EarlyExit(model).depth_latency((C, H, W), batch_size)``); give exactly one budget.
        batch_size: the batch size the latency costs are measured at (``target_ms`` only).
        repeats: timed passes per latency measurement (``target_ms`` only).

    Raises:
        ValueError: no budget or both, a budget outside what early exit can spend (the
            message names the range), ``criterion`` not ``confidence``/``entropy``, a bad
            ``batch_size``/``repeats``, or an empty loader.

    Example:
        >>> import torch, coopnets
        >>> m = coopnets.create_model("coop_resnet18", num_classes=10).eval()
        >>> data = [(torch.randn(8, 3, 64, 64), torch.randint(0, 10, (8,)))]
        >>> cal = coopnets.calibrate(m, data, target_flops=1e12)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        ValueError: target_flops=1e+12 is outside what early exit can spend (FLOPs per sample): [...].
        >>> tiny = coopnets.wrap("test_resnet", num_classes=3).eval()
        >>> small = [(torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,)))]
        >>> cal = coopnets.calibrate(tiny, small, target_ms=1e6, batch_size=8, repeats=2)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        ValueError: target_ms=1e+06 is outside what early exit can spend (ms per batch): [...].
    """
    _check_criterion(criterion)
    unit, target = _check_budget(target_flops, target_ms)
    check_measurement(batch_size, repeats)
    all_logits, labels, image_size = collect_exit_logits(model, val_loader)
    flops, ms = _measured_costs(model, image_size, unit, batch_size, repeats)
    return fit_thresholds(all_logits, labels, flops, target, criterion, depth_ms=ms, batch_size=batch_size)


def budget_curve(
    model: DepthAdaptiveModel,
    val_loader: Iterable[Tuple[torch.Tensor, torch.Tensor]],
    flops_ratios: Optional[Sequence[float]] = None,
    criterion: str = "confidence",
    *,
    ms_ratios: Optional[Sequence[float]] = None,
    batch_size: int = 1,
    repeats: int = 10,
) -> List[Calibration]:
    """Accuracy vs expected cost: :func:`calibrate` at several budgets, one data pass (and one latency measurement).

    Budgets are fractions of the full-depth cost: ``flops_ratios`` of its FLOPs per sample (default
    :data:`DEFAULT_RATIOS`), or ``ms_ratios`` of its latency per batch of ``batch_size`` measured on
    this machine (give at most one of the two). Ratios below depth 1's cost are clipped to it, above
    1 to full depth. See :func:`format_budget_table`.
    """
    _check_criterion(criterion)
    if flops_ratios is not None and ms_ratios is not None:
        raise ValueError("Give flops_ratios or ms_ratios (fractions of the full-depth FLOPs or latency), not both.")
    unit, ratios = ("ms", ms_ratios) if ms_ratios is not None else ("flops", flops_ratios or DEFAULT_RATIOS)
    if not ratios or any(not isinstance(r, Real) or isinstance(r, bool) or not r > 0 for r in ratios):
        raise ValueError(f"{unit}_ratios must be numbers > 0 (fractions of the full-depth cost), got {ratios!r}.")
    check_measurement(batch_size, repeats)
    all_logits, labels, image_size = collect_exit_logits(model, val_loader)
    flops, ms = _measured_costs(model, image_size, unit, batch_size, repeats)
    costs = ms if ms is not None else flops
    return [
        fit_thresholds(all_logits, labels, flops, min(max(r * costs[-1], costs[0]), costs[-1]), criterion,
                       depth_ms=ms, batch_size=batch_size)
        for r in ratios
    ]


def format_budget_table(rows: Sequence[Calibration]) -> str:
    """A Markdown table of :func:`budget_curve` results (costs in the first row's unit)."""
    unit, scale = ("ms", 1.0) if rows and rows[0].unit == "ms" else ("GFLOPs", 1e9)
    lines = [
        f"| budget ({unit}) | expected {unit} | cost ratio | expected GFLOPs | accuracy | exit fractions "
        "| thresholds |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in rows:
        lines.append(
            f"| {c.target / scale:.4f} | {c.expected_cost / scale:.4f} | {c.expected_cost / c.depth_costs[-1]:.3f} "
            f"| {c.expected_flops / 1e9:.4f} | {c.accuracy:.4f} | {' / '.join(f'{f:.2f}' for f in c.exit_fractions)} "
            f"| {' / '.join(f'{t:.4g}' for t in c.thresholds)} |"
        )
    return "\n".join(lines)


def depth_for_latency(
    model: DepthAdaptiveModel,
    latency_ms: float,
    batch_size: int = 1,
    input_size: Optional[Sequence[int]] = None,
    repeats: int = 10,
    warmup: int = 2,
) -> Tuple[int, List[float]]:
    """The deepest depth whose median latency on a random batch fits ``latency_ms``, measured on this
    machine (the model's device) at ``batch_size``.

    Depths are measured deepest first and measuring stops at the first that fits.
    Returns ``(depth, latencies measured, deepest first)``.

    Raises:
        ValueError: when not even depth 1 fits (the message lists what was measured), or a
            ``latency_ms`` not > 0, a ``batch_size`` or ``repeats`` below 1.
    """
    if not isinstance(latency_ms, Real) or isinstance(latency_ms, bool) or not latency_ms > 0:
        raise ValueError(f"latency_ms must be a number > 0 (milliseconds per batch), got {latency_ms!r}.")
    check_measurement(batch_size, repeats, warmup)
    size = tuple(input_size or model.default_input_size)
    x = torch.randn(batch_size, *size, device=next(model.parameters()).device)
    measured: List[float] = []
    with eval_mode(model), torch.inference_mode():
        for depth in range(model.num_depths, 0, -1):
            measured.append(measure_latency(lambda: model.forward_depth(x, depth), repeats=repeats, warmup=warmup))
            if measured[-1] <= latency_ms:
                return depth, measured
    table = ", ".join(f"depth {model.num_depths - i}: {t:.2f} ms" for i, t in enumerate(measured))
    raise ValueError(
        f"No depth fits {latency_ms} ms at batch size {batch_size}, input {size} (measured {table}). "
        f"Use a smaller batch or input, or a larger budget."
    )


def set_depth_for_budget(
    model: "DepthAdaptiveModel", latency_ms: float, batch_size: int = 1,
    input_size: Optional[Sequence[int]] = None, repeats: int = 10,
) -> "DepthAdaptiveModel":
    """Set ``model`` to the deepest depth whose measured median latency fits ``latency_ms``
    (:func:`depth_for_latency`); raises ``ValueError`` if none fits. Returns ``model``.

    Example:
        >>> import coopnets
        >>> m = coopnets.create_model("coop_resnet18", num_classes=10)
        >>> set_depth_for_budget(m, latency_ms=1e6, input_size=(3, 32, 32), repeats=1).depth
        4
    """
    depth, _ = depth_for_latency(model, latency_ms, batch_size, input_size, repeats=repeats)
    return model.set_depth(depth)
