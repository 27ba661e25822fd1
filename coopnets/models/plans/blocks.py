"""The ``blocks`` plan: every depth runs all stages with the first ``n`` blocks of each, and the final head.

EKD's depth-level sub-networks (ResNet-50 ``[3,4,6,3] -> [2,2,2,2] -> [1,1,1,1]``). It needs
the backbone's block-level :class:`~coopnets.models.layouts.StageLayout`, and has no exit
points: every depth ends in the backbone's own head, so early exit saves nothing here.

Example:
    >>> import coopnets
    >>> plan = coopnets.wrap("resnet18", num_classes=10, plan="blocks").depth_plan
    >>> plan.config.model_args(), plan.num_depths
    ({'block_depths': [[1, 1, 1, 1], [2, 2, 2, 2]]}, 2)
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..layouts import StageLayout, get_layout
from .base import DepthPlan, ExitOutputs, PlanConfig, int_list, option_error

DEFAULT_BLOCK_DEPTHS = 3


def default_block_depths(blocks_per_stage: Sequence[int], num_depths: int = DEFAULT_BLOCK_DEPTHS) -> List[List[int]]:
    """EKD-style nested block counts: depth ``d < D`` keeps ``min(n_s, d)`` blocks of each stage.

    ResNet-50 ``[3,4,6,3]`` with ``D=3`` gives ``[1,1,1,1], [2,2,2,2], [3,4,6,3]``;
    duplicates (stages shorter than ``d``) collapse.

    Example:
        >>> default_block_depths([3, 4, 6, 3])
        [[1, 1, 1, 1], [2, 2, 2, 2], [3, 4, 6, 3]]
    """
    depths: List[List[int]] = []
    for d in range(1, num_depths):
        counts = [min(n, d) for n in blocks_per_stage]
        if counts not in depths and counts != list(blocks_per_stage):
            depths.append(counts)
    depths.append(list(blocks_per_stage))
    return depths


@dataclass
class BlocksConfig(PlanConfig):
    """Options of the ``blocks`` plan.

    Attributes:
        block_depths: block counts per stage for every depth, shallowest first, the last
            equal to the full backbone. Default: :func:`default_block_depths`.
        num_block_depths: number of depths of the default schedule.
    """

    block_depths: Optional[List[List[int]]] = None
    num_block_depths: int = field(default=DEFAULT_BLOCK_DEPTHS, metadata={"schedule": True})

    def __post_init__(self) -> None:
        if self.block_depths is not None:
            self.block_depths = int_list("blocks", "block_depths", self.block_depths, depth=2)
        n = self.num_block_depths
        if not isinstance(n, int) or isinstance(n, bool) or n < 2:
            raise option_error("blocks", "num_block_depths", n, "must be an int >= 2")


def _check_block_depths(depths: List[List[int]], full: List[int]) -> None:
    problem = None
    if not depths or depths[-1] != full:
        problem = f"the last entry must be the full backbone {full}"
    for d in depths:
        if len(d) != len(full) or any(not 1 <= n <= m for n, m in zip(d, full)):
            problem = f"every entry needs {len(full)} counts with 1 <= count <= {full}"
    if not problem and any(a == b or any(x > y for x, y in zip(a, b)) for a, b in zip(depths, depths[1:])):
        problem = "every entry must keep at most the blocks of the next, and fewer somewhere (nested depths)"
    if problem:
        raise ValueError(f"Invalid block_depths {depths}: {problem}.")
    if len(depths) < 2:
        raise ValueError(
            f"plan='blocks' needs at least 2 depths, but block_depths {depths} gives only the full backbone: "
            f"its stages have block counts {full}, so there is no block to skip"
            + (" (every stage has one block)" if max(full) == 1 else "")
            + ". Use plan='exits', or pass block_depths with a shallower entry first."
        )


class BlocksPlan(DepthPlan):
    """Every depth runs all stages with the first ``n`` blocks of each, and the shared final head.

    Args:
        backbone: the timm backbone.
        config: the plan's options.
        layout: the backbone's :class:`StageLayout` (required: a clear ``ValueError`` without one).
        in_chans: image channels (unused; every plan takes it).
    """

    name = "blocks"
    config_cls = BlocksConfig
    config: BlocksConfig

    def __init__(self, backbone: nn.Module, config: BlocksConfig, layout: Optional[StageLayout], in_chans: int) -> None:
        if layout is None:
            try:
                get_layout(backbone, purpose="plan='blocks'")
            except NotImplementedError as err:
                raise ValueError(str(err)) from None
        super().__init__(backbone, layout)
        full = [len(s) for s in layout.stages]
        depths = config.block_depths if config.block_depths is not None else default_block_depths(full, config.num_block_depths)
        _check_block_depths(depths, full)
        self.config = replace(config, block_depths=depths, num_block_depths=DEFAULT_BLOCK_DEPTHS)
        self.num_depths = len(depths)

    @staticmethod
    def describe(model_args):
        return "every depth runs all stages with the first n blocks of each: " + ", ".join(map(str, model_args["block_depths"]))

    def _features(self, x: torch.Tensor, depth: int) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        stage_outs = self.layout.run_blocks(self.layout.stem(x), self.config.block_depths[depth - 1])
        return self.layout.finish(stage_outs[-1]), stage_outs

    def forward_depth(self, x, depth):
        return self.backbone.forward_head(self._features(x, depth)[0])

    def forward_features(self, x, depth):
        return self._features(x, depth)[0]

    def forward_exits(self, x, with_features):
        out = ExitOutputs(logits=[])
        hw = x.shape[-2:]
        for depth in range(1, self.num_depths + 1):
            final, stage_outs = self._features(x, depth)
            out.logits.append(self.backbone.forward_head(final))
            if with_features:
                out.embeddings.append(self.backbone.forward_head(final, pre_logits=True))
                out.feature_maps.append([self.layout.to_nchw(s, hw) for s in stage_outs])
        return out

    def embedding_dims(self):
        return [self.final_embedding_dim()] * self.num_depths

    def feature_pairs(self, out, depth):
        """Stage by stage: every stage's output at ``depth`` against the full net's."""
        return list(zip(out.feature_maps[depth], out.feature_maps[-1]))

    def export(self, depth):
        """A copy of the backbone whose stages keep only their first ``n`` blocks, run by timm's own ``forward``."""
        backbone = copy.deepcopy(self.backbone)
        self.layout.truncate(backbone, self.config.block_depths[depth - 1])
        return backbone.eval()
