"""``independent``: one depth trained alone, as its own truncated network (the baseline).

The recipe trains exactly ONE depth ``d`` (config ``depth``): the loss is the
cross-entropy of ``model.forward_depth(x, d)``, which runs only the stem, the stages
depth ``d`` uses and its exit head (``exits`` plan), or the first blocks of every stage
(``blocks`` plan). Deeper stages and other exit heads get no gradient, hence
``trains_all_parameters = False``.

The *baseline* is one such run per depth (``num_depths`` separately trained nets, the
cost a single cooperative training claims to save): ``coopnets train --method
independent`` without ``--recipe-opt depth=D`` runs them all
(:func:`coopnets.train.sweep.train_each_depth`).

Validation: :meth:`Independent.eval_models` returns the net, so a trainer validates it at
every depth like any recipe, but only the entry of the trained depth is meaningful (the
other depths use untrained stages or heads). Read ``recipe.trained_depth`` (1-based) or
let :func:`~coopnets.train.sweep.train_each_depth` assemble the per-depth table;
the net is the deployable one (:meth:`~coopnets.train.recipe.SingleNetRecipe.deployable`).

Example:
    >>> import torch, coopnets
    >>> from coopnets.train.recipe import create_recipe
    >>> r = create_recipe("independent", lambda: coopnets.wrap("test_resnet", num_classes=3), {"depth": 2})
    >>> out = r(torch.randn(2, 3, 32, 32), torch.tensor([0, 2]))
    >>> r.trained_depth, len(out.logits), out.logits[1].shape
    (2, 4, torch.Size([2, 3]))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ..losses import ce
from ..recipe import RecipeConfig, RecipeOutput, SingleNetRecipe, register_recipe


@dataclass
class IndependentConfig(RecipeConfig):
    """Which depth :class:`Independent` trains."""

    #: the depth to train, 1..num_depths (-1: the full depth).
    depth: int = -1


@register_recipe
class Independent(SingleNetRecipe):
    """CE on one depth's truncated network; the other depths are left untrained."""

    name = "independent"
    config_cls = IndependentConfig
    trains_all_parameters = False

    def setup(self) -> None:
        """``trained_depth``: the depth this recipe trains, 1-based (``config.depth`` with -1 resolved)."""
        self.trained_depth = self.net.resolve_depth(self.config.depth)

    @classmethod
    def runs_per_depth(cls, options: Mapping[str, Any]) -> bool:
        """Without a ``depth`` option, the baseline: every depth trained alone, one run each."""
        return "depth" not in options

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> RecipeOutput:
        """Loss of the trained depth. ``logits`` has one entry per depth so trainers can
        index it like any recipe's; every depth's entry holds the trained depth's logits
        (only the trained depth's running accuracy is meaningful)."""
        logits = self.net.forward_depth(x, self.trained_depth)
        loss = ce(logits, y, self.config.label_smoothing)
        return RecipeOutput(loss, [logits] * self.net.num_depths, {f"ce_{self.trained_depth}": loss})
