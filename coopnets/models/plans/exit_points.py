"""Exit points: where an ``exits``-plan model can put exit heads, and which runner reaches them.

* :class:`StagePoints` (``exit_points="stages"``, default): the backbone's ``feature_info``
  entries, the ends of its stages;
* :class:`BlockPoints` (``exit_points="blocks"``): the end of every block of the backbone's
  :class:`~coopnets.models.layouts.StageLayout` (MLCSD-Net's two exits per ResNet-18 stage).

Each kind lists its points as ``feature_info``-style entries (:attr:`ExitPoints.info`),
builds the :class:`~coopnets.models.runners.Runner` for the chosen points
(:meth:`ExitPoints.runner`) and cuts a backbone copy after a point for export
(:meth:`ExitPoints.prune`). :func:`default_exit_indices` and :func:`nested_exit_indices`
choose and check the points that get a head.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple

from torch import nn

from ..layouts import StageLayout, get_layout
from ..runners import IntermediatesRunner, LayoutRunner, Runner

DEFAULT_VIT_EXITS = 4


def default_exit_indices(feature_info: Sequence[Dict[str, Any]], num_exits: Optional[int] = None) -> List[int]:
    """Exit point indices (``feature_info`` stages or block ends) that get an exit head (the final head not included).

    Every point past the stem (reduction >= 4) gets one: every stage, or with block exit
    points every block (ResNet-18: its 8 blocks, so 7 exit heads + the final head; the
    reduction-2 first blocks of EfficientNet/MobileNetV3 are skipped like their stem
    stage). When all entries share one reduction (ViT-like: one entry per block), or
    ``num_exits`` is given, ``num_exits`` (default 4) evenly spaced points are used instead.

    Example:
        >>> default_exit_indices([{"reduction": r} for r in (2, 4, 8, 16, 32)])
        [1, 2, 3]
        >>> default_exit_indices([{"reduction": r} for r in (4, 4, 8, 8, 16, 16, 32, 32)])
        [0, 1, 2, 3, 4, 5, 6]
        >>> default_exit_indices([{"reduction": 16}] * 12)
        [2, 5, 8]
    """
    n = len(feature_info)
    reductions = {f["reduction"] for f in feature_info}
    if len(reductions) == 1 or num_exits is not None:
        k = num_exits or DEFAULT_VIT_EXITS
        if not 1 <= k <= n:
            raise ValueError(f"num_exits must be in 1..{n} for this backbone, got {k}.")
        points = sorted({math.ceil(n * (i + 1) / k) - 1 for i in range(k)})
    else:
        points = [i for i, f in enumerate(feature_info) if f["reduction"] >= 4]
    return [p for p in points if p != n - 1]


def nested_exit_indices(feature_info: Sequence[Dict[str, Any]]) -> List[int]:
    """``feature_info`` indices (below the last) that make nested depths, whose cost strictly grows.

    An entry is excluded when its ``module`` also produces another entry (a feature_info that
    lists parallel branches rather than a chain: CrossViT lists both branches of the same blocks,
    CoaT's ``parallel_blocks`` produce three scales at once): only the first entry of each module
    is kept, and never one of the final entry's module (running it is running everything).

    Example:
        >>> info = [{"module": m} for m in ("blocks.0", "blocks.1", "blocks.2", "blocks.0", "blocks.1", "blocks.2")]
        >>> nested_exit_indices(info)
        [0, 1]
    """
    final = feature_info[-1].get("module")
    seen = set()
    valid = []
    for i, f in enumerate(feature_info[:-1]):
        module = f.get("module")
        if module is not None and (module in seen or module == final):
            continue
        seen.add(module)
        valid.append(i)
    return valid


def _not_nested_reason(feature_info: Sequence[Dict[str, Any]], index: int) -> str:
    module = feature_info[index].get("module")
    other = next(j for j, f in enumerate(feature_info) if j != index and f.get("module") == module)
    return (f"feature_info entry {index} comes from module {module!r}, which also produces entry {other} "
            f"(the backbone's feature_info lists parallel outputs, not a chain of stages)")


class ExitPoints:
    """Where an :class:`ExitsPlan` can put exit heads, and how to run the backbone up to them.

    Attributes:
        info: one ``feature_info``-style entry (``num_chs``, ``reduction``, ``module``) per
            point, in execution order; the last one is the backbone's final map (its own head).
    """

    #: the ``exit_points`` value that selects this class
    name: ClassVar[str] = ""
    #: what an index into :attr:`info` counts (for error messages)
    what: ClassVar[str] = ""

    def __init__(self, info: Sequence[Dict[str, Any]]) -> None:
        self.info = [dict(f) for f in info]

    def runner(self, indices: Sequence[int]) -> Runner:
        """The runner that takes the backbone to points ``indices`` (one per exit head)."""
        raise NotImplementedError

    def prune(self, backbone: nn.Module, index: int) -> int:
        """Cut ``backbone`` (a copy) so that nothing past point ``index`` is left (final norm and head
        included); returns the ``feature_info`` index whose ``forward_intermediates`` map is then that point's."""
        raise NotImplementedError


class StagePoints(ExitPoints):
    """``exit_points="stages"``: the backbone's ``feature_info`` entries (run by its layout, or by timm's
    ``forward_intermediates`` for a family without one)."""

    name = "stages"
    what = "feature_info"

    def __init__(self, backbone: nn.Module, layout: Optional[StageLayout]) -> None:
        super().__init__(backbone.feature_info)
        self.backbone = backbone
        self.layout = layout

    def runner(self, indices):
        """The layout's runner when the family has one and no exit reads the stem output (the layout starts
        after the stem); else timm's ``forward_intermediates``."""
        ends = self.layout.feature_ends if self.layout is not None else []
        stops = [ends[i] for i in indices] if ends else []
        if self.layout is not None and None not in stops:
            return LayoutRunner(self.layout, stops)
        return IntermediatesRunner(self.backbone, indices, last=len(self.info) - 1)

    def prune(self, backbone, index):
        backbone.prune_intermediate_layers(indices=[index], prune_norm=True, prune_head=True)
        return index


class BlockPoints(ExitPoints):
    """``exit_points="blocks"``: the end of every block of the backbone's :class:`StageLayout`
    (:attr:`~StageLayout.block_ends`), run block by block by the layout.

    Example:
        >>> import timm
        >>> points = BlockPoints(get_layout(timm.create_model("resnet18")), in_chans=3)
        >>> [f["module"] for f in points.info[:3]], len(points.info)
        (['layer1.0', 'layer1.1', 'layer2.0'], 8)
    """

    name = "blocks"
    what = "block-end"

    def __init__(self, layout: StageLayout, in_chans: int) -> None:
        super().__init__(layout.block_info(in_chans))
        self.layout = layout
        self.ends = layout.block_ends

    def runner(self, indices):
        return LayoutRunner(self.layout, [self.ends[i] for i in indices])

    def prune(self, backbone, index):
        """The blocks after point ``index`` are dropped (the rest of its stage and every later stage
        emptied), then timm prunes past the first ``feature_info`` entry at or after the point."""
        layout = self.layout
        stage, done = self.ends[index]
        kept = [len(blocks) if s < stage else done if s == stage else 0 for s, blocks in enumerate(layout.stages)]
        layout.truncate(backbone, kept)
        feature = next(i for i, end in enumerate(layout.feature_ends) if end is not None and end >= (stage, done))
        backbone.prune_intermediate_layers(indices=[feature], prune_norm=True, prune_head=True)
        return feature


EXIT_POINTS: Tuple[str, ...] = (StagePoints.name, BlockPoints.name)


def create_exit_points(exit_points: str, backbone: nn.Module, layout: Optional[StageLayout], in_chans: int) -> ExitPoints:
    """The :class:`ExitPoints` named ``exit_points`` (``"stages"`` or ``"blocks"``) of ``backbone``, whose
    layout is ``layout`` (``None``: its family has none).

    Raises:
        ValueError: ``"blocks"`` for a backbone without a :class:`StageLayout` (the sentence lists the families).

    Example:
        >>> import timm
        >>> backbone = timm.create_model("resnet18")
        >>> len(create_exit_points("blocks", backbone, get_layout(backbone), in_chans=3).info)
        8
    """
    if exit_points == StagePoints.name:
        return StagePoints(backbone, layout)
    if layout is None:
        try:
            get_layout(backbone, purpose="exit_points='blocks'", instead="exit_points='stages'")
        except NotImplementedError as err:
            raise ValueError(str(err)) from None
    return BlockPoints(layout, in_chans)
