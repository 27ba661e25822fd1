"""``byot``: Be Your Own Teacher self-distillation (Zhang et al. 2019).

One depth-adaptive net; its deepest exit teaches the shallower ones, online. For exits
``k = 1..K`` (``K`` = deepest), from one call of ``forward_exits(x, with_features=True)``:

``loss = CE(z_K, y)``                                                   (deepest exit: labels only)
``     + sum_{k<K} ce_weight * CE(z_k, y)``                             (labels)
``     + sum_{k<K} kd_weight * KD_T(z_k || z_K)``                       (soft targets of the deepest exit)
``     + sum_{k<K} hint_weight * MSE(A_k(e_k), e_K)``                   (feature hint)

* **CE** -- cross-entropy on labels (:func:`coopnets.train.losses.ce`).
* **KD** -- ``T**2``-scaled KL to the deepest exit's softened probabilities, teacher
  detached (:func:`coopnets.train.losses.kd`).
* **hint** -- mean squared error between each exit's pooled embedding and the deepest
  exit's (detached; :func:`coopnets.train.losses.feature_mse`). When widths differ
  (``linear`` exit heads), a learned linear adapter ``A_k``
  (:class:`~coopnets.train.losses.EmbeddingAdapters`) maps the exit's embedding
  to the deepest width; with ``conv`` heads ``A_k`` is the identity.

Defaults: the BYOT journal code's ``0.7 * CE + 0.3 * soft CE`` at ``T = 3`` for shallow
exits (METHODS.md). That code's soft CE is not ``T**2``-scaled; the shared KD term is,
so at the same 0.3 weight its gradient is the standard Hinton-scaled one. The hint
weight (``0.1`` on the per-element mean) is our choice: BYOT's value is not
available offline.

Example:
    >>> import torch, coopnets
    >>> from coopnets.train.recipe import create_recipe
    >>> r = create_recipe("byot", lambda: coopnets.wrap("test_resnet", num_classes=3))
    >>> out = r(torch.randn(2, 3, 32, 32), torch.tensor([0, 2]))
    >>> sorted(out.terms)[:4]
    ['ce_1', 'ce_2', 'ce_3', 'ce_4']
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch

from ..losses import EmbeddingAdapters, ce, feature_mse, kd
from ..recipe import RecipeConfig, RecipeOutput, SingleNetRecipe, register_recipe


@dataclass
class BYOTConfig(RecipeConfig):
    """Weights and temperature of :class:`BYOT` (see the module docstring)."""

    #: CE weight of the shallow exits (the deepest exit's CE has weight 1).
    ce_weight: float = 0.7
    #: weight of each shallow exit's KL to the deepest exit.
    kd_weight: float = 0.3
    #: softmax temperature of the KL term (the loss is scaled by T**2).
    temperature: float = 3.0
    #: weight of each shallow exit's feature hint (MSE to the deepest embedding).
    hint_weight: float = 0.1


@register_recipe
class BYOT(SingleNetRecipe):
    """Deepest exit teaches every shallower exit: CE + KL + feature hint."""

    name = "byot"
    config_cls = BYOTConfig

    def setup(self) -> None:
        """The feature-hint adapters ``A_k``."""
        self.adapters = EmbeddingAdapters(self.net.depth_plan.embedding_dims())

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> RecipeOutput:
        cfg = self.config
        out = self.net.forward_exits(x, with_features=True)
        feats = self.adapters(out.embeddings)
        last = len(out.logits) - 1
        terms: Dict[str, torch.Tensor] = {f"ce_{last + 1}": ce(out.logits[last], y, cfg.label_smoothing)}
        loss = terms[f"ce_{last + 1}"]
        for k in range(last):
            terms[f"ce_{k + 1}"] = ce(out.logits[k], y, cfg.label_smoothing)
            terms[f"kd_{k + 1}"] = kd(out.logits[k], out.logits[last], cfg.temperature)
            terms[f"hint_{k + 1}"] = feature_mse(feats[k], feats[last])
            loss = loss + (
                cfg.ce_weight * terms[f"ce_{k + 1}"]
                + cfg.kd_weight * terms[f"kd_{k + 1}"]
                + cfg.hint_weight * terms[f"hint_{k + 1}"]
            )
        return RecipeOutput(loss, out.logits, terms)
