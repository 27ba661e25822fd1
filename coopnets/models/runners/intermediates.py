"""timm's own ``forward_intermediates`` as a :class:`~coopnets.models.runners.base.Runner`.

For a backbone without a hand-written stage layout this is the fastest way to run one
depth (``forward_intermediates(x, indices=[i], stop_early=True)``: nothing past the exit
runs) or every exit at once (``stop_early=False``), and it keeps timm's own gradient
checkpointing. It cannot resume a pass: :meth:`IntermediatesRunner.advance` recomputes
from the input, so it is not :attr:`~Runner.resumable` and early exit uses traced
segments (:mod:`coopnets.models.runners.segments`) instead.

Example:
    >>> import torch, timm
    >>> runner = IntermediatesRunner(timm.create_model("test_byobnet").eval(), indices=[1, 2], last=4)
    >>> [m.shape[1] for m in runner.run_all(torch.randn(1, 3, 64, 64))[1]]
    [32, 64]
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import nn

from .base import Runner


class IntermediatesRunner(Runner):
    """Runs ``backbone`` to its ``feature_info`` entries ``indices`` through ``forward_intermediates``
    (``last``: the index of its final entry)."""

    kind = "intermediates"
    resumable = False

    def __init__(self, backbone: nn.Module, indices: Sequence[int], last: int) -> None:
        super().__init__(backbone, len(indices))
        self.indices = list(indices)
        self.last = last

    def start(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def advance(self, state: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return state, self.map_at(state, k)

    def finish(self, state: torch.Tensor) -> torch.Tensor:
        return self.backbone(state)

    def compact(self, state: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return state.index_select(0, keep)

    def map_at(self, x: torch.Tensor, k: int) -> torch.Tensor:
        feats = self.backbone.forward_intermediates(x, indices=[self.indices[k]], stop_early=True, intermediates_only=True)
        return feats[-1]

    def run_all(self, x: torch.Tensor, final_map: bool = False) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        indices = self.indices + [self.last] if final_map else self.indices
        final, maps = self.backbone.forward_intermediates(x, indices=indices, stop_early=False)
        return final, list(maps)
