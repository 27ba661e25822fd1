"""Loss terms shared by every training recipe (each exists once, here).

* :func:`ce` -- cross-entropy on labels: integer labels, or soft targets (one row of
  class probabilities per sample, as timm's ``Mixup``/CutMix and label smoothing give).
* :func:`kd` -- temperature-scaled KL divergence from a (detached) teacher's
  distribution to a student's, multiplied by ``T**2`` so gradients keep their scale
  (Hinton et al.).
* :func:`attention_map` / :func:`attention_loss` -- spatial attention transfer
  (Zagoruyko & Komodakis): the channel-wise mean of squared activations, flattened and
  L2-normalised; the loss is the mean squared distance between two maps, resized to
  the teacher's resolution when they differ.
* :func:`feature_mse` -- mean squared error between embeddings (feature hints).
* :class:`EmbeddingAdapters` -- learned linear maps that bring every depth's embedding
  to the deepest depth's width (identity where the widths already match), for feature
  losses between depths whose embeddings differ in size (``linear`` exit heads).

Example:
    >>> import torch
    >>> s, t = torch.randn(4, 10), torch.randn(4, 10)
    >>> float(kd(t, t, temperature=4.0)) == 0.0
    True
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def ce(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy of ``logits`` against integer labels ``target`` (N,) or soft targets (N, C).

    Soft targets give timm's ``SoftTargetCrossEntropy`` (``sum(-target * log_softmax)``,
    batch mean); ``label_smoothing`` applies to both kinds.

    Example:
        >>> z, y = torch.randn(3, 5), torch.tensor([0, 4, 2])
        >>> torch.allclose(ce(z, y, 0.1), ce(z, F.one_hot(y, 5).float(), 0.1))
        True
    """
    if target.dim() == logits.dim():
        return F.cross_entropy(logits, target.to(logits.dtype), label_smoothing=label_smoothing)
    return F.cross_entropy(logits, target, label_smoothing=label_smoothing)


def kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 4.0, detach: bool = True) -> torch.Tensor:
    """``T**2 * KL(softmax(teacher/T) || softmax(student/T))``, batch-mean.

    The teacher is detached unless ``detach=False`` (used when the teacher itself is a
    trainable module that should learn from this term).
    """
    if detach:
        teacher = teacher.detach()
    t = temperature
    log_p_s = F.log_softmax(student / t, dim=-1)
    log_p_t = F.log_softmax(teacher / t, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


def attention_map(feat: torch.Tensor) -> torch.Tensor:
    """Spatial attention of an NCHW map: mean over channels of squares, flattened, L2-normalised."""
    return F.normalize(feat.pow(2).mean(dim=1).flatten(1), dim=1)


def attention_loss(student: torch.Tensor, teacher: torch.Tensor, detach: bool = True) -> torch.Tensor:
    """Mean squared distance between the attention maps of two NCHW feature maps."""
    if detach:
        teacher = teacher.detach()
    if student.shape[-2:] != teacher.shape[-2:]:
        student = F.interpolate(student, size=teacher.shape[-2:], mode="bilinear", align_corners=False)
    return (attention_map(student) - attention_map(teacher)).pow(2).mean()


def feature_mse(student: torch.Tensor, teacher: torch.Tensor, detach: bool = True) -> torch.Tensor:
    """Mean squared error between two embeddings of equal shape."""
    if detach:
        teacher = teacher.detach()
    return F.mse_loss(student, teacher)


class EmbeddingAdapters(nn.Module):
    """One adapter per depth mapping its embedding to the deepest depth's width.

    Depths whose width already equals the deepest one get ``nn.Identity`` (no
    parameters), so with ``conv`` exit heads (all widths equal) this module is empty.

    Args:
        dims: embedding width per depth, shallowest first (a depth plan's
            ``embedding_dims()``: the widths of ``forward_exits(x, with_features=True).embeddings``).

    Example:
        >>> import coopnets
        >>> m = coopnets.wrap("test_resnet", num_classes=3, head="linear")
        >>> dims = m.depth_plan.embedding_dims()
        >>> dims
        [32, 48, 192, 96]
        >>> [tuple(e.shape) for e in EmbeddingAdapters(dims)([torch.randn(2, d) for d in dims])]
        [(2, 96), (2, 96), (2, 96), (2, 96)]
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
