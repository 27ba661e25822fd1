"""``mlcsd``: multi-level collaborative self-distillation (Zhang et al. 2024, MLCSD-Net).

One depth-adaptive net with ``K`` depths (exits). Every exit ``k`` gets its own teacher,
built per sample from *all* exits by a learned weighting module ``W_k``:

* embeddings ``e_j`` (pooled pre-logits) are projected to the deepest exit's width by
  learned linear adapters ``A_j`` (:class:`~coopnets.train.losses.EmbeddingAdapters`;
  identity where widths already match, e.g. ``conv`` exit heads);
* ``W_k`` is a linear layer (a 1x1 conv on pooled features) on the concatenation of all
  projected embeddings, giving softmax weights ``a_k`` over the ``K`` exits, per sample.
  It is zero-initialised, so every teacher starts as the uniform ensemble;
* logit teacher ``t_k = sum_j a_kj z_j`` and feature teacher ``g_k = sum_j a_kj A_j(e_j)``.

Loss, summed over exits ``k`` (defaults from MLCSD-Net's public code, METHODS.md):

``ce_weight_k * CE(z_k, y)``                  labels (``final_ce_weight`` for the deepest exit, ``ce_weight`` otherwise)
``+ kd_weight * KD_T(z_k || t_k)``            temperature KL (``T = 4``, ``T**2``-scaled), teacher detached
``+ feature_weight * MSE(A_k(e_k), g_k)``     feature regression, teacher detached
``+ ensemble_weight * CE(t_k', y)``           trains the weighting module (see below)

**Training the weighting module.** In the public code both teachers are detached, so
``W_k`` gets no gradient and decays to uniform weights under weight decay. Here the
distillation targets stay detached (the exits learn *from* the teachers, not the other
way round), and an extra objective trains ``W_k``: the cross-entropy on labels of the
ensemble ``t_k' = sum_j a_kj * z_j.detach()``. Its gradient reaches only ``W_k`` (the
exit logits and the embeddings fed to ``W_k`` are detached there), so ``W_k`` learns
which exits to trust for each sample while the net's own objective is exactly MLCSD's.

Example:
    >>> import torch, coopnets
    >>> from coopnets.train.recipe import create_recipe
    >>> r = create_recipe("mlcsd", lambda: coopnets.wrap("test_resnet", num_classes=3))
    >>> out = r(torch.randn(2, 3, 32, 32), torch.tensor([0, 2]))
    >>> r.teacher_weights(torch.randn(2, 3, 32, 32)).shape  # (batch, teacher k, exit j)
    torch.Size([2, 4, 4])
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
from torch import nn

from ..losses import EmbeddingAdapters, ce, feature_mse, kd
from ..recipe import RecipeConfig, RecipeOutput, SingleNetRecipe, register_recipe


@dataclass
class MLCSDConfig(RecipeConfig):
    """Weights and temperature of :class:`MLCSD` (defaults: MLCSD-Net's public code)."""

    #: CE weight of the deepest exit.
    final_ce_weight: float = 1.0
    #: CE weight of every other exit.
    ce_weight: float = 1.0
    #: weight of each exit's KL to its logit teacher.
    kd_weight: float = 5.0
    #: softmax temperature of the KL term (the loss is scaled by T**2).
    temperature: float = 4.0
    #: weight of each exit's MSE to its feature teacher.
    feature_weight: float = 10.0
    #: weight of the ensemble teachers' own CE, the objective of the weighting modules.
    ensemble_weight: float = 1.0


class ExitWeighting(nn.Module):
    """``K`` weighting modules: per sample, softmax weights over ``K`` exits for each exit's teacher.

    Args:
        num_exits: ``K``.
        dim: width of each (projected) embedding; the input is their concatenation.
    """

    def __init__(self, num_exits: int, dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(num_exits * dim, num_exits) for _ in range(num_exits))
        for layer in self.layers:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, embeddings: List[torch.Tensor]) -> torch.Tensor:
        """Weights of shape (N, K teachers, K exits); each row sums to 1."""
        joint = torch.cat(embeddings, dim=1)
        return torch.stack([layer(joint).softmax(dim=-1) for layer in self.layers], dim=1)


@register_recipe
class MLCSD(SingleNetRecipe):
    """Every exit distils from its own learned, per-sample weighted ensemble of all exits."""

    name = "mlcsd"
    config_cls = MLCSDConfig

    def setup(self) -> None:
        """The embedding adapters ``A_j``, then the weighting modules ``W_k``."""
        self.adapters = EmbeddingAdapters(self.net.depth_plan.embedding_dims())
        self.weighting = ExitWeighting(self.net.num_depths, self.adapters.out_dim)

    def _teachers(self, x: torch.Tensor):
        out = self.net.forward_exits(x, with_features=True)
        feats = self.adapters(out.embeddings)
        weights = self.weighting([f.detach() for f in feats])
        return out, feats, weights

    @torch.no_grad()
    def teacher_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample exit weights of every teacher, (N, K, K) (for inspection).

        Runs the net in its current mode (call ``.eval()`` first to leave BN statistics alone).
        """
        return self._teachers(x)[2]

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> RecipeOutput:
        cfg = self.config
        out, feats, weights = self._teachers(x)
        logits = torch.stack(out.logits, dim=1)  # (N, K, C)
        teacher_logits = weights @ logits.detach()  # (N, K, C): teacher k mixes every exit
        teacher_feats = weights.detach() @ torch.stack(feats, dim=1).detach()  # (N, K, D)
        terms: Dict[str, torch.Tensor] = {}
        loss = x.new_zeros(())
        last = len(out.logits) - 1
        for k, z in enumerate(out.logits):
            parts: Tuple[Tuple[str, float, torch.Tensor], ...] = (
                ("ce", cfg.final_ce_weight if k == last else cfg.ce_weight, ce(z, y, cfg.label_smoothing)),
                ("kd", cfg.kd_weight, kd(z, teacher_logits[:, k], cfg.temperature)),
                ("feat", cfg.feature_weight, feature_mse(feats[k], teacher_feats[:, k])),
                ("ens", cfg.ensemble_weight, ce(teacher_logits[:, k], y, cfg.label_smoothing)),
            )
            for name, weight, value in parts:
                terms[f"{name}_{k + 1}"] = value
                loss = loss + weight * value
        return RecipeOutput(loss, out.logits, terms)
