"""``ekd``: Embedded Knowledge Distillation in a depth-level dynamic network (Lyu et al. 2021).

One depth-adaptive net; its deepest depth (the full net) is the teacher of every
shallower depth (sub-net), online, in every step. For a batch ``(x, y)`` and depths
``1..D`` (``D`` = full net), from one call of ``forward_exits(x, with_features=True)``:

``loss = sum_d ce_weight * CE(z_d, y)``                                   (every depth, full net too)
``     + sum_{d<D} kd_weight * KD_T(z_d || z_D)``                         (class probabilities)
``     + sum_{d<D} attention_weight * sum_s AT(f_{d,s}, f_{D,s})``        (feature attention)

* **CE** -- cross-entropy on labels (:func:`coopnets.train.losses.ce`).
* **KD** -- ``T**2``-scaled KL from the full net's softened probabilities, teacher
  detached (:func:`coopnets.train.losses.kd`): the full net learns from labels only.
* **AT** -- the "self-attention" term: spatial attention maps (channel mean of squared
  activations, L2-normalised; :func:`coopnets.train.losses.attention_loss`) of the
  sub-net's features are pulled towards the full net's features *at the same
  resolution*, teacher detached.

Which features are compared:

``plan="blocks"`` (EKD's own setting, e.g. ResNet-18 ``[1,1,1,1]`` inside ``[2,2,2,2]``)
    Every depth runs every stage, so each sub-net's stage output ``s`` has the same
    resolution as the full net's stage output ``s``; the AT term sums over all stages.

``plan="exits"`` (documented choice; the pairs come from :meth:`coopnets.models.plans.ExitsPlan.feature_pairs`)
    A sub-net ends at an earlier stage, and its stages are literally the full net's
    stages (shared trunk), so no distinct same-resolution teacher map exists. Each exit's
    input map is compared with the full net's last stage map instead, after area-pooling
    the exit's map down to the last map's resolution (``adaptive_avg_pool2d``; avoids the
    aliasing of bilinear down-sampling). When the last map is 1x1 (e.g. ResNets on 32x32
    inputs) every attention map is the constant 1 and the term is exactly zero; the
    recipe then reduces to CE + KD.

Defaults (the full paper is not available offline; these are choices, all config
values): ``T = 4``, ``kd_weight = 1``, ``ce_weight = 1``, ``attention_weight = 1000``
(the ``beta`` of Zagoruyko & Komodakis' attention transfer, whose per-map loss is the
same mean squared distance).

Example:
    >>> import torch, coopnets
    >>> from coopnets.train.recipe import create_recipe
    >>> r = create_recipe("ekd", lambda: coopnets.wrap("resnet18", plan="blocks", num_classes=3))
    >>> out = r(torch.randn(2, 3, 32, 32), torch.tensor([0, 2]))
    >>> sorted(out.terms)
    ['at_1', 'ce_1', 'ce_2', 'kd_1']
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch

from ..losses import attention_loss, ce, kd
from ..recipe import RecipeConfig, RecipeOutput, SingleNetRecipe, register_recipe


@dataclass
class EKDConfig(RecipeConfig):
    """Weights and temperature of :class:`EKD` (see the module docstring)."""

    #: weight of every depth's cross-entropy on labels.
    ce_weight: float = 1.0
    #: weight of each sub-net's KL to the full net's probabilities.
    kd_weight: float = 1.0
    #: softmax temperature of the KL term (the loss is scaled by T**2).
    temperature: float = 4.0
    #: weight of each sub-net's attention loss (summed over compared feature maps).
    attention_weight: float = 1000.0


@register_recipe
class EKD(SingleNetRecipe):
    """The full net teaches every sub-net: CE + KL to its probabilities + attention transfer."""

    name = "ekd"
    config_cls = EKDConfig

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> RecipeOutput:
        cfg = self.config
        out = self.net.forward_exits(x, with_features=True)
        teacher = out.logits[-1]
        terms: Dict[str, torch.Tensor] = {}
        loss = x.new_zeros(())
        for d, logits in enumerate(out.logits):
            terms[f"ce_{d + 1}"] = ce(logits, y, cfg.label_smoothing)
            loss = loss + cfg.ce_weight * terms[f"ce_{d + 1}"]
            if d == len(out.logits) - 1:
                break
            terms[f"kd_{d + 1}"] = kd(logits, teacher, cfg.temperature)
            terms[f"at_{d + 1}"] = sum(attention_loss(s, t) for s, t in self.net.depth_plan.feature_pairs(out, d))
            loss = loss + cfg.kd_weight * terms[f"kd_{d + 1}"] + cfg.attention_weight * terms[f"at_{d + 1}"]
        return RecipeOutput(loss, out.logits, terms)
