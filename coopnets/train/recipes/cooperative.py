"""``cooperative``: Leader + two Teammates + their sub-networks, trained at once (Fang et al. 2023).

Design note
-----------
Nets. Two Teammates ``A`` and ``B`` are depth-adaptive models built by two calls of
``model_fn`` (same architecture, different random initialisation). Each Teammate's
sub-networks are its depths ``1..D`` (its exits, or block plans with ``plan="blocks"``);
one :meth:`~DepthAdaptiveModel.forward_exits` pass gives the logits of all of them. The
Leader is a plain timm classifier without exits: by default the Teammates' own backbone
(same ``backbone_kwargs``), or any timm model named by ``leader`` (e.g. ``"resnet50"``).

Loss. With ``z^t_k`` the logits of Teammate ``t`` at depth ``k`` (``k = D`` is full
depth), ``z^L`` the Leader's, ``y`` the labels, ``KD(s, t)`` = :func:`losses.kd`
(``T**2``-scaled KL from the detached target ``t`` to ``s``) and ``CE`` =
:func:`losses.ce`::

    loss = w_leader_ce * CE(z^L, y)                                   # Leader learns the labels
         + sum_t [ CE(z^t_D, y)                                       # Teammate full depth
                 + w_sub_ce     * sum_{k<D} CE(z^t_k, y)              # sub-networks on labels
                 + w_leader_kd  * KD(z^t_D, z^L)                      # arrow Leader -> Teammates
                 + w_self_kd    * sum_{k<D} KD(z^t_k, z^t_D) ]        # arrow Teammate -> its sub-networks
         + w_mutual_kd * sum_k [ KD(z^A_k, z^B_k) + KD(z^B_k, z^A_k) ] # arrow Teammate <-> Teammate

Every target of a KD term is detached, so each arrow only moves its student: the Leader
learns from labels alone, the full-depth Teammates from labels, the Leader and each
other, and the sub-networks from labels, their own full depth and the other Teammate's
sub-network of the same depth.

Choices for what the paper leaves unknown (``/work/shared/METHODS.md``): one temperature
``T = 4`` (Hinton's usual value) for every KD term; CE weights 1; KD weights ``1/T =
0.25``: the gradient of ``T**2 * KL`` w.r.t. the student's logits is ``T * (p_s - p_t)``
(softened probabilities), so ``1/T`` puts each KD term on the scale of one CE term.
With weight 1, the summed KD gradients of early training (random Teammates teaching
each other at every depth) were up to 8x the CE signal; on digits (coop_resnet18, 16 px,
6 epochs, seed 0) that left depth 1 of one Teammate at 38 % test accuracy,
where 0.25 brought every depth of both Teammates above 94 % val accuracy by epoch 3.
Terms are summed over depths (as in deep supervision), not averaged; the Leader defaults to the
Teammates' backbone so that the method is architecture-agnostic out of the box; the
sub-network kind follows the Teammates' depth plan (``exits`` or ``blocks``). Every choice
is a field of :class:`CooperativeConfig`.

Pretrained starts (``--pretrained``). The model factory then builds every Teammate
from timm's pretrained backbone weights, and the Leader (:func:`build_leader`) starts
from the same weights (its own timm weights when ``leader`` names another model). Both
Teammates therefore share the same backbone start; we keep it that way rather than
perturbing or re-initialising one of them: the point of a pretrained start is to
transfer those features, and any perturbation only costs accuracy. The Teammates still
differ, because their exit heads and classifiers (re-initialised for the new classes)
are independent random draws and keep distilling into each other. ``fixed_leader=True``
makes the Leader a fixed teacher: always in eval mode, ``requires_grad=False``, so it
has no optimizer state (none is stored in ``last.pth``) and its CE term is only logged.
A fixed Leader is only a useful teacher when its weights already solve the task (e.g. a
backbone whose pretrained classifier matches the dataset's classes).

Example:
    >>> import torch, coopnets
    >>> from coopnets.train import create_recipe
    >>> r = create_recipe("cooperative", lambda: coopnets.wrap("test_resnet", num_classes=3))
    >>> out = r(torch.randn(2, 3, 32, 32), torch.tensor([0, 2]))
    >>> sorted(r.eval_models()), len(out.logits), out.loss.ndim
    (['teammate_a', 'teammate_b'], 4, 0)
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import nn

from ...models.depth_adaptive import DepthAdaptiveModel, create_backbone
from ..losses import ce, kd
from ..recipe import ModelFactory, Recipe, RecipeConfig, RecipeOutput, register_recipe


@dataclass
class CooperativeConfig(RecipeConfig):
    """Weights and temperature of the cooperative loss (see the module's design note).

    Attributes:
        leader: timm model name of the Leader (None: the Teammates' own backbone).
        temperature: temperature ``T`` of every KD term.
        w_leader_ce: weight of the Leader's CE on labels.
        w_sub_ce: weight of CE on labels at each sub-depth (full depth has weight 1).
        w_leader_kd: weight of KD Leader -> Teammate full depth.
        w_self_kd: weight of KD Teammate full depth -> each of its shallower depths.
        w_mutual_kd: weight of KD Teammate <-> Teammate at each matching depth.
        fixed_leader: the Leader is a fixed teacher (eval mode, frozen, not optimised).
    """

    leader: Optional[str] = None
    temperature: float = 4.0
    w_leader_ce: float = 1.0
    w_sub_ce: float = 1.0
    w_leader_kd: float = 0.25
    w_self_kd: float = 0.25
    w_mutual_kd: float = 0.25
    fixed_leader: bool = False


def build_leader(teammate: DepthAdaptiveModel, name: Optional[str] = None, pretrained: bool = False) -> nn.Module:
    """A plain timm classifier for ``teammate``'s classes: its own backbone by default, else ``name``.

    ``pretrained``: start from timm's pretrained weights (the Teammates' own, by default).

    Example:
        >>> import coopnets
        >>> build_leader(coopnets.wrap("test_resnet", num_classes=3)).num_classes
        3
    """
    kwargs = dict(teammate.backbone_kwargs) if name in (None, teammate.backbone_name) else {"in_chans": teammate.in_chans}
    return create_backbone(name or teammate.backbone_name, num_classes=teammate.num_classes, pretrained=pretrained,
                           **kwargs)


@register_recipe
class Cooperative(Recipe):
    """Leader + Teammates ``teammate_a`` / ``teammate_b``; the deployable net is the better Teammate."""

    name = "cooperative"
    config_cls = CooperativeConfig

    def __init__(self, model_fn: ModelFactory, config=None) -> None:
        super().__init__(model_fn, config)
        self.teammate_a = model_fn()
        self.teammate_b = model_fn()
        self.leader = build_leader(self.teammate_a, self.config.leader, getattr(model_fn, "pretrained", False))
        if self.config.fixed_leader:
            self.leader.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "Cooperative":
        """As ``nn.Module.train``, but a fixed Leader stays in eval mode."""
        super().train(mode)
        if self.config.fixed_leader:
            self.leader.eval()
        return self

    def _teammate_terms(self, logits: List[torch.Tensor], leader: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
        """CE / KD terms of one Teammate: labels, Leader -> full depth, full depth -> sub-depths."""
        c, full, subs = self.config, logits[-1], logits[:-1]
        zero = full.new_zeros(())
        return {
            "ce_full": ce(full, y, c.label_smoothing),
            "ce_sub": sum((ce(z, y, c.label_smoothing) for z in subs), zero),
            "kd_leader": kd(full, leader, c.temperature),
            "kd_self": sum((kd(z, full, c.temperature) for z in subs), zero),
        }

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> RecipeOutput:
        c = self.config
        with torch.no_grad() if c.fixed_leader else nullcontext():
            leader = self.leader(x)
        za, zb = self.teammate_a.forward_exits(x), self.teammate_b.forward_exits(x)
        ta, tb = self._teammate_terms(za, leader, y), self._teammate_terms(zb, leader, y)
        terms = {k: ta[k] + tb[k] for k in ta}
        terms["ce_leader"] = ce(leader, y, c.label_smoothing)
        terms["kd_mutual"] = sum(kd(a, b, c.temperature) + kd(b, a, c.temperature) for a, b in zip(za, zb))
        weights = {"ce_full": 1.0, "ce_sub": c.w_sub_ce, "kd_leader": c.w_leader_kd, "kd_self": c.w_self_kd,
                   "ce_leader": 0.0 if c.fixed_leader else c.w_leader_ce, "kd_mutual": c.w_mutual_kd}
        loss = sum(weights[k] * v for k, v in terms.items())
        return RecipeOutput(loss, za, terms)

    def eval_models(self) -> Dict[str, DepthAdaptiveModel]:
        return {"teammate_a": self.teammate_a, "teammate_b": self.teammate_b}

    def reference_models(self) -> Dict[str, nn.Module]:
        return {"leader": self.leader}
