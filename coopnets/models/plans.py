"""Depth plans: how one backbone becomes ``num_depths`` nested sub-networks.

A :class:`DepthPlan` owns everything that differs between plans, so the model
(:class:`~coopnets.models.depth_adaptive.DepthAdaptiveModel`), the training recipes and
export never test a plan's name:

* :meth:`~DepthPlan.forward_depth` and :meth:`~DepthPlan.forward_exits`: logits at one
  depth, or at every depth (with embeddings and feature maps for distillation);
* :meth:`~DepthPlan.embedding_dims` and :meth:`~DepthPlan.feature_pairs`: what
  feature-level distillation compares;
* :meth:`~DepthPlan.export`: the structural truncation of one depth;
* :meth:`~DepthPlan.config`: the constructor arguments that rebuild it (written once
  into a checkpoint's ``model_args``).

Plans hold no modules of their own: the exit heads are registered on the model as
``exits`` (so state-dict keys are the same for every plan) and the plan methods take
the model as their first argument.

``exits`` (:class:`ExitsPlan`, default)
    An :class:`~coopnets.models.exit_head.ExitHead` after chosen exit points; the last
    depth is the plain backbone. ``exit_points="stages"`` (default, :class:`StagePoints`):
    the points are the ``feature_info`` stages, and depth ``k`` runs the stem, stages
    ``1..k`` (timm's ``forward_intermediates(..., stop_early=True)``) and exit ``k``.
    ``exit_points="blocks"`` (:class:`BlockPoints`): the points are the ends of every
    block of the backbone's :class:`~coopnets.models.layouts.StageLayout` (MLCSD-Net's
    two exits per ResNet-18 stage), and depth ``k`` runs the blocks up to its point.
``blocks`` (:class:`BlocksPlan`)
    Every depth runs all stages with only their first ``n`` blocks and the shared final
    head (EKD's depth-level sub-networks). Needs a block-level
    :class:`~coopnets.models.layouts.StageLayout`.

A new plan is one subclass here plus an entry in :data:`PLAN_CLASSES`.

Example:
    >>> import coopnets
    >>> m = coopnets.wrap("resnet18", num_classes=10, plan="blocks")
    >>> type(m.depth_plan).__name__, m.depth_plan.config()
    ('BlocksPlan', {'block_depths': [[1, 1, 1, 1], [2, 2, 2, 2]]})
    >>> coopnets.wrap("resnet18", num_classes=10).depth_plan.config()
    {'exit_indices': [1, 2, 3], 'head': 'conv'}
    >>> coopnets.wrap("resnet18", num_classes=10, exit_points="blocks").depth_plan.config()
    {'exit_indices': [0, 1, 2, 3, 4, 5, 6], 'head': 'conv', 'exit_points': 'blocks'}
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from .exit_head import ExitHead, head_kind_for
from .layouts import Position, StageLayout, get_layout

#: the :class:`~coopnets.models.depth_adaptive.DepthAdaptiveModel` a plan belongs to; typed as a
#: module so that this file does not import the model's (which imports this one)
Model = nn.Module

DEFAULT_VIT_EXITS = 4
DEFAULT_BLOCK_DEPTHS = 3
FeaturePair = Tuple[torch.Tensor, torch.Tensor]


@dataclass
class ExitOutputs:
    """Everything one shared pass produces for every depth (used by training recipes).

    Attributes:
        logits: class logits per depth, shallowest first.
        embeddings: pooled pre-logit embedding per depth.
        feature_maps: per depth, the NCHW maps that depth computed at its stage
            boundaries (``exits`` plan: the map its exit reads; ``blocks`` plan: every
            stage's output), for feature-level distillation.
    """

    logits: List[torch.Tensor]
    embeddings: List[torch.Tensor] = field(default_factory=list)
    feature_maps: List[List[torch.Tensor]] = field(default_factory=list)


class DepthPlan:
    """Base class of depth plans (see the module docstring). Subclasses set ``name``."""

    name: ClassVar[str] = ""
    #: the keys :meth:`config` may return
    config_keys: ClassVar[Tuple[str, ...]] = ()
    num_depths: int

    def build_exits(self, model: Model) -> nn.ModuleList:
        """The exit heads this plan adds to ``model`` (registered as ``model.exits``)."""
        return nn.ModuleList()

    def config(self) -> Dict[str, Any]:
        """Constructor arguments of :class:`DepthAdaptiveModel` (besides ``plan``) that rebuild this plan."""
        raise NotImplementedError

    @staticmethod
    def describe(config: Dict[str, Any]) -> str:
        """One line for people (model cards) on the structure that :meth:`config` records."""
        raise NotImplementedError

    def forward_depth(self, model: Model, x: torch.Tensor, depth: int) -> torch.Tensor:
        """Logits of the sub-network at ``depth`` (1-based, already validated)."""
        raise NotImplementedError

    def forward_exits(self, model: Model, x: torch.Tensor, with_features: bool) -> ExitOutputs:
        """Logits of every depth from one shared pass (and embeddings/feature maps if asked)."""
        raise NotImplementedError

    def forward_features(self, model: Model, x: torch.Tensor, depth: int) -> torch.Tensor:
        """Unpooled features the classifier of ``depth`` (below full) reads (timm's ``forward_features``)."""
        raise NotImplementedError

    def forward_head(self, model: Model, x: torch.Tensor, depth: int, pre_logits: bool) -> torch.Tensor:
        """Logits (or the pooled embedding) of ``depth`` (below full) from :meth:`forward_features`' output."""
        raise NotImplementedError

    def classifier(self, model: Model, depth: int) -> nn.Module:
        """The classifier module of ``depth`` (below full)."""
        return model.backbone.get_classifier()

    def exit_modules(self) -> List[str]:
        """Name of the backbone module each exit head follows (``group_matcher`` puts the head in its group)."""
        return []

    def embedding_dims(self, model: Model) -> List[int]:
        """Width of ``forward_exits(x, with_features=True).embeddings[k]`` for every depth."""
        raise NotImplementedError

    def feature_pairs(self, out: ExitOutputs, depth: int) -> List[FeaturePair]:
        """(sub-net map, full-net map) pairs at equal resolution for 0-based ``depth`` (feature distillation)."""
        raise NotImplementedError

    def export(self, model: Model, depth: int) -> nn.Module:
        """A standalone copy of what ``depth`` runs (no depth state), in eval mode."""
        raise NotImplementedError


def _final_embedding_dim(model: Model) -> int:
    """The backbone's pre-logits width (``head_hidden_size`` in timm, which differs from
    ``num_features`` for models with a conv head such as MobileNetV3)."""
    return int(getattr(model.backbone, "head_hidden_size", None) or model.backbone.num_features)


# --- exits --------------------------------------------------------------------------------
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


class ExitModel(nn.Module):
    """A pruned timm backbone that ends at feature ``index``, followed by an exit head (an exported depth)."""

    def __init__(self, backbone: nn.Module, head: ExitHead, index: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone.forward_intermediates(x, indices=[self.index], stop_early=True, intermediates_only=True)
        return self.head(feats[-1])


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

    def map_at(self, backbone: nn.Module, x: torch.Tensor, index: int) -> torch.Tensor:
        """The NCHW map at point ``index``; nothing past it runs."""
        raise NotImplementedError

    def maps(
        self, backbone: nn.Module, x: torch.Tensor, indices: Sequence[int]
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """One pass through the whole backbone: its final features (``forward_features``) and the
        NCHW maps at points ``indices``."""
        raise NotImplementedError

    def positions(self, layout: StageLayout) -> List[Optional[Position]]:
        """Where every point lies in ``layout`` (``None``: the stem output)."""
        raise NotImplementedError

    def prune(self, backbone: nn.Module, index: int) -> int:
        """Cut ``backbone`` (a copy) so that nothing past point ``index`` is left (final norm and head
        included); returns the ``feature_info`` index whose ``forward_intermediates`` map is then that point's."""
        raise NotImplementedError


class StagePoints(ExitPoints):
    """``exit_points="stages"``: the backbone's ``feature_info`` entries, run by timm's ``forward_intermediates``."""

    name = "stages"
    what = "feature_info"

    def map_at(self, backbone, x, index):
        return backbone.forward_intermediates(x, indices=[index], stop_early=True, intermediates_only=True)[-1]

    def maps(self, backbone, x, indices):
        return backbone.forward_intermediates(x, indices=list(indices), stop_early=False)

    def positions(self, layout):
        return list(layout.feature_ends)

    def prune(self, backbone, index):
        backbone.prune_intermediate_layers(indices=[index], prune_norm=True, prune_head=True)
        return index


class BlockPoints(ExitPoints):
    """``exit_points="blocks"``: the end of every block of the backbone's :class:`StageLayout`
    (:attr:`~StageLayout.block_ends`), run block by block by the layout.

    Example:
        >>> import timm
        >>> from coopnets.models.layouts import get_layout
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

    def map_at(self, backbone, x, index):
        layout = self.layout
        return layout.to_nchw(layout.run(layout.stem(x), (0, 0), self.ends[index]), x.shape[-2:])

    def maps(self, backbone, x, indices):
        layout, hw = self.layout, x.shape[-2:]  # not a tuple: a Proxy under FX tracing
        h, start, maps = layout.stem(x), (0, 0), []
        for stop in (self.ends[i] for i in indices):
            h, start = layout.run(h, start, stop), stop
            maps.append(layout.to_nchw(h, hw))
        return layout.finish(layout.run(h, start, layout.end)), maps

    def positions(self, layout):
        return layout.block_ends

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


def create_exit_points(exit_points: str, backbone: nn.Module, in_chans: int) -> ExitPoints:
    """The :class:`ExitPoints` named ``exit_points`` (``"stages"`` or ``"blocks"``) of ``backbone``.

    Raises:
        ValueError: an unknown name, or ``"blocks"`` for a backbone without a :class:`StageLayout`.

    Example:
        >>> import timm
        >>> len(create_exit_points("blocks", timm.create_model("resnet18"), in_chans=3).info)
        8
    """
    if exit_points == StagePoints.name:
        return StagePoints(backbone.feature_info)
    if exit_points != BlockPoints.name:
        raise ValueError(f"Unknown exit_points {exit_points!r}; valid choices: {', '.join(EXIT_POINTS)}.")
    try:
        layout = get_layout(backbone, purpose="exit_points='blocks'", instead="exit_points='stages'")
    except NotImplementedError as err:
        raise ValueError(str(err)) from None
    return BlockPoints(layout, in_chans)


class ExitsPlan(DepthPlan):
    """An exit head after each chosen exit point; the backbone's own head last.

    Args:
        points: where exit heads can sit: :class:`StagePoints` (``feature_info`` stages) or
            :class:`BlockPoints` (every block end).
        exit_indices: increasing indices into ``points.info`` (below the last) with an exit
            head. Default (:func:`default_exit_indices`): every point past the stem
            (reduction >= 4), or ``num_exits`` evenly spaced points when all share one
            reduction (ViT-like backbones) or ``num_exits`` is given.
        num_exits: number of exit heads, evenly spaced (default 4 for ViT-like backbones).
        head: exit head kind, ``linear``, ``conv`` or ``auto`` (set by the model).
        head_width: embedding width of ``conv`` heads (default: the backbone's final width).

    Example:
        >>> import timm
        >>> plan = ExitsPlan(StagePoints(timm.create_model("resnet18").feature_info))
        >>> plan.exit_points, plan.exit_indices, plan.num_depths
        ('stages', [1, 2, 3], 4)
    """

    name = "exits"
    config_keys = ("exit_indices", "head", "head_width", "exit_points")

    def __init__(
        self,
        points: ExitPoints,
        exit_indices: Optional[Sequence[int]] = None,
        num_exits: Optional[int] = None,
        head: str = "conv",
        head_width: Optional[int] = None,
    ) -> None:
        info = points.info
        n = len(info)
        nested = nested_exit_indices(info)
        if exit_indices is None:
            chosen = [p for p in default_exit_indices(info, num_exits) if p in nested]
        else:
            chosen = list(exit_indices)
        if any(not isinstance(p, int) or not 0 <= p < n - 1 for p in chosen) or chosen != sorted(set(chosen)):
            raise ValueError(
                f"exit_indices must be increasing {points.what} indices in 0..{n - 2} "
                f"(index {n - 1} is the backbone's own final head), got {chosen}."
            )
        bad = [p for p in chosen if p not in nested]
        if bad:
            raise ValueError(
                f"exit_indices {bad} do not give nested depths: {_not_nested_reason(info, bad[0])}. "
                f"Valid exit_indices: {nested}."
            )
        self.points = points
        self.exit_indices = chosen
        self.head_kind = head
        self.head_width = head_width
        self.num_depths = len(chosen) + 1

    @property
    def exit_points(self) -> str:
        """``"stages"`` or ``"blocks"``: what :attr:`exit_indices` index."""
        return self.points.name

    def build_exits(self, model: Model) -> nn.ModuleList:
        info, final_red = self.points.info, self.points.info[-1]["reduction"]
        return nn.ModuleList(
            ExitHead(info[i]["num_chs"], model.num_classes, kind=self.head_kind, reduction=info[i]["reduction"],
                     final_reduction=final_red, width=self.head_width or model.num_features)
            for i in self.exit_indices
        )

    def exit_modules(self) -> List[str]:
        """The backbone module each exit head reads from (its ``group_matcher`` group follows it)."""
        return [self.points.info[i]["module"] for i in self.exit_indices]

    def exit_positions(self, layout: StageLayout) -> List[Optional[Position]]:
        """Where each exit head's map lies in ``layout`` (early exit resumes there); ``None``: the stem output."""
        ends = self.points.positions(layout)
        return [ends[i] for i in self.exit_indices]

    def config(self) -> Dict[str, Any]:
        cfg: Dict[str, Any] = {"exit_indices": list(self.exit_indices), "head": self.head_kind}
        if self.head_width is not None:
            cfg["head_width"] = self.head_width
        if self.exit_points != StagePoints.name:
            cfg["exit_points"] = self.exit_points
        return cfg

    @staticmethod
    def describe(config):
        where = "feature stages" if config.get("exit_points", StagePoints.name) == StagePoints.name else "block ends"
        return f"an exit head (`{config['head']}`) after {where} {config['exit_indices']}, the backbone's own head last"

    def forward_depth(self, model, x, depth):
        if depth == self.num_depths:
            return model.backbone(x)
        return model.exits[depth - 1](self.points.map_at(model.backbone, x, self.exit_indices[depth - 1]))

    def forward_features(self, model, x, depth):
        """The map of exit ``depth`` after the head's body (``conv``: at the final resolution)."""
        fmap = self.points.map_at(model.backbone, x, self.exit_indices[depth - 1])
        return model.exits[depth - 1].forward_features(fmap)

    def forward_head(self, model, x, depth, pre_logits):
        return model.exits[depth - 1].forward_head(x, pre_logits=pre_logits)

    def classifier(self, model, depth):
        return model.exits[depth - 1].fc

    def forward_exits(self, model, x, with_features):
        indices = self.exit_indices + [len(self.points.info) - 1] if with_features else self.exit_indices
        final, maps = self.points.maps(model.backbone, x, indices)
        out = ExitOutputs(logits=[])
        for head, fmap in zip(model.exits, maps):
            if with_features:
                logits, emb = head.forward_both(fmap)
                out.embeddings.append(emb)
                out.feature_maps.append([fmap])
            else:
                logits = head(fmap)
            out.logits.append(logits)
        out.logits.append(model.backbone.forward_head(final))
        if with_features:
            out.embeddings.append(model.backbone.forward_head(final, pre_logits=True))
            out.feature_maps.append([maps[-1]])
        return out

    def embedding_dims(self, model):
        return [int(head.num_features) for head in model.exits] + [_final_embedding_dim(model)]

    def feature_pairs(self, out, depth):
        """The exit's input map, area-pooled to the resolution of the full net's last map, against that map."""
        target = out.feature_maps[-1][-1]
        return [(F.adaptive_avg_pool2d(out.feature_maps[depth][-1], target.shape[-2:]), target)]

    def export(self, model, depth):
        """Full depth: a copy of the plain backbone. Below: a copy cut after the exit point
        (:meth:`ExitPoints.prune`: timm's ``prune_intermediate_layers`` removes later stages,
        final norm and head) + the exit head."""
        backbone = copy.deepcopy(model.backbone)
        if depth == self.num_depths:
            return backbone.eval()
        index = self.points.prune(backbone, self.exit_indices[depth - 1])
        return ExitModel(backbone, copy.deepcopy(model.exits[depth - 1]), index).eval()


# --- blocks -------------------------------------------------------------------------------
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


class BlocksPlan(DepthPlan):
    """Every depth runs all stages with the first ``n`` blocks of each, and the shared final head.

    Args:
        layout: the backbone's block-level layout.
        block_depths: block counts per stage for every depth, shallowest first, the last
            equal to the full backbone. Default: :func:`default_block_depths`.
        num_block_depths: number of depths of the default schedule.
    """

    name = "blocks"
    config_keys = ("block_depths",)

    def __init__(
        self,
        layout: StageLayout,
        block_depths: Optional[Sequence[Sequence[int]]] = None,
        num_block_depths: int = DEFAULT_BLOCK_DEPTHS,
    ) -> None:
        full = [len(s) for s in layout.stages]
        depths = [list(d) for d in block_depths] if block_depths is not None else default_block_depths(full, num_block_depths)
        problem = None
        if not depths or depths[-1] != full:
            problem = f"the last entry must be the full backbone {full}"
        for d in depths:
            if len(d) != len(full) or any(not 1 <= n <= m for n, m in zip(d, full)):
                problem = f"every entry needs {len(full)} counts with 1 <= count <= {full}"
        if not problem and any(
            a == b or any(x > y for x, y in zip(a, b)) for a, b in zip(depths, depths[1:])
        ):
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
        self.layout = layout
        self.block_depths = depths
        self.num_depths = len(depths)

    def config(self) -> Dict[str, Any]:
        return {"block_depths": [list(d) for d in self.block_depths]}

    @staticmethod
    def describe(config):
        return "every depth runs all stages with the first n blocks of each: " + ", ".join(map(str, config["block_depths"]))

    def _features(self, x: torch.Tensor, depth: int) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        stage_outs = self.layout.run_blocks(self.layout.stem(x), self.block_depths[depth - 1])
        return self.layout.finish(stage_outs[-1]), stage_outs

    def forward_depth(self, model, x, depth):
        return model.backbone.forward_head(self._features(x, depth)[0])

    def forward_features(self, model, x, depth):
        return self._features(x, depth)[0]

    def forward_head(self, model, x, depth, pre_logits):
        return model.backbone.forward_head(x, pre_logits=pre_logits)

    def forward_exits(self, model, x, with_features):
        out = ExitOutputs(logits=[])
        hw = tuple(x.shape[-2:])
        for depth in range(1, self.num_depths + 1):
            final, stage_outs = self._features(x, depth)
            out.logits.append(model.backbone.forward_head(final))
            if with_features:
                out.embeddings.append(model.backbone.forward_head(final, pre_logits=True))
                out.feature_maps.append([self.layout.to_nchw(s, hw) for s in stage_outs])
        return out

    def embedding_dims(self, model):
        return [_final_embedding_dim(model)] * self.num_depths

    def feature_pairs(self, out, depth):
        """Stage by stage: every stage's output at ``depth`` against the full net's."""
        return list(zip(out.feature_maps[depth], out.feature_maps[-1]))

    def export(self, model, depth):
        """A copy of the backbone whose stages keep only their first ``n`` blocks, run by timm's own ``forward``."""
        backbone = copy.deepcopy(model.backbone)
        self.layout.truncate(backbone, self.block_depths[depth - 1])
        return backbone.eval()


PLAN_CLASSES: Dict[str, Type[DepthPlan]] = {"exits": ExitsPlan, "blocks": BlocksPlan}
PLANS: Tuple[str, ...] = tuple(PLAN_CLASSES)


def describe_plan(model_args: Dict[str, Any]) -> str:
    """The plan description of a checkpoint's ``model_args`` (see :meth:`DepthPlan.describe`).

    Example:
        >>> describe_plan({"plan": "blocks", "block_depths": [[1, 1], [2, 2]]})
        'every depth runs all stages with the first n blocks of each: [1, 1], [2, 2]'
    """
    return PLAN_CLASSES[model_args["plan"]].describe(model_args)


def structure_keys() -> Tuple[str, ...]:
    """The ``model_args`` keys that define a model's depth structure (classes, plan and every plan's options)."""
    return ("num_classes", "plan", *dict.fromkeys(k for cls in PLAN_CLASSES.values() for k in cls.config_keys))


def create_plan(
    name: str,
    backbone: nn.Module,
    *,
    exit_indices: Optional[Sequence[int]] = None,
    num_exits: Optional[int] = None,
    head: str = "auto",
    head_width: Optional[int] = None,
    exit_points: str = StagePoints.name,
    block_depths: Optional[Sequence[Sequence[int]]] = None,
    num_block_depths: int = DEFAULT_BLOCK_DEPTHS,
    in_chans: int = 3,
) -> DepthPlan:
    """Build the plan ``name`` for ``backbone`` (whose images have ``in_chans`` channels); an
    unknown name lists the valid plans.

    Options of the other plan must be left at their defaults (a clear error otherwise).
    """
    if name not in PLAN_CLASSES:
        raise ValueError(f"Unknown depth plan {name!r}; valid plans: {', '.join(PLANS)}.")
    if name == "exits":
        if block_depths is not None:
            raise ValueError("block_depths belongs to plan='blocks'; drop it or pass plan='blocks'.")
        kind = head_kind_for(backbone) if head == "auto" else head
        points = create_exit_points(exit_points, backbone, in_chans)
        return ExitsPlan(points, exit_indices, num_exits, kind, head_width)
    if exit_indices is not None or num_exits is not None or exit_points != StagePoints.name:
        raise ValueError("exit_indices/num_exits/exit_points belong to plan='exits'; drop them or pass plan='exits'.")
    return BlocksPlan(get_layout(backbone, purpose="plan='blocks'"), block_depths, num_block_depths)
