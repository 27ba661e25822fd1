"""The depth-adaptive model: a timm backbone whose depth is chosen at run time.

A depth plan (:mod:`coopnets.models.plans`) turns one backbone into ``num_depths``
nested sub-networks that share weights: ``plan="exits"`` (default: an exit head after
each stage, or with ``exit_points="blocks"`` after every block; the last depth is exactly
the plain timm model) or ``plan="blocks"`` (EKD-style: every depth runs all stages with
fewer blocks each). The model holds the backbone, the plan's exit heads (as ``exits``)
and the current depth; everything plan-specific, options included, is the plan's.

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
    >>> coopnets.wrap("resnet18", num_classes=10, exit_points="blocks").num_depths  # an exit after every block
    8
"""

import contextlib
import difflib
import numbers
import threading
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import timm
import torch
from torch import nn

from ._timm_api import TimmModelApi
from ._utils import default_input_size
from .layouts import StageLayout, find_layout, get_layout
from .plans import DepthPlan, ExitOutputs, create_plan, split_plan_options


#: backbone kwargs consumed at build time, not part of the structure recorded in ``model_args``
_BUILD_ONLY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "pretrained_strict")


class _ThreadDepths(threading.local):
    """Per thread: the depth each model runs at inside its :meth:`DepthAdaptiveModel.at_depth` blocks."""

    def __init__(self) -> None:
        self.by_model: Dict[int, int] = {}


_THREAD_DEPTHS = _ThreadDepths()


def _is_tracing(x: Any) -> bool:
    """True under FX symbolic tracing or ``torch.jit.trace`` (input checks would branch on proxies)."""
    # under FX symbolic tracing the input of ``forward`` is always a Proxy
    return isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing()


def _as_depth(depth: Any) -> Optional[int]:
    """``depth`` as a Python int if it is integer-like (int, numpy integer, 0-d integer tensor), else ``None``."""
    if isinstance(depth, bool) or type(depth).__name__ == "bool_":  # numpy's bool is no depth either
        return None
    if isinstance(depth, torch.Tensor):
        if depth.ndim != 0 or depth.dtype.is_floating_point or depth.dtype.is_complex or depth.dtype == torch.bool:
            return None
        return int(depth.item())
    if isinstance(depth, numbers.Integral):
        return int(depth)
    return None


def prefixed_cfg(backbone_cfg: Dict[str, Any], classifiers: Sequence[str]) -> Dict[str, Any]:
    """The wrapper's pretrained config: the backbone's, with ``first_conv`` re-prefixed with ``backbone.`` and
    ``classifier`` naming every classifier (the backbone's and each exit head's), as timm's tools expect.

    Example:
        >>> prefixed_cfg({"first_conv": "conv1", "classifier": "fc"}, ["backbone.fc", "exits.0.fc"])
        {'first_conv': 'backbone.conv1', 'classifier': ('backbone.fc', 'exits.0.fc')}
    """
    cfg = dict(backbone_cfg)
    first_conv = cfg.get("first_conv")
    if isinstance(first_conv, str):
        cfg["first_conv"] = "backbone." + first_conv
    elif isinstance(first_conv, (list, tuple)):
        cfg["first_conv"] = tuple("backbone." + f for f in first_conv)
    if classifiers:
        cfg["classifier"] = tuple(classifiers)
    return cfg


def create_backbone(name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with an error that suggests close names for a typo."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else " See timm.list_models()."
        raise ValueError(f"Unknown timm backbone {name!r}.{hint}")
    return timm.create_model(name, **kwargs)


class DepthAdaptiveModel(TimmModelApi):
    """A timm backbone that runs at one of ``num_depths`` depths chosen at run time.

    Args:
        backbone: a timm model instance or a timm model name.
        num_classes: classes of every exit (default: the backbone's).
        plan: ``"exits"`` or ``"blocks"`` (see :mod:`coopnets.models.plans`).
        pretrained_backbone: initialise the backbone from timm's own pretrained
            weights (downloads; only when ``backbone`` is a name). ``pretrained=True`` is
            the same (timm's spelling); a local file works through
            ``pretrained_cfg_overlay=dict(file=...)``.
        **kwargs: the plan's options (the fields of its config dataclass:
            :class:`~coopnets.models.plans.ExitsConfig` -- ``exit_indices``, ``num_exits``,
            ``head``, ``head_width``, ``exit_points``; :class:`~coopnets.models.plans.BlocksConfig`
            -- ``block_depths``, ``num_block_depths``), then the backbone's, passed to
            ``timm.create_model`` when ``backbone`` is a name (``in_chans``, ``img_size``,
            ``drop_rate``, ``global_pool``...). The model keeps none of the plan's options:
            they are :attr:`depth_plan`'s ``config``.

    timm's model contract holds **at the current depth** (:attr:`depth`, full by default):

    * ``forward(x)`` (eval): the current depth's logits; nothing deeper runs.
    * ``forward_features(x)``: the unpooled features the current depth's classifier
      reads. Full depth: exactly ``backbone.forward_features(x)``. Depth ``k`` below full
      (``exits`` plan): the map at exit ``k``'s point (stage or block), after the exit
      head's ``body`` (``conv`` heads: downsampled to the final resolution, ``head_width``
      channels; ``linear`` heads: the map itself), always NCHW. ``blocks`` plan: the
      backbone's final features computed with the depth's blocks.
      ``forward_head(features, pre_logits=False)``: the logits from those features
      (``pre_logits=True``: the pooled embedding), so ``forward == forward_head o
      forward_features`` at every depth.
    * ``num_features`` / ``head_hidden_size`` / ``output_fmt``: the backbone's (what
      full depth produces).
    * ``reset_classifier(num_classes, global_pool=None)``: every exit and the backbone;
      ``0`` leaves identity classifiers (pooled embeddings), ``global_pool=''`` unpooled maps.
    * ``forward_intermediates`` / ``prune_intermediate_layers``: the backbone's (depth
      independent), so ``timm.create_model("coop_resnet18", features_only=True)`` works.
    * ``no_weight_decay`` / ``group_matcher`` / ``set_grad_checkpointing``: the
      backbone's under ``backbone.``; each exit head joins the layer group of the last
      layer of the stage it follows (layer-wise lr decay treats it as that stage).
    * **Training mode, full depth**: ``forward`` runs one shared pass
      (:meth:`forward_exits`) and returns the final logits, exactly the plain backbone's,
      plus a term that is exactly zero but keeps every exit head in the autograd graph
      (``0 * sum(exit logits)``, NaN/inf-safe). Every parameter then gets a gradient
      (zero for exit heads) from any loss on ``model(x)``: timm's backward contract, and
      DDP without ``find_unused_parameters``. The exit heads are *trained* by the
      recipes through :meth:`forward_exits`; set ``model.exits_in_train_graph = False``
      to opt out (then training-mode ``forward`` is ``backbone(x)``; exit BatchNorm
      statistics are not updated either). Below full depth, training-mode ``forward``
      is that depth's sub-network, as in eval.
    * TorchScript and FX: input checks are skipped while scripting or tracing. FX
      traces every depth (and the training-mode pass). A scripted model runs at full
      depth only (it raises otherwise): shallower depths go through timm's
      ``forward_intermediates``, which timm does not make scriptable (ResNet, ViT and
      ConvNeXt all fail ``torch.jit.script``); use FX or ``torch.export`` on
      ``model.export(k)`` for those.

    **Threads.** The depth set by :meth:`set_depth` is the model's, shared by every thread.
    :meth:`at_depth` is per thread: inside the block only the calling thread's forwards
    run at that depth, so concurrent ``with m.at_depth(d)`` blocks never see each other's
    depth. Servers should pass the depth per call (:meth:`forward_depth`).

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
        pretrained_backbone: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        plan_options, backbone_kwargs = split_plan_options(plan, kwargs)
        pretrained_backbone = bool(backbone_kwargs.pop("pretrained", False)) or pretrained_backbone
        self.backbone_kwargs = {
            k: v for k, v in backbone_kwargs.items() if k != "num_classes" and k not in _BUILD_ONLY_KWARGS
        }
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
        self.num_classes: int = backbone.num_classes
        self.num_features: int = backbone.num_features
        self.head_hidden_size: int = int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)
        self.output_fmt: str = str(getattr(backbone, "output_fmt", "NCHW"))
        self.in_chans: int = self._in_chans(backbone, backbone_kwargs.get("in_chans"))
        self.backbone_name = backbone.pretrained_cfg.get("architecture", type(backbone).__name__)
        self.feature_info = [dict(f) for f in backbone.feature_info]
        self.depth_plan: DepthPlan = create_plan(plan, backbone, plan_options, find_layout(backbone), self.in_chans)
        self.exits = self.depth_plan.exits
        if "global_pool" in backbone_kwargs:
            for exit_head in self.exits:
                exit_head.reset_classifier(self.num_classes, backbone_kwargs["global_pool"])
        self.num_depths: int = self.depth_plan.num_depths
        self._depth: int = self.num_depths
        #: training-mode full-depth forward keeps the exit heads in the graph (see the class docstring)
        self.exits_in_train_graph: bool = True
        self.pretrained_cfg = prefixed_cfg(backbone.pretrained_cfg, self.classifier_names())
        self.default_cfg = self.pretrained_cfg

    # --- configuration ----------------------------------------------------------
    __jit_unused_properties__ = ["plan", "layout", "depth", "default_input_size"]

    @staticmethod
    def _in_chans(backbone: nn.Module, requested: Optional[int] = None) -> int:
        """Image channels from the model's own config: the ``in_chans`` it was built with, else its
        ``in_chans`` attribute, else ``pretrained_cfg['input_size'][0]`` (never the first conv, which
        need not read the image directly, e.g. TResNet's space-to-depth stem)."""
        if requested is not None:
            return int(requested)
        if isinstance(getattr(backbone, "in_chans", None), int):
            return int(backbone.in_chans)
        return int(backbone.pretrained_cfg.get("input_size", (3,))[0])

    def classifier_names(self) -> List[str]:
        """Parameter-module names of every classifier: the backbone's (``pretrained_cfg['classifier']``,
        re-prefixed) and each exit head's ``fc``.

        Example:
            >>> import coopnets
            >>> coopnets.wrap("resnet18", num_classes=10).classifier_names()
            ['backbone.fc', 'exits.0.fc', 'exits.1.fc', 'exits.2.fc']
        """
        own = self.backbone.pretrained_cfg.get("classifier") or ()
        own = [own] if isinstance(own, str) else list(own)
        return ["backbone." + c for c in own] + [f"exits.{k}.fc" for k in range(len(self.exits))]

    @property
    def plan(self) -> str:
        """Name of the depth plan (``"exits"`` or ``"blocks"``); the plan itself, options included, is :attr:`depth_plan`."""
        return self.depth_plan.name

    @property
    def layout(self) -> StageLayout:
        """The backbone's one block-level layout (a clear error for families without one)."""
        return self.depth_plan.layout or get_layout(self.backbone, purpose="model.layout")

    @property
    def default_input_size(self) -> Tuple[int, int, int]:
        """(C, H, W) this model is profiled, traced and exported at when nothing else is said
        (:func:`coopnets.models._utils.default_input_size` of its ``pretrained_cfg``)."""
        return default_input_size(self.pretrained_cfg, self.in_chans)

    def model_args(self) -> Dict[str, Any]:
        """Constructor arguments that rebuild this model's exact structure (timm's ``model_args``): the
        classes, the plan, its resolved config's dict and the backbone kwargs.

        Example:
            >>> import coopnets
            >>> coopnets.wrap("resnet18", num_classes=10).model_args()
            {'num_classes': 10, 'plan': 'exits', 'exit_indices': [1, 2, 3], 'head': 'mlp'}
        """
        return {"num_classes": self.num_classes, "plan": self.plan, **self.depth_plan.config.model_args(),
                **self.backbone_kwargs}

    # --- depth --------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """The depth the next forward pass of this thread runs at (1..num_depths)."""
        return self._current_depth()

    def set_depth(self, depth: int) -> "DepthAdaptiveModel":
        """Run the next forward passes (every thread's, outside :meth:`at_depth`) at ``depth``
        (1..num_depths, or -1 for full). Returns ``self``."""
        self._depth = self.resolve_depth(depth)
        return self

    def resolve_depth(self, depth: int) -> int:
        """``depth`` checked against ``1..num_depths`` (``-1``: full depth); a clear ``ValueError`` otherwise.

        Integer-like values are accepted (numpy integers, 0-d integer tensors); bools, floats and
        strings are not.

        Example:
            >>> import numpy as np, torch, coopnets
            >>> m = coopnets.wrap("resnet18")
            >>> m.resolve_depth(np.int64(2)), m.resolve_depth(torch.tensor(3)), m.resolve_depth(-1)
            (2, 3, 4)
        """
        value = _as_depth(depth)
        if value is None or not (1 <= value <= self.num_depths or value == -1):
            raise ValueError(
                f"depth must be one of the depths 1..{self.num_depths} of this {self.backbone_name} model "
                f"(or -1 for full depth), got {depth!r}."
            )
        return self.num_depths if value == -1 else value

    @contextlib.contextmanager
    def at_depth(self, depth: int) -> Iterator["DepthAdaptiveModel"]:
        """Context manager: this thread's forwards run at ``depth`` inside the block (other threads keep
        theirs); the previous depth is back after it. Blocks nest."""
        overrides = _THREAD_DEPTHS.by_model
        key, resolved = id(self), self.resolve_depth(depth)
        previous = overrides.get(key)
        overrides[key] = resolved
        try:
            yield self
        finally:
            if previous is None:
                del overrides[key]
            else:
                overrides[key] = previous

    # --- forward ------------------------------------------------------------------
    @torch.jit.unused
    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ``ValueError`` naming the expected shape and dtype unless ``x`` is a floating-point
        (N, in_chans, H, W) tensor."""
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != self.in_chans:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"{type(self).__name__} ({self.backbone_name}) expects images of shape "
                f"(N, {self.in_chans}, H, W), got {shape}."
            )
        if not x.dtype.is_floating_point:
            cfg = self.pretrained_cfg
            raise ValueError(
                f"{type(self).__name__} ({self.backbone_name}) input dtype {x.dtype}: it takes float images normalised "
                f"as it was trained (mean {cfg.get('mean')}, std {cfg.get('std')}); convert uint8 pixels with "
                f"x.float() / 255 and normalise (timm.data.resolve_data_config(model=m) + create_transform does both)."
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the sub-network at the current depth; nothing deeper is executed.

        In training mode at full depth the exit heads also run (one shared pass) and join the
        graph through an exactly-zero term; see the class docstring.
        """
        if torch.jit.is_scripting():
            if self._depth != self.num_depths:
                raise RuntimeError(
                    "A scripted DepthAdaptiveModel runs at full depth only; set_depth(-1) before scripting, "
                    "or use FX / torch.export on model.export(depth)."
                )
            return self.backbone(x)
        if not _is_tracing(x):
            self.check_input(x)
        return self._forward_at(x, self._current_depth())

    @torch.jit.unused
    def _current_depth(self) -> int:
        overrides = _THREAD_DEPTHS.by_model
        return overrides.get(id(self), self._depth) if overrides else self._depth

    @torch.jit.unused
    def _forward_at(self, x: torch.Tensor, depth: int) -> torch.Tensor:
        if depth == self.num_depths:
            if self.training and self.exits_in_train_graph and len(self.exits) > 0:
                return self._forward_train_full(x)
            return self.backbone(x)
        return self.depth_plan.forward_depth(x, depth)

    @torch.jit.unused
    def _forward_train_full(self, x: torch.Tensor) -> torch.Tensor:
        """Final logits from one shared pass, plus an exactly-zero term through every exit's logits."""
        logits = self.depth_plan.forward_exits(x, False).logits
        zero = torch.stack([exit_logits.sum() for exit_logits in logits[:-1]]).sum().mul(0.0)
        return logits[-1] + torch.nan_to_num(zero, nan=0.0, posinf=0.0, neginf=0.0)

    def forward_depth(self, x: torch.Tensor, depth: int) -> torch.Tensor:
        """Logits of the sub-network at ``depth``, without reading or changing the model's depth (thread-safe)."""
        return self.depth_plan.forward_depth(x, self.resolve_depth(depth))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Unpooled features the current depth's classifier reads (full depth: ``backbone.forward_features``).

        Example:
            >>> import torch, coopnets
            >>> m = coopnets.wrap("resnet18", num_classes=10).eval()
            >>> m.forward_features(torch.randn(1, 3, 64, 64)).shape
            torch.Size([1, 512, 2, 2])
            >>> with m.at_depth(1):
            ...     m.forward_head(m.forward_features(torch.randn(1, 3, 64, 64))).shape
            torch.Size([1, 10])
        """
        depth = self._current_depth()
        if depth == self.num_depths:
            return self.backbone.forward_features(x)
        return self.depth_plan.forward_features(x, depth)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Logits (``pre_logits=True``: the pooled embedding) from :meth:`forward_features`' output at the current depth."""
        depth = self._current_depth()
        if depth == self.num_depths:
            return self.backbone.forward_head(x, pre_logits=pre_logits)
        return self.depth_plan.forward_head(x, depth, pre_logits)

    def forward_exits(self, x: torch.Tensor, with_features: bool = False) -> Union[List[torch.Tensor], ExitOutputs]:
        """Logits of every depth, shallowest first, from one shared backbone pass.

        With ``with_features=True`` returns :class:`ExitOutputs` with pooled embeddings
        and stage feature maps as well (for distillation recipes).
        """
        self.check_input(x)
        out = self.depth_plan.forward_exits(x, with_features)
        return out if with_features else out.logits

    # --- introspection ------------------------------------------------------------
    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The classifier of the current depth (full depth: the backbone's)."""
        depth = self._current_depth()
        if depth == self.num_depths or not len(self.exits):
            return self.backbone.get_classifier()
        return self.depth_plan.classifier(depth)

    def extra_repr(self) -> str:
        return f"plan={self.plan}, num_depths={self.num_depths}, depth={self._depth}"

    def export(self, depth: int) -> nn.Module:
        """A standalone ``nn.Module`` with only what ``depth`` runs (see :func:`coopnets.inference.export.export_depth`)."""
        return self.depth_plan.export(self.resolve_depth(depth))


def wrap(backbone: Union[str, nn.Module], num_classes: Optional[int] = None, plan: str = "exits", **kwargs: Any) -> DepthAdaptiveModel:
    """Wrap any timm backbone (name or instance) into a :class:`DepthAdaptiveModel`.

    ``pretrained=True`` means timm's pretrained weights for the backbone (``pretrained_backbone``);
    the exit heads start untrained.

    Example:
        >>> import coopnets
        >>> m = coopnets.wrap("regnety_002", num_classes=10)
        >>> m.num_depths
        4
    """
    return DepthAdaptiveModel(backbone, num_classes=num_classes, plan=plan, **kwargs)
