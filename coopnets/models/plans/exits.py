"""The ``exits`` plan (default): an exit head after chosen exit points, the backbone's own head last.

Depth ``k`` below full runs the backbone to exit point ``k`` (the plan's runner:
:meth:`~coopnets.models.runners.Runner.map_at`) and exit head ``k``; full depth is exactly
the plain timm model. ``exit_points="stages"`` (default) puts the points at the
``feature_info`` stages, ``exit_points="blocks"`` after every block
(:mod:`coopnets.models.plans.exit_points`).

Example:
    >>> import coopnets
    >>> plan = coopnets.wrap("resnet18", num_classes=10).depth_plan
    >>> plan.config
    ExitsConfig(exit_indices=[1, 2, 3], num_exits=None, head='mlp', head_width=None, exit_points='stages')
    >>> plan.config.model_args(), plan.num_depths, plan.runner.kind
    ({'exit_indices': [1, 2, 3], 'head': 'mlp'}, 4, 'layout')
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..exit_head import EXIT_HEAD_KINDS, ExitHead, head_kind_for
from ..layouts import LAYOUT_FAMILIES, StageLayout
from ..runners import Runner, build_segments
from .base import DepthPlan, ExitOutputs, PlanConfig, int_list, option_error
from .exit_points import EXIT_POINTS, StagePoints, _not_nested_reason, create_exit_points, default_exit_indices, nested_exit_indices


@dataclass
class ExitsConfig(PlanConfig):
    """Options of the ``exits`` plan.

    Attributes:
        exit_indices: increasing exit-point indices (below the last) with an exit head:
            ``feature_info`` indices, or block-end indices with ``exit_points="blocks"``.
            Default: every point past the stem (reduction >= 4), or ``num_exits`` evenly
            spaced points for ViT-like backbones (all points of one reduction).
        num_exits: number of evenly spaced exit heads (default 4 for ViT-like backbones).
        head: exit head kind (:data:`~coopnets.models.exit_head.EXIT_HEAD_KINDS`: ``linear``, ``conv``,
            ``reduce``, ``mixpool``, ``mlp``) or ``auto``: the family's measured default
            (:func:`~coopnets.models.exit_head.head_kind_for`; ``linear`` for transformers).
        head_width: the heads' own width (:class:`~coopnets.models.exit_head.ExitHead`'s ``width``: a ``conv``
            head's output, default the backbone's final width; a ``reduce`` head's 1x1 convolution; an ``mlp``
            head's hidden layer).
        exit_points: ``stages`` or ``blocks`` (see :mod:`coopnets.models.plans.exit_points`).
    """

    exit_indices: Optional[List[int]] = None
    num_exits: Optional[int] = field(default=None, metadata={"schedule": True})
    head: str = "auto"
    head_width: Optional[int] = None
    exit_points: str = StagePoints.name

    def __post_init__(self) -> None:
        if self.exit_indices is not None:
            self.exit_indices = int_list("exits", "exit_indices", self.exit_indices)
        for name in ("num_exits", "head_width"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise option_error("exits", name, value, "must be an int >= 1 or None")
        if self.head not in ("auto", *EXIT_HEAD_KINDS):
            raise option_error("exits", "head", self.head, f"valid kinds: auto, {', '.join(EXIT_HEAD_KINDS)}")
        if self.exit_points not in EXIT_POINTS:
            raise ValueError(f"Unknown exit_points {self.exit_points!r}; valid choices: {', '.join(EXIT_POINTS)}.")


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


def _choose_indices(info: Sequence[Dict[str, Any]], config: ExitsConfig, what: str) -> List[int]:
    """The exit indices of ``config`` (or the default ones) checked against the points ``info``."""
    n, nested = len(info), nested_exit_indices(info)
    if config.exit_indices is None:
        return [p for p in default_exit_indices(info, config.num_exits) if p in nested]
    chosen = list(config.exit_indices)
    if any(not 0 <= p < n - 1 for p in chosen) or chosen != sorted(set(chosen)):
        raise ValueError(
            f"exit_indices must be increasing {what} indices in 0..{n - 2} "
            f"(index {n - 1} is the backbone's own final head), got {chosen}."
        )
    bad = [p for p in chosen if p not in nested]
    if bad:
        raise ValueError(
            f"exit_indices {bad} do not give nested depths: {_not_nested_reason(info, bad[0])}. "
            f"Valid exit_indices: {nested}."
        )
    return chosen


class ExitsPlan(DepthPlan):
    """An exit head after each chosen exit point; the backbone's own head last (see the module docstring).

    Args:
        backbone: the timm backbone (``num_classes``/``num_features`` size the heads).
        config: the plan's options.
        layout: the backbone's :class:`StageLayout` (``None``: its family has none).
        in_chans: image channels (block exit points probe their shapes on such an image).
    """

    name = "exits"
    config_cls = ExitsConfig
    config: ExitsConfig

    def __init__(self, backbone: nn.Module, config: ExitsConfig, layout: Optional[StageLayout], in_chans: int) -> None:
        super().__init__(backbone, layout)
        self.points = create_exit_points(config.exit_points, backbone, layout, in_chans)
        indices = _choose_indices(self.points.info, config, self.points.what)
        kind = head_kind_for(backbone) if config.head == "auto" else config.head
        self.config = replace(config, exit_indices=indices, head=kind, num_exits=None)
        self.num_depths = len(indices) + 1
        info, final_red = self.points.info, self.points.info[-1]["reduction"]
        self.exits = nn.ModuleList(
            ExitHead(info[i]["num_chs"], backbone.num_classes, kind=kind, reduction=info[i]["reduction"],
                     final_reduction=final_red, width=config.head_width, final_width=backbone.num_features)
            for i in indices
        )
        self._runner = self.points.runner(indices)
        self._segments: Dict[Tuple[int, ...], Runner] = {}

    @staticmethod
    def describe(model_args):
        where = "feature stages" if model_args.get("exit_points", StagePoints.name) == StagePoints.name else "block ends"
        return f"an exit head (`{model_args['head']}`) after {where} {model_args['exit_indices']}, the backbone's own head last"

    # --- running ------------------------------------------------------------------
    @property
    def runner(self) -> Runner:
        return self._runner

    def early_exit_runner(self, image_size: Sequence[int]) -> Runner:
        """The plan's own runner when it can resume a pass (a stage layout); else the backbone's traced
        segments (:func:`~coopnets.models.runners.build_segments`), built once for ``image_size``, or once
        for every size when the trace is shape-agnostic."""
        if self._runner.resumable:
            return self._runner
        key = tuple(int(s) for s in image_size)
        if key not in self._segments:
            reusable = [r for r in self._segments.values() if not r.size_specific]
            if reusable:
                self._segments[key] = reusable[0]
            else:
                name = self.backbone.pretrained_cfg.get("architecture", type(self.backbone).__name__)
                try:
                    self._segments[key] = build_segments(self.backbone, self.config.exit_indices, key, name)
                except ValueError as err:
                    raise ValueError(
                        f"Early exit with compaction cannot run {name}: it has no hand-written stage layout "
                        f"({', '.join(LAYOUT_FAMILIES)}) and {err} Evaluate the policy without the savings with "
                        f"EarlyExit.simulate(model.forward_exits(x)) or coopnets.inference.simulate."
                    ) from None
        return self._segments[key]

    def forward_depth(self, x, depth):
        if depth == self.num_depths:
            return self.backbone(x)
        return self.exits[depth - 1](self._runner.map_at(x, depth - 1))

    def forward_features(self, x, depth):
        """The map of exit ``depth`` after the head's body (``conv``: at the final resolution)."""
        return self.exits[depth - 1].forward_features(self._runner.map_at(x, depth - 1))

    def forward_head(self, x, depth, pre_logits):
        return self.exits[depth - 1].forward_head(x, pre_logits=pre_logits)

    def classifier(self, depth):
        return self.exits[depth - 1].fc

    def forward_exits(self, x, with_features):
        final, maps = self._runner.run_all(x, final_map=with_features)
        out = ExitOutputs(logits=[])
        for head, fmap in zip(self.exits, maps):
            if with_features:
                logits, emb = head.forward_both(fmap)
                out.embeddings.append(emb)
                out.feature_maps.append([fmap])
            else:
                logits = head(fmap)
            out.logits.append(logits)
        out.logits.append(self.backbone.forward_head(final))
        if with_features:
            out.embeddings.append(self.backbone.forward_head(final, pre_logits=True))
            out.feature_maps.append([maps[-1]])
        return out

    # --- training and export ---------------------------------------------------------
    def exit_modules(self) -> List[str]:
        """The backbone module each exit head reads from (its ``group_matcher`` group follows it)."""
        return [self.points.info[i]["module"] for i in self.config.exit_indices]

    def embedding_dims(self):
        return [int(head.num_features) for head in self.exits] + [self.final_embedding_dim()]

    def feature_pairs(self, out, depth):
        """The exit's input map, area-pooled to the resolution of the full net's last map, against that map."""
        target = out.feature_maps[-1][-1]
        return [(F.adaptive_avg_pool2d(out.feature_maps[depth][-1], target.shape[-2:]), target)]

    def export(self, depth):
        """Full depth: a copy of the plain backbone. Below: a copy cut after the exit point
        (:meth:`~coopnets.models.plans.exit_points.ExitPoints.prune`: timm's ``prune_intermediate_layers``
        removes later stages, final norm and head) + the exit head."""
        backbone = copy.deepcopy(self.backbone)
        if depth == self.num_depths:
            return backbone.eval()
        index = self.points.prune(backbone, self.config.exit_indices[depth - 1])
        return ExitModel(backbone, copy.deepcopy(self.exits[depth - 1]), index).eval()
