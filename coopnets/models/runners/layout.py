"""The hand-written stage layouts as a :class:`~coopnets.models.runners.base.Runner`.

A :class:`~coopnets.models.layouts.StageLayout` runs a backbone block by block, so a
pass can stop after any block and resume there on fewer samples. The runner's exit
points are positions in the layout (after a stage, or after any block with
``exit_points="blocks"``); its maps are exactly what timm's ``forward_intermediates``
reports there (NCHW, no final norm).

Example:
    >>> import torch, timm
    >>> from coopnets.models.layouts import get_layout
    >>> layout = get_layout(timm.create_model("resnet18").eval())
    >>> runner = LayoutRunner(layout, stops=layout.feature_ends[1:4])
    >>> state = runner.start(torch.randn(2, 3, 64, 64))
    >>> state, fmap = runner.advance(state, 0)
    >>> fmap.shape, runner.compact(state, torch.tensor([1]))[0].shape[0]
    (torch.Size([2, 64, 16, 16]), 1)
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from ..layouts import Position, StageLayout
from .base import Runner

#: (running tensor, position reached, image height and width)
LayoutState = Tuple[torch.Tensor, Position, Tuple[int, int]]


class LayoutRunner(Runner):
    """Runs ``layout``'s backbone to the positions ``stops`` (one per exit head, increasing)."""

    kind = "layout"

    def __init__(self, layout: StageLayout, stops: Sequence[Position]) -> None:
        super().__init__(layout.backbone, len(stops))
        self.layout = layout
        self.stops: List[Position] = list(stops)

    def start(self, x: torch.Tensor) -> LayoutState:
        # x.shape[-2:], not a tuple of ints: a Proxy under FX tracing
        return self.layout.stem(x), (0, 0), x.shape[-2:]

    def advance(self, state: LayoutState, k: int) -> Tuple[LayoutState, torch.Tensor]:
        h, position, hw = state
        stop = self.stops[k]
        h = self.layout.run(h, position, stop)
        return (h, stop, hw), self.layout.to_nchw(h, hw)

    def finish(self, state: LayoutState) -> torch.Tensor:
        h, position, _ = state
        return self.backbone.forward_head(self.layout.finish(self.layout.run(h, position, self.layout.end)))

    def compact(self, state: LayoutState, keep: torch.Tensor) -> LayoutState:
        h, position, hw = state
        return h.index_select(0, keep), position, hw

    def map_at(self, x: torch.Tensor, k: int) -> torch.Tensor:
        layout = self.layout
        return layout.to_nchw(layout.run(layout.stem(x), (0, 0), self.stops[k]), x.shape[-2:])

    def run_all(self, x: torch.Tensor, final_map: bool = False) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        layout, hw = self.layout, x.shape[-2:]
        h, position, maps = layout.stem(x), (0, 0), []
        for stop in self.stops:
            h, position = layout.run(h, position, stop), stop
            maps.append(layout.to_nchw(h, hw))
        h = layout.run(h, position, layout.end)
        if final_map:
            maps.append(layout.to_nchw(h, hw))
        return layout.finish(h), maps

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.layout.grad_checkpointing = enable
