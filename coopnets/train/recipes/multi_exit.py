"""``multi_exit``: deep supervision, the simplest baseline (SDN-style).

One depth-adaptive net; the loss is a weighted sum of cross-entropy at every exit,
``sum_k w_k * CE(logits_k, y)``, from one shared pass (:meth:`forward_exits`). Weights
default to 1 for every exit (``exit_weights`` overrides them, shallowest first).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..losses import ce
from ..recipe import RecipeConfig, RecipeOutput, SingleNetRecipe, register_recipe


@dataclass
class MultiExitConfig(RecipeConfig):
    """Exit weights of :class:`MultiExit`."""

    #: per-exit CE weights, shallowest first (None: all 1).
    exit_weights: Optional[Sequence[float]] = None


@register_recipe
class MultiExit(SingleNetRecipe):
    """Weighted cross-entropy at every exit, from one shared pass."""

    name = "multi_exit"
    config_cls = MultiExitConfig

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> RecipeOutput:
        logits = self.net.forward_exits(x)
        weights = self.config.exit_weights or [1.0] * len(logits)
        if len(weights) != len(logits):
            raise ValueError(f"exit_weights needs {len(logits)} values (one per depth), got {len(weights)}.")
        terms = {f"ce_{k + 1}": ce(l, y, self.config.label_smoothing) for k, l in enumerate(logits)}
        loss = sum(w * t for w, t in zip(weights, terms.values()))
        return RecipeOutput(loss, logits, terms)
