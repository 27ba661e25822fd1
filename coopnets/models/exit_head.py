"""Exit heads: the small classifiers attached after intermediate stages.

An exit head turns an NCHW feature map from a backbone stage into class logits.
Two kinds exist:

* ``linear`` -- global average pool, LayerNorm, linear classifier. Cheapest;
  good for transformer features, which are already "global".
* ``conv`` -- depthwise-separable stride-2 convolutions (3x3 depthwise, 1x1
  pointwise, BatchNorm, ReLU) that bring the map to the final stage's
  resolution and the backbone's final width, then pool + linear (the MLCSD /
  BYOT style head). Stronger for CNN features taken early.

Example:
    >>> import torch
    >>> head = ExitHead(in_chs=64, num_classes=10, kind="conv", reduction=8, final_reduction=32, width=256)
    >>> head(torch.randn(2, 64, 28, 28)).shape
    torch.Size([2, 10])
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import nn

EXIT_HEAD_KINDS = ("linear", "conv")


class ExitHead(nn.Module):
    """Classifier attached to an intermediate NCHW feature map.

    Args:
        in_chs: channels of the feature map it reads.
        num_classes: number of output logits.
        kind: ``"linear"`` or ``"conv"`` (see module docstring).
        reduction: stride of the feature map relative to the input image.
        final_reduction: stride of the backbone's last stage (``conv`` heads
            downsample until they reach it).
        width: output width of a ``conv`` head (the embedding size before the
            classifier); defaults to ``in_chs``.
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
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if kind not in EXIT_HEAD_KINDS:
            raise ValueError(f"Unknown exit head kind {kind!r}; valid kinds: {', '.join(EXIT_HEAD_KINDS)}.")
        self.kind = kind
        self.in_chs = in_chs
        if kind == "conv":
            width = int(width or in_chs)
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
            self.body = nn.Sequential(*layers)
            self.norm = nn.Identity()
            self.num_features = chs
        else:
            self.body = nn.Identity()
            self.norm = nn.LayerNorm(in_chs)
            self.num_features = in_chs
        self.pool: nn.Module = nn.AdaptiveAvgPool2d(1)
        self.global_pool = "avg"
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The unpooled map the classifier reads: ``body(x)`` (``conv``: downsampled, ``width`` channels;
        ``linear``: ``x`` itself)."""
        return self.body(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Logits from :meth:`forward_features`' map; ``pre_logits`` returns the pooled embedding.

        With pooling disabled (``reset_classifier(n, global_pool="")``) the map stays unpooled
        (N, C, H, W) and a classifier, if any, is applied per position.
        """
        if not self.global_pool:
            if pre_logits or isinstance(self.fc, nn.Identity):
                return x
            return self.fc(self.drop(x.movedim(1, -1))).movedim(-1, 1)
        x = self.norm(self.pool(x).flatten(1))
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
        ``""`` keeps the map unpooled, ``None`` leaves the pooling as it is (timm's semantics).

        Example:
            >>> import torch
            >>> head = ExitHead(in_chs=8, num_classes=3)
            >>> head.reset_classifier(0, "")
            >>> head(torch.randn(2, 8, 4, 4)).shape
            torch.Size([2, 8, 4, 4])
        """
        if global_pool is not None:
            if global_pool not in ("", "avg", *_TIMM_POOLS):
                raise ValueError(f"Unknown global_pool {global_pool!r} for an exit head; valid: 'avg', '', "
                                 f"{', '.join(map(repr, _TIMM_POOLS))}.")
            self.global_pool = global_pool
            if global_pool in _TIMM_POOLS:  # timm's own pooling layer (what the backbone's head uses)
                from timm.layers import SelectAdaptivePool2d

                self.pool = SelectAdaptivePool2d(pool_type=global_pool)
            else:
                self.pool = nn.AdaptiveAvgPool2d(1) if global_pool else nn.Identity()
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()


#: timm's pool types an exit head also takes (``reset_classifier(n, global_pool)``, ``--gp``): those that keep the width
_TIMM_POOLS = ("max", "avgmax", "fast")


def head_kind_for(backbone: Union[nn.Module, str]) -> str:
    """The default exit head kind for a backbone: ``linear`` for transformers, ``conv`` otherwise."""
    name = backbone if isinstance(backbone, str) else type(backbone).__name__
    name = name.lower()
    return "linear" if any(k in name for k in ("vit", "visiontransformer", "swin", "deit", "eva")) else "conv"
