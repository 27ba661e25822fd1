"""Compute budgets: early-exit thresholds for a FLOPs budget, a fixed depth for a latency budget.

**FLOPs budget (MSDNet budgeted-batch).** :func:`calibrate` runs every exit on held-out
data once, then fits one threshold per exit head so that a *geometric* share of the
samples leaves at each depth: ``P(leave at depth d) = q^d / sum_j q^j``. The ratio
``q`` is solved by bisection so the expected FLOPs per sample, under the model's real
per-depth costs (:meth:`EarlyExit.depth_flops`), equal the budget; exit ``d``'s threshold
is then the score that lets exactly that many of the still-running samples leave. The
result reports the thresholds, the FLOPs per sample they actually cost on that data and
the accuracy there. :func:`budget_curve` does this for several budgets from one pass.

**Latency budget.** :func:`depth_for_latency` measures the depths deepest first (with
:func:`coopnets.inference.profiler.measure_latency`) and returns the deepest whose median latency
fits; :func:`set_depth_for_budget` applies it.

Example:
    >>> import torch, coopnets
    >>> m = coopnets.create_model("coop_resnet18", num_classes=10).eval()
    >>> data = [(torch.randn(8, 3, 64, 64), torch.randint(0, 10, (8,))) for _ in range(2)]
    >>> ee = coopnets.EarlyExit(m)
    >>> full = ee.depth_flops((3, 64, 64))[-1]
    >>> cal = coopnets.calibrate(m, data, target_flops=0.7 * full)
    >>> len(cal.thresholds) == m.num_depths - 1
    True
    >>> bool(cal.expected_flops <= full)
    True
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, List, Optional, Sequence, Tuple

import torch

from ..models._utils import eval_mode
from .early_exit import EarlyExit, EarlyExitResult, confidence_score, simulate
from .profiler import measure_latency

CALIBRATION_CRITERIA = ("confidence", "entropy")

if TYPE_CHECKING:
    from ..models.depth_adaptive import DepthAdaptiveModel


@dataclass
class Calibration:
    """Thresholds fitted for one FLOPs budget, and what they achieve on the calibration data.

    Attributes:
        criterion: ``confidence`` or ``entropy``.
        thresholds: one per exit head (pass to :class:`EarlyExit`).
        target_flops: the budget, FLOPs per sample.
        expected_flops: FLOPs per sample the thresholds spend on the calibration data.
        full_flops: FLOPs per sample at full depth.
        accuracy: top-1 accuracy on the calibration data under these thresholds.
        exit_fractions: share of samples leaving at each depth.
        geometric_q: the solved ratio of the geometric exit distribution.
    """

    criterion: str
    thresholds: List[float]
    target_flops: float
    expected_flops: float
    full_flops: int
    accuracy: float
    exit_fractions: List[float] = field(default_factory=list)
    geometric_q: float = 1.0

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


def geometric_exit_distribution(depth_flops: Sequence[float], target_flops: float) -> Tuple[List[float], float]:
    """MSDNet's exit distribution ``p_d ~ q^d`` whose expected cost equals ``target_flops``.

    Returns ``(p_1..p_D, q)``. The expected cost grows with ``q``, so ``q`` is found by
    bisection on ``log q``.

    Example:
        >>> p, q = geometric_exit_distribution([1.0, 2.0, 3.0], 2.0)
        >>> [round(v, 3) for v in p], round(q, 3)
        ([0.333, 0.333, 0.333], 1.0)
    """
    lo_cost, hi_cost = float(depth_flops[0]), float(depth_flops[-1])
    if not lo_cost <= target_flops <= hi_cost:
        raise ValueError(
            f"target_flops={target_flops:.4g} is outside what early exit can spend per sample: "
            f"[{lo_cost:.4g} (everyone leaves at depth 1), {hi_cost:.4g} (full depth)]."
        )

    def dist(log_q: float) -> List[float]:
        logits = torch.tensor([log_q * d for d in range(len(depth_flops))], dtype=torch.float64)
        return torch.softmax(logits, 0).tolist()

    def cost(log_q: float) -> float:
        return sum(p * c for p, c in zip(dist(log_q), depth_flops))

    lo, hi = -50.0, 50.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(mid) < target_flops else (lo, mid)
    return dist((lo + hi) / 2), math.exp((lo + hi) / 2)


def _check_criterion(criterion: str) -> None:
    if criterion not in CALIBRATION_CRITERIA:
        raise ValueError(
            f"calibrate fits score thresholds; criterion must be one of {', '.join(CALIBRATION_CRITERIA)}, "
            f"got {criterion!r} (patience has integer thresholds: pick them directly)."
        )


def depth_costs(model: DepthAdaptiveModel, image_size: Sequence[int]) -> List[int]:
    """FLOPs of one sample leaving at each depth under early exit (see :meth:`EarlyExit.depth_flops`)."""
    return EarlyExit(model).depth_flops(image_size)


def fit_thresholds(
    all_logits: Sequence[torch.Tensor],
    labels: torch.Tensor,
    depth_flops: Sequence[int],
    target_flops: float,
    criterion: str = "confidence",
) -> Calibration:
    """Fit per-exit thresholds on precomputed logits (see :func:`calibrate`)."""
    _check_criterion(criterion)
    probs, q = geometric_exit_distribution(depth_flops, target_flops)
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
    return Calibration(
        criterion=criterion,
        thresholds=thresholds,
        target_flops=float(target_flops),
        expected_flops=result.total_flops / n,
        full_flops=int(depth_flops[-1]),
        accuracy=(result.predictions == labels).float().mean().item(),
        exit_fractions=result.exit_fractions(),
        geometric_q=q,
    )


def calibrate(
    model: DepthAdaptiveModel,
    val_loader: Iterable[Tuple[torch.Tensor, torch.Tensor]],
    target_flops: float,
    criterion: str = "confidence",
) -> Calibration:
    """Per-exit thresholds on held-out data so the expected FLOPs per sample meet ``target_flops``.

    Args:
        model: an ``exits``-plan model with a stage layout (see :class:`EarlyExit`).
        val_loader: held-out batches of ``(images, labels)`` (all of one image size).
        target_flops: FLOPs budget per sample, between depth 1's and full depth's cost
            (see ``EarlyExit(model).depth_flops((C, H, W))``).
        criterion: ``confidence`` or ``entropy``.

    Example:
        >>> import torch, coopnets
        >>> m = coopnets.create_model("coop_resnet18", num_classes=10).eval()
        >>> data = [(torch.randn(8, 3, 64, 64), torch.randint(0, 10, (8,)))]
        >>> cal = coopnets.calibrate(m, data, target_flops=1e12)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        ValueError: target_flops=1e+12 is outside ...
    """
    _check_criterion(criterion)
    all_logits, labels, image_size = collect_exit_logits(model, val_loader)
    return fit_thresholds(all_logits, labels, depth_costs(model, image_size), target_flops, criterion)


def budget_curve(
    model: DepthAdaptiveModel,
    val_loader: Iterable[Tuple[torch.Tensor, torch.Tensor]],
    flops_ratios: Sequence[float] = (0.4, 0.55, 0.7, 0.85, 1.0),
    criterion: str = "confidence",
) -> List[Calibration]:
    """Accuracy vs expected FLOPs: :func:`calibrate` at several budgets (fractions of full-depth FLOPs), one data pass.

    Ratios below depth 1's cost are clipped to it. See :func:`format_budget_table`.
    """
    _check_criterion(criterion)
    all_logits, labels, image_size = collect_exit_logits(model, val_loader)
    costs = depth_costs(model, image_size)
    return [
        fit_thresholds(all_logits, labels, costs, min(max(r * costs[-1], costs[0]), costs[-1]), criterion)
        for r in flops_ratios
    ]


def format_budget_table(rows: Sequence[Calibration]) -> str:
    """A Markdown table of :func:`budget_curve` results."""
    lines = [
        "| budget (GFLOPs) | expected GFLOPs | FLOPs ratio | accuracy | exit fractions | thresholds |",
        "|---|---|---|---|---|---|",
    ]
    for c in rows:
        lines.append(
            f"| {c.target_flops / 1e9:.4f} | {c.expected_flops / 1e9:.4f} | {c.expected_flops / c.full_flops:.3f} "
            f"| {c.accuracy:.4f} | {' / '.join(f'{f:.2f}' for f in c.exit_fractions)} "
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
    """The deepest depth whose median latency on a random batch fits ``latency_ms``.

    Depths are measured deepest first and measuring stops at the first that fits.
    Returns ``(depth, latencies measured, deepest first)``.

    Raises:
        ValueError: when not even depth 1 fits (the message lists what was measured).
    """
    if not latency_ms > 0 or batch_size < 1:
        raise ValueError(f"latency_ms must be > 0 and batch_size >= 1, got {latency_ms!r} and {batch_size!r}.")
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
