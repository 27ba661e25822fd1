"""``multi_exit``: deep supervision, the simplest baseline (SDN-style).

One depth-adaptive net; the loss is a weighted sum of cross-entropy at every exit,
``sum_k w_k * CE(logits_k, y)``, from one shared pass (:meth:`forward_exits`). Weights
default to 1 for every exit (``exit_weights`` overrides them, shallowest first).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch

from ...models.depth_adaptive import DepthAdaptiveModel
from ..losses import ce
from ..recipe import Recipe, RecipeConfig, RecipeOutput, register_recipe


@dataclass
class MultiExitConfig(RecipeConfig):
    #: per-exit CE weights, shallowest first (None: all 1).
    exit_weights: Optional[Sequence[float]] = None


@register_recipe
class MultiExit(Recipe):
    name = "multi_exit"
    config_cls = MultiExitConfig

    def __init__(self, model_fn, config=None) -> None:
        super().__init__(model_fn, config)
        self.net = model_fn()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> RecipeOutput:
        logits = self.net.forward_exits(x)
        weights = self.config.exit_weights or [1.0] * len(logits)
        if len(weights) != len(logits):
            raise ValueError(f"exit_weights needs {len(logits)} values (one per depth), got {len(weights)}.")
        terms = {f"ce_{k + 1}": ce(l, y, self.config.label_smoothing) for k, l in enumerate(logits)}
        loss = sum(w * t for w, t in zip(weights, terms.values()))
        return RecipeOutput(loss, logits, {k: v.detach().item() for k, v in terms.items()})

    def eval_models(self) -> Dict[str, DepthAdaptiveModel]:
        return {"net": self.net}
