"""The depth-adaptive model: a timm backbone whose depth is chosen at run time.

A depth plan (:mod:`coopnets.models.plans`) turns one backbone into ``num_depths``
nested sub-networks that share weights: ``plan="exits"`` (default: an exit head after
each stage, or with ``exit_points="blocks"`` after every block; the last depth is exactly
the plain timm model) or ``plan="blocks"`` (EKD-style: every depth runs all stages with
fewer blocks each). The model holds the backbone, the exit heads and the current depth;
everything plan-specific is the plan's.

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
import re
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union

import timm
import torch
from torch import nn

from .layouts import StageLayout, get_layout
from .plans import DEFAULT_BLOCK_DEPTHS, BlocksPlan, DepthPlan, ExitOutputs, ExitsPlan, StagePoints, create_plan


#: backbone kwargs consumed at build time, not part of the structure recorded in ``model_args``
_BUILD_ONLY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "pretrained_strict")


def _is_tracing(x: Any) -> bool:
    """True under FX symbolic tracing or ``torch.jit.trace`` (input checks would branch on proxies)."""
    # under FX symbolic tracing the input of ``forward`` is always a Proxy
    return isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing()


def _as_depth(depth: Any) -> Optional[int]:
    """``depth`` as a Python int if it is integer-like (int, numpy integer, 0-d integer tensor), else ``None``."""
    if isinstance(depth, (bool, np_bool_types())):
        return None
    if isinstance(depth, torch.Tensor):
        if depth.ndim != 0 or depth.dtype.is_floating_point or depth.dtype.is_complex or depth.dtype == torch.bool:
            return None
        return int(depth.item())
    if isinstance(depth, numbers.Integral):
        return int(depth)
    return None


def np_bool_types() -> Tuple[type, ...]:
    """numpy's bool type when numpy is installed (a numpy bool is not a depth)."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return ()
    return (np.bool_,)


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


def _prefix_pattern(pattern: str) -> str:
    r"""A timm ``group_matcher`` regex for backbone parameter names, re-anchored under ``backbone.``.

    Example:
        >>> _prefix_pattern(r"^conv1|bn1|^maxpool")
        '^backbone\\.(?:conv1|bn1|maxpool)'
    """
    body = re.sub(r"(^|\||\()\^", r"\1", pattern)
    return r"^backbone\.(?:" + body + ")"


def _compile_matcher(matcher: Dict[str, Any]) -> List[Tuple["re.Pattern[str]", Tuple[float, ...], Optional[Tuple[float, ...]]]]:
    """timm's dict ``group_matcher`` compiled as ``timm.models._manipulate.group_with_matcher`` does."""
    compiled = []
    for ordinal, spec in enumerate(matcher.values()):
        if spec is None:
            continue
        for pattern, suffix in (spec if isinstance(spec, (list, tuple)) else [(spec, None)]):
            compiled.append((re.compile(pattern), (float(ordinal),), suffix))
    return compiled


def _group_key(compiled: List[Any], name: str) -> Tuple[float, ...]:
    """The sort key timm gives parameter ``name`` (unmatched: the largest, i.e. the head group)."""
    for regex, prefix, suffix in compiled:
        match = regex.match(name)
        if match:
            parts = [prefix, match.groups(), suffix]
            return tuple(float(v) for part in parts if part for v in part)
    return (float("inf"),)


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
        exit_indices: exit points that get an exit head before the final one (``exits``
            plan), as indices into ``feature_info`` (``exit_points="stages"``) or into the
            backbone's block ends (``exit_points="blocks"``). Default: every point past the
            stem, or ``num_exits`` evenly spaced points for ViT-like backbones.
        num_exits: number of exit heads, evenly spaced (default 4 for ViT-like backbones).
        head: exit head kind, ``"linear"``, ``"conv"`` or ``"auto"`` (conv for CNNs,
            linear for transformers).
        head_width: embedding width of ``conv`` heads (default: the backbone's final width).
        exit_points: where exit heads can sit (``exits`` plan): ``"stages"`` (default, the
            ``feature_info`` stages) or ``"blocks"`` (the end of every block, e.g. 8 points
            on ResNet-18 as in MLCSD-Net; needs a block-level
            :class:`~coopnets.models.layouts.StageLayout`). Depth ``k`` runs the backbone up
            to exit point ``k`` and exit head ``k``.
        block_depths: ``blocks`` plan: block counts per stage for every depth,
            shallowest first, the last equal to the full backbone.
        num_block_depths: number of depths of the default ``blocks`` schedule.
        pretrained_backbone: initialise the backbone from timm's own pretrained
            weights (downloads; only when ``backbone`` is a name). ``pretrained=True`` is
            the same (timm's spelling); a local file works through
            ``pretrained_cfg_overlay=dict(file=...)``.
        backbone_kwargs: passed to ``timm.create_model`` when ``backbone`` is a name
            (``in_chans``, ``img_size``, ``drop_rate``, ``global_pool``...).

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
        exit_points: str = StagePoints.name,
        block_depths: Optional[Sequence[Sequence[int]]] = None,
        num_block_depths: int = DEFAULT_BLOCK_DEPTHS,
        pretrained_backbone: bool = False,
        **backbone_kwargs: Any,
    ) -> None:
        super().__init__()
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
        self.depth_plan: DepthPlan = create_plan(
            plan, backbone, exit_indices=exit_indices, num_exits=num_exits, head=head, head_width=head_width,
            exit_points=exit_points, block_depths=block_depths, num_block_depths=num_block_depths,
            in_chans=self.in_chans,
        )
        self.exits = self.depth_plan.build_exits(self)
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
    __jit_unused_properties__ = [
        "plan", "exit_indices", "exit_points", "head_kind", "head_width", "block_depths", "layout", "depth",
    ]

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
        """Name of the depth plan (``"exits"`` or ``"blocks"``); the plan itself is :attr:`depth_plan`."""
        return self.depth_plan.name

    @property
    def exit_indices(self) -> List[int]:
        """Exit points with an exit head (``exits`` plan; empty otherwise): ``feature_info`` indices, or
        block-end indices with ``exit_points="blocks"``."""
        return list(getattr(self.depth_plan, "exit_indices", []))

    @property
    def exit_points(self) -> Optional[str]:
        """What :attr:`exit_indices` index, ``"stages"`` or ``"blocks"`` (``exits`` plan; ``None`` otherwise)."""
        return getattr(self.depth_plan, "exit_points", None)

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
            self._layout = get_layout(self.backbone, purpose="model.layout")
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
        """Context manager: run at ``depth`` inside the block, restore the previous depth after."""
        previous = self._depth
        self.set_depth(depth)
        try:
            yield self
        finally:
            self._depth = previous

    # --- forward ------------------------------------------------------------------
    @torch.jit.unused
    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ``ValueError`` naming the expected shape unless ``x`` is an (N, in_chans, H, W) tensor."""
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != self.in_chans:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"{type(self).__name__} ({self.backbone_name}) expects images of shape "
                f"(N, {self.in_chans}, H, W), got {shape}."
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
        if self._depth == self.num_depths:
            if self.training and self.exits_in_train_graph and len(self.exits) > 0:
                return self._forward_train_full(x)
            return self.backbone(x)
        return self._forward_python(x, self._depth)

    @torch.jit.unused
    def _forward_python(self, x: torch.Tensor, depth: int) -> torch.Tensor:
        return self.depth_plan.forward_depth(self, x, depth)

    @torch.jit.unused
    def _forward_train_full(self, x: torch.Tensor) -> torch.Tensor:
        """Final logits from one shared pass, plus an exactly-zero term through every exit's logits."""
        logits = self.depth_plan.forward_exits(self, x, False).logits
        zero = torch.stack([exit_logits.sum() for exit_logits in logits[:-1]]).sum().mul(0.0)
        return logits[-1] + torch.nan_to_num(zero, nan=0.0, posinf=0.0, neginf=0.0)

    def forward_depth(self, x: torch.Tensor, depth: int) -> torch.Tensor:
        """Logits of the sub-network at ``depth`` without changing the model's depth."""
        return self.depth_plan.forward_depth(self, x, self.resolve_depth(depth))

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
        if self._depth == self.num_depths:
            return self.backbone.forward_features(x)
        return self.depth_plan.forward_features(self, x, self._depth)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Logits (``pre_logits=True``: the pooled embedding) from :meth:`forward_features`' output at the current depth."""
        if self._depth == self.num_depths:
            return self.backbone.forward_head(x, pre_logits=pre_logits)
        return self.depth_plan.forward_head(self, x, self._depth, pre_logits)

    @torch.jit.ignore
    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """The backbone's ``forward_intermediates`` (timm's signature; independent of the depth).

        Example:
            >>> import torch, coopnets
            >>> m = coopnets.wrap("resnet18")
            >>> [t.shape[1] for t in m.forward_intermediates(torch.randn(1, 3, 64, 64), intermediates_only=True)]
            [64, 64, 128, 256, 512]
        """
        return self.backbone.forward_intermediates(
            x, indices=indices, norm=norm, stop_early=stop_early, output_fmt=output_fmt,
            intermediates_only=intermediates_only,
        )

    @torch.jit.ignore
    def prune_intermediate_layers(
        self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> List[int]:
        """Prune the backbone past the kept ``indices`` (timm's ``prune_intermediate_layers``) and drop every
        exit head: what is left is a feature extractor (one depth, :meth:`forward_intermediates`).
        Returns the kept indices."""
        kept = self.backbone.prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)
        self.exits = nn.ModuleList()
        self.depth_plan = ExitsPlan(StagePoints(self.feature_info), exit_indices=[], head=self.head_kind or "linear")
        self.num_depths = self._depth = 1
        return kept

    def forward_exits(self, x: torch.Tensor, with_features: bool = False) -> Union[List[torch.Tensor], ExitOutputs]:
        """Logits of every depth, shallowest first, from one shared backbone pass.

        With ``with_features=True`` returns :class:`ExitOutputs` with pooled embeddings
        and stage feature maps as well (for distillation recipes).
        """
        self.check_input(x)
        out = self.depth_plan.forward_exits(self, x, with_features)
        return out if with_features else out.logits

    # --- introspection ------------------------------------------------------------
    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The classifier of the current depth (full depth: the backbone's)."""
        if self._depth == self.num_depths or not len(self.exits):
            return self.backbone.get_classifier()
        return self.depth_plan.classifier(self, self._depth)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace every exit's classifier (and the backbone's) for ``num_classes`` classes.

        ``num_classes=0`` leaves identity classifiers (outputs are pooled embeddings);
        ``global_pool=''`` also drops pooling (unpooled maps), as in timm. ``None`` keeps the pooling.

        Example:
            >>> import torch, coopnets
            >>> m = coopnets.wrap("resnet18").eval()
            >>> m.reset_classifier(0, "")
            >>> [m.forward_depth(torch.randn(1, 3, 64, 64), d).shape[1:] for d in (1, 4)]
            [torch.Size([512, 2, 2]), torch.Size([512, 2, 2])]
        """
        if global_pool is None:
            self.backbone.reset_classifier(num_classes)
        else:
            self.backbone.reset_classifier(num_classes, global_pool)
        for head in self.exits:
            head.reset_classifier(num_classes, global_pool)
        self.num_classes = num_classes

    # --- timm training hooks --------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """The backbone's ``no_weight_decay()`` names under ``backbone.`` (timm's optimizer factory reads it)."""
        names = self.backbone.no_weight_decay() if hasattr(self.backbone, "no_weight_decay") else set()
        return {"backbone." + n for n in names}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """The backbone's layer grouping re-prefixed with ``backbone.``; exit head ``k`` joins the group of the
        last layer of the stage (or block, with ``exit_points="blocks"``) it follows, so layer-wise lr decay
        treats it as that stage.

        Example:
            >>> import coopnets
            >>> from timm.models import group_parameters
            >>> m = coopnets.wrap("resnet18")
            >>> groups = group_parameters(m, m.group_matcher(coarse=True))
            >>> [k for k, names in groups.items() if "exits.0.fc.weight" in names] == [
            ...     k for k, names in groups.items() if "backbone.layer1.1.bn2.weight" in names]
            True
        """
        if not hasattr(self.backbone, "group_matcher"):
            raise NotImplementedError(f"timm backbone {self.backbone_name} has no group_matcher.")
        matcher: Dict[str, Any] = {}
        for group, spec in self.backbone.group_matcher(coarse=coarse).items():
            if spec is None:
                matcher[group] = None
            elif isinstance(spec, (list, tuple)):
                matcher[group] = [(_prefix_pattern(p), suffix) for p, suffix in spec]
            else:
                matcher[group] = [(_prefix_pattern(spec), None)]
        compiled = _compile_matcher(matcher)
        names = [n for n, _ in self.backbone.named_parameters()]
        for k, module in enumerate(self.depth_plan.exit_modules()):
            under = [n for n in names if not module or n == module or n.startswith(module + ".")]
            keys = [_group_key(compiled, "backbone." + n) for n in under]
            keys = [key for key in keys if key[0] != float("inf")]
            if not keys:
                continue  # the stage has no grouped parameters: the exit stays with the head group
            key = max(keys)
            group = list(matcher)[int(key[0])]
            matcher[group] = list(matcher[group]) + [(r"^exits\." + str(k) + r"\.", tuple(key[1:]) or None)]
        return matcher

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """The backbone's gradient checkpointing (every depth runs through the backbone's stages; the
        block-level runs of ``exit_points="blocks"`` and ``plan="blocks"`` go through the stage layout,
        which does not checkpoint)."""
        self.backbone.set_grad_checkpointing(enable)

    def extra_repr(self) -> str:
        return f"plan={self.plan}, num_depths={self.num_depths}, depth={self._depth}"

    def export(self, depth: int) -> nn.Module:
        """A standalone ``nn.Module`` with only what ``depth`` runs (see :func:`coopnets.inference.export.export_depth`)."""
        return self.depth_plan.export(self, self.resolve_depth(depth))


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
