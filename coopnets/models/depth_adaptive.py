"""The depth-adaptive model: a timm backbone whose depth is chosen at run time.

A depth plan (:mod:`coopnets.models.plans`) turns one backbone into ``num_depths``
nested sub-networks that share weights: ``plan="exits"`` (default: an exit head after
each stage, the last depth is exactly the plain timm model) or ``plan="blocks"``
(EKD-style: every depth runs all stages with fewer blocks each). The model holds the
backbone, the exit heads and the current depth; everything plan-specific is the plan's.

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
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import timm
import torch
from torch import nn

from .layouts import StageLayout
from .plans import DEFAULT_BLOCK_DEPTHS, BlocksPlan, DepthPlan, ExitOutputs, create_plan


def create_backbone(name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with an error that suggests close names for a typo."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else " See timm.list_models()."
        raise ValueError(f"Unknown timm backbone {name!r}.{hint}")
    return timm.create_model(name, **kwargs)


class DepthAdaptiveModel(nn.Module):
    """A timm backbone that runs at one of ``num_depths`` depths chosen at run time.

    Args:
        backbone: a timm model instance or a timm model name.
        num_classes: classes of every exit (default: the backbone's).
        plan: ``"exits"`` or ``"blocks"`` (see :mod:`coopnets.models.plans`).
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
        self.num_classes = backbone.num_classes
        self.num_features = backbone.num_features
        self.in_chans = self._in_chans(backbone)
        self.backbone_name = backbone.pretrained_cfg.get("architecture", type(backbone).__name__)
        self.pretrained_cfg = dict(backbone.pretrained_cfg)
        self.default_cfg = self.pretrained_cfg
        self.feature_info = [dict(f) for f in backbone.feature_info]
        self.depth_plan: DepthPlan = create_plan(
            plan, backbone, exit_indices=exit_indices, num_exits=num_exits, head=head, head_width=head_width,
            block_depths=block_depths, num_block_depths=num_block_depths,
        )
        self.exits = self.depth_plan.build_exits(self)
        self.num_depths = self.depth_plan.num_depths
        self._depth = self.num_depths

    # --- configuration ----------------------------------------------------------
    @staticmethod
    def _in_chans(backbone: nn.Module) -> int:
        cfg_chans = backbone.pretrained_cfg.get("input_size", (3,))[0]
        for m in backbone.modules():
            if isinstance(m, nn.Conv2d):
                return m.in_channels
        return cfg_chans

    @property
    def plan(self) -> str:
        """Name of the depth plan (``"exits"`` or ``"blocks"``); the plan itself is :attr:`depth_plan`."""
        return self.depth_plan.name

    @property
    def exit_indices(self) -> List[int]:
        """``feature_info`` indices with an exit head (``exits`` plan; empty otherwise)."""
        return list(getattr(self.depth_plan, "exit_indices", []))

    @property
    def head_kind(self) -> Optional[str]:
        """Kind of the exit heads (``exits`` plan; ``None`` otherwise)."""
        return getattr(self.depth_plan, "head_kind", None)

    @property
    def head_width(self) -> Optional[int]:
        return getattr(self.depth_plan, "head_width", None)

    @property
    def block_depths(self) -> List[List[int]]:
        """Block counts per stage of every depth (``blocks`` plan; empty otherwise)."""
        return [list(d) for d in getattr(self.depth_plan, "block_depths", [])]

    @property
    def layout(self) -> StageLayout:
        """Block-level layout of the backbone (raises a clear error for families without one)."""
        if isinstance(self.depth_plan, BlocksPlan):
            return self.depth_plan.layout
        if getattr(self, "_layout", None) is None:
            from .layouts import get_layout

            self._layout = get_layout(self.backbone, purpose=f"plan={self.plan!r}")
        return self._layout

    def model_args(self) -> Dict[str, Any]:
        """Constructor arguments that rebuild this model's exact structure (timm's ``model_args``).

        Example:
            >>> import coopnets
            >>> coopnets.wrap("resnet18", num_classes=10).model_args()
            {'num_classes': 10, 'plan': 'exits', 'exit_indices': [1, 2, 3], 'head': 'conv'}
        """
        return {"num_classes": self.num_classes, "plan": self.plan, **self.depth_plan.config(), **self.backbone_kwargs}

    # --- depth --------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """The depth the next forward pass runs at (1..num_depths)."""
        return self._depth

    def set_depth(self, depth: int) -> "DepthAdaptiveModel":
        """Run the next forward passes at ``depth`` (1..num_depths, or -1 for full). Returns ``self``."""
        self._depth = self.resolve_depth(depth)
        return self

    def resolve_depth(self, depth: int) -> int:
        """``depth`` checked against ``1..num_depths`` (``-1``: full depth); a clear ``ValueError`` otherwise."""
        if isinstance(depth, bool) or not isinstance(depth, int) or not (1 <= depth <= self.num_depths or depth == -1):
            raise ValueError(
                f"depth must be one of the depths 1..{self.num_depths} of this {self.backbone_name} model "
                f"(or -1 for full depth), got {depth!r}."
            )
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
    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ``ValueError`` naming the expected shape unless ``x`` is an (N, in_chans, H, W) tensor."""
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != self.in_chans:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"{type(self).__name__} ({self.backbone_name}) expects images of shape "
                f"(N, {self.in_chans}, H, W), got {shape}."
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the sub-network at the current depth; nothing deeper is executed."""
        self.check_input(x)
        return self.depth_plan.forward_depth(self, x, self._depth)

    def forward_depth(self, x: torch.Tensor, depth: int) -> torch.Tensor:
        """Logits of the sub-network at ``depth`` without changing the model's depth."""
        return self.depth_plan.forward_depth(self, x, self.resolve_depth(depth))

    def forward_exits(self, x: torch.Tensor, with_features: bool = False) -> Union[List[torch.Tensor], ExitOutputs]:
        """Logits of every depth, shallowest first, from one shared backbone pass.

        With ``with_features=True`` returns :class:`ExitOutputs` with pooled embeddings
        and stage feature maps as well (for distillation recipes).
        """
        self.check_input(x)
        out = self.depth_plan.forward_exits(self, x, with_features)
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

    def export(self, depth: int) -> nn.Module:
        """A standalone ``nn.Module`` with only what ``depth`` runs (see :func:`coopnets.inference.export.export_depth`)."""
        return self.depth_plan.export(self, self.resolve_depth(depth))

    def set_depth_for_budget(
        self, latency_ms: float, batch_size: int = 1, input_size: Optional[Sequence[int]] = None, repeats: int = 10
    ) -> "DepthAdaptiveModel":
        """Set the deepest depth whose measured median latency fits ``latency_ms`` (see
        :func:`coopnets.inference.budget.depth_for_latency`); raises ``ValueError`` if none fits. Returns ``self``."""
        from ..inference.budget import depth_for_latency  # thin convenience: inference never imports this module

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
