"""Exit heads: the small classifiers attached after intermediate stages.

An exit head turns an NCHW feature map from a backbone stage into class logits:
``body`` (map -> map), global ``pool``, ``norm``, ``neck`` (pooled -> embedding), ``fc``.
The kinds (:data:`EXIT_HEAD_KINDS`):

* ``linear`` -- global average pool, LayerNorm, linear classifier. Cheapest; good
  for transformer features, which are already "global".
* ``conv`` -- depthwise-separable stride-2 convolutions (3x3 depthwise, 1x1
  pointwise, BatchNorm, ReLU) that bring the map to the final stage's
  resolution and the backbone's final width, then pool + linear (the MLCSD /
  BYOT style head). The strongest, and the dearest: on a CNN's early stages it can
  cost a quarter of the depth it serves.
* ``reduce`` -- a 1x1 convolution to ``width`` channels (default :data:`REDUCE_WIDTH`, 128:
  a reduction on all but the thinnest maps), BatchNorm, ReLU at the map's resolution,
  then average pool + linear.
* ``mixpool`` -- SDN's pooling (Kaya et al. 2019, "Shallow-Deep Networks"): a learned
  mix ``a * max + (1 - a) * avg`` of global max and average pooling (``a`` = sigmoid
  of one learned logit, :class:`MixedPool2d`), LayerNorm, linear.
* ``mlp`` -- average pool, LayerNorm, a hidden layer of ``width`` units (default the
  input's channels) with GELU, linear.

Which kind a backbone gets by default (``head="auto"``) is measured per family
(:func:`head_kind_for`, ``benchmarks/exit_heads.py``): the design rule is that a head costs
at most 10 % of the latency of the depth it ends.

Example:
    >>> import torch
    >>> head = ExitHead(in_chs=64, num_classes=10, kind="conv", reduction=8, final_reduction=32, width=256)
    >>> head(torch.randn(2, 64, 28, 28)).shape
    torch.Size([2, 10])
    >>> [ExitHead(64, 10, kind=k)(torch.randn(2, 64, 7, 7)).shape[1] for k in EXIT_HEAD_KINDS]
    [10, 10, 10, 10, 10]
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple, Union

import torch
from torch import nn

#: every exit head kind (see the module docstring)
EXIT_HEAD_KINDS = ("linear", "conv", "reduce", "mixpool", "mlp")
#: the ``global_pool`` name of SDN's learned max/avg mix (:class:`MixedPool2d`): a ``mixpool`` head's pooling
_MIXED_POOL = "mix"
#: a ``reduce`` head's default width (MSDNet's classifiers are 128 channels wide)
REDUCE_WIDTH = 128


class MixedPool2d(nn.Module):
    """SDN's global pooling: ``a * max + (1 - a) * avg`` with ``a = sigmoid(logit)``, one learned logit (init 0).

    Example:
        >>> x = torch.tensor([[[[0.0, 2.0]]]])
        >>> MixedPool2d()(x).flatten().tolist()  # a = 0.5: (2 + 1) / 2
        [1.5]
    """

    def __init__(self) -> None:
        super().__init__()
        self.logit = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.sigmoid(self.logit)
        return a * x.amax(dim=(-2, -1), keepdim=True) + (1 - a) * x.mean(dim=(-2, -1), keepdim=True)


class ExitHead(nn.Module):
    """Classifier attached to an intermediate NCHW feature map.

    Args:
        in_chs: channels of the feature map it reads.
        num_classes: number of output logits.
        kind: one of :data:`EXIT_HEAD_KINDS` (see the module docstring).
        reduction: stride of the feature map relative to the input image.
        final_reduction: stride of the backbone's last stage (``conv`` heads
            downsample until they reach it).
        width: the head's own width: a ``conv`` head's output width (default
            ``final_width``), a ``reduce`` head's 1x1 convolution (default :data:`REDUCE_WIDTH`),
            an ``mlp`` head's hidden layer (default ``in_chs``); ``linear`` and
            ``mixpool`` heads have none (they ignore it).
        final_width: the backbone's final width (a ``conv`` head's default width;
            default ``in_chs``).
        drop_rate: dropout before the classifier.
    """

    def __init__(
        self,
        in_chs: int,
        num_classes: int,
        kind: str = "linear",
        reduction: int = 32,
        final_reduction: int = 32,
        width: Optional[int] = None,
        final_width: Optional[int] = None,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if kind not in EXIT_HEAD_KINDS:
            raise ValueError(f"Unknown exit head kind {kind!r}; valid kinds: {', '.join(EXIT_HEAD_KINDS)}.")
        self.kind = kind
        self.in_chs = in_chs
        self.body: nn.Module = nn.Identity()
        self.norm: nn.Module = nn.Identity()
        self.neck: nn.Module = nn.Identity()
        self.global_pool = _MIXED_POOL if kind == "mixpool" else "avg"
        self.pool: nn.Module = _pool(self.global_pool)
        if kind == "conv":
            self.body = _conv_body(in_chs, int(width or final_width or in_chs), reduction, final_reduction)
            self.num_features = self.body[-2].num_features  # the last BatchNorm's
        elif kind == "reduce":
            chs = int(width or REDUCE_WIDTH)
            self.body = nn.Sequential(nn.Conv2d(in_chs, chs, 1, bias=False), nn.BatchNorm2d(chs), nn.ReLU(inplace=True))
            self.num_features = chs
        else:
            self.norm = nn.LayerNorm(in_chs)
            self.num_features = in_chs
            if kind == "mlp":
                self.num_features = int(width or in_chs)
                self.neck = nn.Sequential(nn.Linear(in_chs, self.num_features), nn.GELU())
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The unpooled map the classifier reads: ``body(x)`` (``conv``: downsampled, ``width`` channels;
        ``reduce``: ``width`` channels; the other kinds: ``x`` itself)."""
        return self.body(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Logits from :meth:`forward_features`' map; ``pre_logits`` returns the pooled embedding.

        With pooling disabled (``reset_classifier(n, global_pool="")``) the map stays unpooled
        (N, C, H, W) and the neck (``mlp``) and classifier, if any, are applied per position.
        """
        if not self.global_pool:
            x = self.neck(x.movedim(1, -1))
            if pre_logits or isinstance(self.fc, nn.Identity):
                return x.movedim(-1, 1)
            return self.fc(self.drop(x)).movedim(-1, 1)
        x = self.neck(self.norm(self.pool(x).flatten(1)))
        if pre_logits:
            return x
        return self.fc(self.drop(x))

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Logits for a feature map ``x`` (N, C, H, W); ``pre_logits`` returns the pooled embedding."""
        return self.forward_head(self.forward_features(x), pre_logits=pre_logits)

    def forward_both(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(logits, pooled embedding) in one pass."""
        emb = self.forward(x, pre_logits=True)
        return self.fc(self.drop(emb)), emb

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new classifier for ``num_classes`` (``0``: identity). ``global_pool``: ``"avg"`` pools,
        ``"mix"`` pools with SDN's learned mix (:class:`MixedPool2d`), ``""`` keeps the map unpooled,
        ``None`` leaves the pooling as it is (timm's semantics).

        Example:
            >>> import torch
            >>> head = ExitHead(in_chs=8, num_classes=3)
            >>> head.reset_classifier(0, "")
            >>> head(torch.randn(2, 8, 4, 4)).shape
            torch.Size([2, 8, 4, 4])
        """
        if global_pool is not None:
            if global_pool not in _POOLS:
                raise ValueError(f"Unknown global_pool {global_pool!r} for an exit head; valid: "
                                 f"{', '.join(map(repr, _POOLS))}.")
            self.global_pool = global_pool
            self.pool = _pool(global_pool)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()


#: timm's pool types an exit head also takes (``reset_classifier(n, global_pool)``, ``--gp``): those that keep the width
_TIMM_POOLS = ("max", "avgmax", "fast")
#: every ``global_pool`` an exit head takes
_POOLS = ("avg", _MIXED_POOL, "", *_TIMM_POOLS)


def _pool(global_pool: str) -> nn.Module:
    """The pooling module of a ``global_pool`` name (one of :data:`_POOLS`)."""
    if global_pool in _TIMM_POOLS:  # timm's own pooling layer (what the backbone's head uses)
        from timm.layers import SelectAdaptivePool2d

        return SelectAdaptivePool2d(pool_type=global_pool)
    if global_pool == _MIXED_POOL:
        return MixedPool2d()
    return nn.AdaptiveAvgPool2d(1) if global_pool else nn.Identity()


def _conv_body(in_chs: int, width: int, reduction: int, final_reduction: int) -> nn.Sequential:
    """A ``conv`` head's body: depthwise-separable steps, stride 2 until ``final_reduction``, widths growing
    geometrically from ``in_chs`` to ``width``."""
    steps = max(1, round(math.log2(max(final_reduction, reduction) / reduction)))
    layers = []
    chs = in_chs
    for i in range(steps):
        stride = 2 if reduction * 2 ** i < final_reduction else 1
        out = int(round(in_chs * (width / in_chs) ** ((i + 1) / steps)))
        layers += [
            nn.Conv2d(chs, chs, 3, stride=stride, padding=1, groups=chs, bias=False),
            nn.Conv2d(chs, out, 1, bias=False),
            nn.BatchNorm2d(out),
            nn.ReLU(inplace=True),
        ]
        chs = out
    return nn.Sequential(*layers)


#: transformer families: their features are already global, so a ``linear`` head (see :func:`head_kind_for`)
_TRANSFORMERS = ("vit", "visiontransformer", "swin", "deit", "eva")
#: the default exit head of each measured CNN family (backbone class name, lower case), chosen by
#: ``benchmarks/exit_heads.py``: the strongest kind whose measured latency surely stays <= 10 % of its depth's
#: (its FLOPs too) on every zoo entry of the family (batch 1 and 8, 224 px, one thread); see
#: benchmarks/results/exit_heads.md
DEFAULT_HEADS: Dict[str, str] = {
    "convnext": "reduce",
    "efficientnet": "mlp",
    "mobilenetv3": "mlp",
    "regnet": "mlp",
    "resnet": "mlp",
}
#: the default of a CNN family not measured (a wrapped timm backbone): the kind chosen the same way over every
#: measured CNN entry
OTHER_CNN_HEAD = "mlp"


def is_transformer(backbone: Union[nn.Module, str]) -> bool:
    """Whether a backbone (a module, or its class or model name) is of a transformer family (ViT, Swin, DeiT, EVA).

    Example:
        >>> is_transformer("SwinTransformer"), is_transformer("resnet50")
        (True, False)
    """
    name = (backbone if isinstance(backbone, str) else type(backbone).__name__).lower()
    return any(k in name for k in _TRANSFORMERS)


def head_kind_for(backbone: Union[nn.Module, str]) -> str:
    """The default exit head kind (``head="auto"``) for a backbone (a module, or its class or model name):
    ``linear`` for transformers, the measured :data:`DEFAULT_HEADS` kind of a CNN family, else
    :data:`OTHER_CNN_HEAD`.

    Example:
        >>> head_kind_for("VisionTransformer"), head_kind_for("resnet50"), head_kind_for("ConvNeXt")
        ('linear', 'mlp', 'reduce')
    """
    if is_transformer(backbone):
        return "linear"
    name = (backbone if isinstance(backbone, str) else type(backbone).__name__).lower()
    return next((kind for family, kind in DEFAULT_HEADS.items() if family in name), OTHER_CNN_HEAD)
