"""The depth-adaptive model: a timm backbone whose depth is chosen at run time.

Two depth plans turn one backbone into ``num_depths`` nested sub-networks that share
weights:

``plan="exits"`` (default)
    An :class:`ExitHead` after chosen stages (default: every ``feature_info`` stage
    past the stem; evenly spaced blocks for ViT-like models). Depth ``k`` runs the
    stem, stages ``1..k`` (through timm's ``forward_intermediates(...,
    stop_early=True)``, so later stages are never executed) and exit head ``k``. The
    last depth is the plain backbone with its own head: at full depth the logits are
    exactly those of the timm model.

``plan="blocks"``
    Every depth runs all stages but only the first ``n`` blocks of each stage and the
    shared final head: the depth-level sub-networks of EKD (e.g. ResNet-50
    ``[3,4,6,3] -> [2,2,2,2] -> [1,1,1,1]``). Needs a block-level layout
    (:mod:`coopnets.models.layouts`).

The depth is runtime state, not weights: a state dict saved at any depth loads at any
other.

Example:
    >>> import torch, coopnets
    >>> m = coopnets.wrap("resnet18", num_classes=10).eval()
    >>> m.num_depths
    4
    >>> m.set_depth(2)(torch.randn(1, 3, 64, 64)).shape
    torch.Size([1, 10])
    >>> [t.shape[1] for t in m.forward_exits(torch.randn(1, 3, 64, 64))]
    [10, 10, 10, 10]
"""
from __future__ import annotations

import contextlib
import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import timm
import torch
from torch import nn

from .exit_head import ExitHead, head_kind_for
from .layouts import StageLayout, get_layout

PLANS = ("exits", "blocks")
DEFAULT_VIT_EXITS = 4
DEFAULT_BLOCK_DEPTHS = 3


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


def create_backbone(name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with an error that suggests close names for a typo."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else " See timm.list_models()."
        raise ValueError(f"Unknown timm backbone {name!r}.{hint}")
    return timm.create_model(name, **kwargs)


def default_exit_indices(feature_info: Sequence[Dict[str, Any]], num_exits: Optional[int] = None) -> List[int]:
    """``feature_info`` indices that get an exit head (the final head not included).

    Every stage past the stem (reduction >= 4) gets one; when all entries share one
    reduction (ViT-like: one entry per block), ``num_exits`` (default 4) evenly spaced
    blocks are used instead.
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


def default_block_depths(blocks_per_stage: Sequence[int], num_depths: int = DEFAULT_BLOCK_DEPTHS) -> List[List[int]]:
    """EKD-style nested block counts: depth ``d < D`` keeps ``min(n_s, d)`` blocks of each stage.

    ResNet-50 ``[3,4,6,3]`` with ``D=3`` gives ``[1,1,1,1], [2,2,2,2], [3,4,6,3]``;
    duplicates (stages shorter than ``d``) collapse.
    """
    depths: List[List[int]] = []
    for d in range(1, num_depths):
        counts = [min(n, d) for n in blocks_per_stage]
        if counts not in depths and counts != list(blocks_per_stage):
            depths.append(counts)
    depths.append(list(blocks_per_stage))
    return depths


class DepthAdaptiveModel(nn.Module):
    """A timm backbone that runs at one of ``num_depths`` depths chosen at run time.

    Args:
        backbone: a timm model instance or a timm model name.
        num_classes: classes of every exit (default: the backbone's).
        plan: ``"exits"`` or ``"blocks"`` (see module docstring).
        exit_indices: ``feature_info`` indices that get an exit head before the final
            one (``exits`` plan). Default: every stage past the stem, or ``num_exits``
            evenly spaced blocks for ViT-like backbones.
        num_exits: number of depths for ViT-like backbones (default 4).
        head: exit head kind, ``"linear"``, ``"conv"`` or ``"auto"`` (conv for CNNs,
            linear for transformers).
        head_width: embedding width of ``conv`` heads (default: the backbone's final width).
        block_depths: ``blocks`` plan: block counts per stage for every depth,
            shallowest first, the last equal to the full backbone.
        num_block_depths: number of depths of the default ``blocks`` schedule.
        pretrained_backbone: initialise the backbone from timm's own pretrained
            weights (downloads; only when ``backbone`` is a name).
        backbone_kwargs: passed to ``timm.create_model`` when ``backbone`` is a name.

    Example:
        >>> import torch
        >>> m = DepthAdaptiveModel("resnet18", num_classes=10).eval()
        >>> with m.at_depth(1):
        ...     m(torch.randn(1, 3, 64, 64)).shape
        torch.Size([1, 10])
        >>> m.depth
        4
    """

    def __init__(
        self,
        backbone: Union[str, nn.Module],
        num_classes: Optional[int] = None,
        plan: str = "exits",
        exit_indices: Optional[Sequence[int]] = None,
        num_exits: Optional[int] = None,
        head: str = "auto",
        head_width: Optional[int] = None,
        block_depths: Optional[Sequence[Sequence[int]]] = None,
        num_block_depths: int = DEFAULT_BLOCK_DEPTHS,
        pretrained_backbone: bool = False,
        **backbone_kwargs: Any,
    ) -> None:
        super().__init__()
        if plan not in PLANS:
            raise ValueError(f"Unknown depth plan {plan!r}; valid plans: {', '.join(PLANS)}.")
        self.backbone_kwargs = {k: v for k, v in backbone_kwargs.items() if k != "num_classes"}
        if isinstance(backbone, str):
            if num_classes is not None:
                backbone_kwargs["num_classes"] = num_classes
            backbone = create_backbone(backbone, pretrained=pretrained_backbone, **backbone_kwargs)
        elif num_classes is not None and num_classes != backbone.num_classes:
            backbone.reset_classifier(num_classes)
        if not hasattr(backbone, "forward_intermediates") or not getattr(backbone, "feature_info", None):
            raise TypeError(
                f"timm model {type(backbone).__name__} cannot give stages: it lacks feature_info or "
                f"forward_intermediates. Pick a backbone that supports timm's features API "
                f"(e.g. resnet*, convnext*, efficientnet*, vit_*, swin_*, regnet*)."
            )
        self.backbone = backbone
        self.plan = plan
        self.num_classes = backbone.num_classes
        self.num_features = backbone.num_features
        self.in_chans = self._in_chans(backbone)
        self.backbone_name = backbone.pretrained_cfg.get("architecture", type(backbone).__name__)
        self.pretrained_cfg = dict(backbone.pretrained_cfg)
        self.default_cfg = self.pretrained_cfg
        info = [dict(f) for f in backbone.feature_info]
        self.feature_info = info
        self.head_kind = head_kind_for(backbone) if head == "auto" else head
        self.head_width = head_width
        self.exits = nn.ModuleList()
        self.exit_indices: List[int] = []
        self.block_depths: List[List[int]] = []
        self._layout: Optional[StageLayout] = None

        if plan == "exits":
            points = list(exit_indices) if exit_indices is not None else default_exit_indices(info, num_exits)
            self._check_exit_indices(points, len(info))
            self.exit_indices = points
            final_red = info[-1]["reduction"]
            for i in points:
                self.exits.append(
                    ExitHead(
                        info[i]["num_chs"], self.num_classes, kind=self.head_kind,
                        reduction=info[i]["reduction"], final_reduction=final_red,
                        width=head_width or self.num_features,
                    )
                )
            self.num_depths = len(points) + 1
        else:
            layout = self.layout
            full = [len(s) for s in layout.stages]
            depths = [list(d) for d in block_depths] if block_depths is not None else default_block_depths(full, num_block_depths)
            self._check_block_depths(depths, full)
            self.block_depths = depths
            self.num_depths = len(depths)
        self._depth = self.num_depths

    # --- configuration ----------------------------------------------------------
    @staticmethod
    def _in_chans(backbone: nn.Module) -> int:
        cfg_chans = backbone.pretrained_cfg.get("input_size", (3,))[0]
        for m in backbone.modules():
            if isinstance(m, nn.Conv2d):
                return m.in_channels
        return cfg_chans

    @staticmethod
    def _check_exit_indices(points: Sequence[int], n: int) -> None:
        if any(not isinstance(p, int) or not 0 <= p < n - 1 for p in points) or list(points) != sorted(set(points)):
            raise ValueError(
                f"exit_indices must be increasing feature_info indices in 0..{n - 2} "
                f"(index {n - 1} is the backbone's own final head), got {list(points)}."
            )

    @staticmethod
    def _check_block_depths(depths: Sequence[Sequence[int]], full: Sequence[int]) -> None:
        problem = None
        if not depths or list(depths[-1]) != list(full):
            problem = f"the last entry must be the full backbone {list(full)}"
        for d in depths:
            if len(d) != len(full) or any(not 1 <= n <= m for n, m in zip(d, full)):
                problem = f"every entry needs {len(full)} counts with 1 <= count <= {list(full)}"
        if problem:
            raise ValueError(f"Invalid block_depths {list(map(list, depths))}: {problem}.")

    @property
    def layout(self) -> StageLayout:
        """Block-level layout of the backbone (built on first use)."""
        if self._layout is None:
            self._layout = get_layout(self.backbone, purpose=f"plan={self.plan!r}")
        return self._layout

    def coop_config(self) -> Dict[str, Any]:
        """The depth configuration, as stored in ``config.json``'s ``coopnets`` section."""
        return {
            "backbone": self.backbone_name,
            "plan": self.plan,
            "num_depths": self.num_depths,
            "exit_indices": list(self.exit_indices),
            "head": self.head_kind,
            "head_width": self.head_width,
            "block_depths": [list(d) for d in self.block_depths],
            "backbone_kwargs": dict(self.backbone_kwargs),
        }

    # --- depth --------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """The depth the next forward pass runs at (1..num_depths)."""
        return self._depth

    def set_depth(self, depth: int) -> "DepthAdaptiveModel":
        """Run the next forward passes at ``depth`` (1..num_depths, or -1 for full). Returns ``self``."""
        self._depth = self._resolve_depth(depth)
        return self

    def _resolve_depth(self, depth: int) -> int:
        if isinstance(depth, bool) or not isinstance(depth, int) or not (1 <= depth <= self.num_depths or depth == -1):
            raise ValueError(f"depth must be an int in 1..{self.num_depths} (or -1 for full depth), got {depth!r}.")
        return self.num_depths if depth == -1 else depth

    @contextlib.contextmanager
    def at_depth(self, depth: int) -> Iterator["DepthAdaptiveModel"]:
        """Context manager: run at ``depth`` inside the block, restore the previous depth after."""
        previous = self._depth
        self.set_depth(depth)
        try:
            yield self
        finally:
            self._depth = previous

    # --- forward ------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != self.in_chans:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"{type(self).__name__} ({self.backbone_name}) expects images of shape "
                f"(N, {self.in_chans}, H, W), got {shape}."
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the sub-network at the current depth; nothing deeper is executed."""
        self._check_input(x)
        return self.forward_depth(x, self._depth)

    def forward_depth(self, x: torch.Tensor, depth: int) -> torch.Tensor:
        """Logits of the sub-network at ``depth`` without changing the model's depth."""
        depth = self._resolve_depth(depth)
        if self.plan == "blocks":
            return self.backbone.forward_head(self._blocks_features(x, depth)[0])
        if depth == self.num_depths:
            return self.backbone(x)
        feats = self.backbone.forward_intermediates(
            x, indices=[self.exit_indices[depth - 1]], stop_early=True, intermediates_only=True
        )
        return self.exits[depth - 1](feats[-1])

    def _blocks_features(self, x: torch.Tensor, depth: int):
        layout = self.layout
        stage_outs = layout.run_blocks(layout.stem(x), self.block_depths[depth - 1])
        return layout.finish(stage_outs[-1]), stage_outs

    def forward_exits(self, x: torch.Tensor, with_features: bool = False) -> Union[List[torch.Tensor], ExitOutputs]:
        """Logits of every depth, shallowest first, from one shared backbone pass.

        With ``with_features=True`` returns :class:`ExitOutputs` with pooled embeddings
        and stage feature maps as well (for distillation recipes).
        """
        self._check_input(x)
        if self.plan == "blocks":
            out = ExitOutputs(logits=[])
            hw = tuple(x.shape[-2:])
            for depth in range(1, self.num_depths + 1):
                final, stage_outs = self._blocks_features(x, depth)
                out.logits.append(self.backbone.forward_head(final))
                if with_features:
                    out.embeddings.append(self.backbone.forward_head(final, pre_logits=True))
                    out.feature_maps.append([self.layout.to_nchw(s, hw) for s in stage_outs])
            return out if with_features else out.logits
        indices = self.exit_indices + [len(self.feature_info) - 1] if with_features else self.exit_indices
        final, maps = self.backbone.forward_intermediates(x, indices=indices, stop_early=False)
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
        return out if with_features else out.logits

    # --- introspection ------------------------------------------------------------
    def get_classifier(self) -> nn.Module:
        return self.backbone.get_classifier()

    def reset_classifier(self, num_classes: int) -> None:
        """Replace every exit's classifier (and the backbone's) for ``num_classes`` classes."""
        self.backbone.reset_classifier(num_classes)
        for head in self.exits:
            head.reset_classifier(num_classes)
        self.num_classes = num_classes

    def extra_repr(self) -> str:
        return f"plan={self.plan}, num_depths={self.num_depths}, depth={self._depth}"

    # --- cost-adaptive inference (thin wrappers over coopnets.export / coopnets.budget) ---
    def export(self, depth: int) -> nn.Module:
        """A standalone ``nn.Module`` with only what ``depth`` runs (see :func:`coopnets.export.export_depth`)."""
        from ..export import export_depth

        return export_depth(self, depth)

    def set_depth_for_budget(
        self, latency_ms: float, batch_size: int = 1, input_size: Optional[Sequence[int]] = None, repeats: int = 10
    ) -> "DepthAdaptiveModel":
        """Set the deepest depth whose measured median latency fits ``latency_ms`` (see
        :func:`coopnets.budget.depth_for_latency`); raises ``ValueError`` if none fits. Returns ``self``."""
        from ..budget import depth_for_latency

        depth, _ = depth_for_latency(self, latency_ms, batch_size, input_size, repeats=repeats)
        return self.set_depth(depth)


def wrap(backbone: Union[str, nn.Module], num_classes: Optional[int] = None, plan: str = "exits", **kwargs: Any) -> DepthAdaptiveModel:
    """Wrap any timm backbone (name or instance) into a :class:`DepthAdaptiveModel`.

    Example:
        >>> import coopnets
        >>> m = coopnets.wrap("regnety_002", num_classes=10)
        >>> m.num_depths
        4
    """
    return DepthAdaptiveModel(backbone, num_classes=num_classes, plan=plan, **kwargs)
