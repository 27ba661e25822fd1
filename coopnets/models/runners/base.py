"""The runner protocol: run a backbone from the input, or from where it stopped, to exit point ``k``.

A :class:`Runner` is the one concept behind every depth below full: ``forward`` at
depth ``k`` (:meth:`Runner.map_at`), ``forward_exits`` (:meth:`Runner.run_all`), early
exit with batch compaction (:meth:`start` -> :meth:`advance` -> :meth:`compact` ->
:meth:`finish`), and the per-step FLOPs that budgets and the serving controller read
(:meth:`step_flops`, cached per input size). The depth plan chooses its runner
(:meth:`coopnets.models.plans.DepthPlan.runner`); implementations:

* :class:`~coopnets.models.runners.layout.LayoutRunner`: a hand-written
  :class:`~coopnets.models.layouts.StageLayout`, block by block (any image size);
* :class:`~coopnets.models.runners.segments.SegmentRunner`: the backbone's traced graph
  cut at its exits (any traceable backbone; inference only);
* :class:`~coopnets.models.runners.intermediates.IntermediatesRunner`: timm's own
  ``forward_intermediates`` (one call per forward; it cannot resume, so
  :attr:`Runner.resumable` is ``False``).

The state between steps is the runner's own (a tensor, a tuple, a dict of live
values); callers only pass it back. Exit indices ``k`` are 0-based and count the
plan's exit heads, not the backbone's feature points.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Dict, Hashable, List, Sequence, Tuple, TypeVar

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

State = Any
#: a cost: FLOPs (int) or milliseconds (float)
Number = TypeVar("Number", int, float)


def structure(modules: Sequence[nn.Module]) -> Hashable:
    """What the FLOPs of ``modules`` depend on besides the input: every submodule's type and its own
    parameters' shapes, in order.

    Example:
        >>> head = nn.Sequential(nn.Flatten(), nn.Linear(8, 3))
        >>> structure([head]) == structure([nn.Sequential(nn.Flatten(), nn.Linear(8, 3))])
        True
        >>> structure([head]) == structure([nn.Sequential(nn.Flatten(), nn.Linear(8, 10))])
        False
    """
    return tuple((type(m), tuple(tuple(p.shape) for p in m.parameters(recurse=False)))
                 for module in modules for m in module.modules())


class Runner(ABC):
    """Runs ``backbone`` to its ``num_exits`` exit points and on to its final features.

    Attributes:
        backbone: the timm model it runs (the model's own, not a copy).
        num_exits: number of exit points (the plan's exit heads), reached in order.
    """

    #: what runs the backbone, for messages and reports (``"layout"``, ``"segments"``, ``"intermediates"``)
    kind: ClassVar[str] = ""
    #: :meth:`advance` continues from where the state stopped (else it recomputes from the input)
    resumable: ClassVar[bool] = True
    #: built for one input size (a trace that fixed the spatial size): the plan builds one per size
    size_specific: bool = False

    def __init__(self, backbone: nn.Module, num_exits: int) -> None:
        self.backbone = backbone
        self.num_exits = num_exits
        self._step_flops: Dict[Tuple[Tuple[int, ...], Hashable], List[int]] = {}

    # --- the protocol -----------------------------------------------------------------
    @abstractmethod
    def start(self, x: torch.Tensor) -> State:
        """The state before exit point 0, from the images ``x`` (N, C, H, W)."""

    @abstractmethod
    def advance(self, state: State, k: int) -> Tuple[State, torch.Tensor]:
        """Run from ``state`` (which stopped at exit point ``k - 1``, or the input) to exit point ``k``:
        the new state and the NCHW map that exit head ``k`` reads."""

    @abstractmethod
    def finish(self, state: State) -> torch.Tensor:
        """Run the rest of the backbone and its own head: the final logits."""

    @abstractmethod
    def compact(self, state: State, keep: torch.Tensor) -> State:
        """Keep only the samples ``keep`` (row indices into the state's batch) of every live value."""

    # --- derived runs (implementations override them when they have a faster way) ------
    def map_at(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """The map at exit point ``k`` from the images; nothing past it runs."""
        state = self.start(x)
        fmap = x
        for j in range(k + 1):
            state, fmap = self.advance(state, j)
        return fmap

    def run_all(self, x: torch.Tensor, final_map: bool = False) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """One pass through the whole backbone: its final features (``forward_features``, before its head)
        and the map at every exit point (``final_map``: also the NCHW map of the last stage, before the
        final norm). Runners that only step (traced segments) do not have it."""
        raise NotImplementedError(f"the {self.kind} runner runs the exits one at a time (start/advance/finish)")

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint the blocks this runner calls itself (a no-op where the backbone's own code runs)."""

    # --- costs ------------------------------------------------------------------------
    def step_flops(self, image_size: Sequence[int], heads: Sequence[nn.Module]) -> List[int]:
        """FLOPs of one sample per step: ``[start, advance 0, head 0, ..., advance K-1, head K-1, finish]``.

        ``heads`` are the exit heads (one per exit point); the last step includes the
        backbone's own ``forward_head``. Measured once per ``(C, H, W)`` and structure of the
        heads and the backbone's classifier (:func:`structure`: a head swapped for another kind or
        a ``reset_classifier`` counts again) with ``torch.utils.flop_counter`` on one sample and
        cached on the runner.
        """
        size = tuple(int(s) for s in image_size)
        classifier = self.backbone.get_classifier() if hasattr(self.backbone, "get_classifier") else ()
        classifiers = list(classifier) if isinstance(classifier, (tuple, list)) else [classifier]
        key = (size, structure([*heads, *classifiers]))
        if key not in self._step_flops:
            steps: List[int] = []

            def count(fn, *args):
                with FlopCounterMode(display=False) as counter:
                    result = fn(*args)
                steps.append(int(counter.get_total_flops()))
                return result

            device = next(self.backbone.parameters()).device
            with torch.inference_mode():
                state = count(self.start, torch.zeros(1, *size, device=device))
                for k in range(self.num_exits):
                    state, fmap = count(self.advance, state, k)
                    count(heads[k], fmap)
                count(self.finish, state)
            self._step_flops[key] = steps
        return list(self._step_flops[key])

    def depth_flops(self, image_size: Sequence[int], heads: Sequence[nn.Module]) -> List[int]:
        """FLOPs of one sample that leaves at depth ``1..num_exits + 1`` under early exit (the exit heads
        evaluated on the way included), from :meth:`step_flops`."""
        return self.depth_totals(self.step_flops(image_size, heads))

    @staticmethod
    def depth_totals(steps: Sequence[Number]) -> List[Number]:
        """Per-step costs ``[start, advance 0, head 0, ..., advance K-1, head K-1, finish]`` (FLOPs, or
        measured milliseconds) summed into the cost of leaving at each depth ``1..K + 1``: leaving at depth
        ``d <= K`` pays the start, the first ``d`` advances and exit heads ``1..d`` (every head the sample
        was evaluated at, not only its own); the last depth pays every step.

        Example:
            >>> Runner.depth_totals([1, 10, 100, 20, 200, 3])  # start, advance 0, head 0, advance 1, head 1, finish
            [111, 331, 334]
        """
        steps = list(steps)
        return [sum(steps[: 1 + 2 * d]) for d in range(1, (len(steps) - 2) // 2 + 1)] + [sum(steps)]
