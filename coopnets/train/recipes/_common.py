"""Helpers shared by several recipes (each exists once, here).

* :func:`embedding_dims` -- width of the pooled pre-logit embedding of every depth.
* :class:`EmbeddingAdapters` -- learned linear maps that bring every depth's embedding
  to the deepest depth's width (identity where the widths already match), for feature
  losses between depths whose embeddings differ in size (``linear`` exit heads).

Example:
    >>> import torch, coopnets
    >>> m = coopnets.wrap("test_resnet", num_classes=3, head="linear")
    >>> embedding_dims(m)
    [32, 48, 192, 96]
    >>> adapters = EmbeddingAdapters(embedding_dims(m))
    >>> [tuple(e.shape) for e in adapters([torch.randn(2, d) for d in embedding_dims(m)])]
    [(2, 96), (2, 96), (2, 96), (2, 96)]
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn

from ...models.depth_adaptive import DepthAdaptiveModel


def embedding_dims(model: DepthAdaptiveModel) -> List[int]:
    """Width of ``forward_exits(x, with_features=True).embeddings[k]`` for every depth ``k`` (the plan's answer)."""
    return model.depth_plan.embedding_dims(model)


class EmbeddingAdapters(nn.Module):
    """One adapter per depth mapping its embedding to the deepest depth's width.

    Depths whose width already equals the deepest one get ``nn.Identity`` (no
    parameters), so with ``conv`` exit heads (all widths equal) this module is empty.

    Args:
        dims: embedding width per depth, shallowest first (:func:`embedding_dims`).
    """

    def __init__(self, dims: Sequence[int]) -> None:
        super().__init__()
        if not dims:
            raise ValueError("EmbeddingAdapters needs at least one embedding width.")
        self.out_dim = int(dims[-1])
        self.maps = nn.ModuleList(
            nn.Identity() if d == self.out_dim else nn.Linear(d, self.out_dim) for d in dims
        )

    def forward(self, embeddings: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Project each depth's embedding (N, d_k) to (N, out_dim)."""
        if len(embeddings) != len(self.maps):
            raise ValueError(f"Expected {len(self.maps)} embeddings (one per depth), got {len(embeddings)}.")
        return [m(e) for m, e in zip(self.maps, embeddings)]
