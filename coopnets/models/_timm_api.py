"""timm's model API on a depth-adaptive model: the hooks timm's tools call, passed to the backbone.

:class:`TimmModelApi` is the part of :class:`~coopnets.models.depth_adaptive.DepthAdaptiveModel`
that timm's features API, optimizer factory and layer-wise lr decay read
(``forward_intermediates``, ``prune_intermediate_layers``, ``reset_classifier``,
``no_weight_decay``, ``group_matcher``, ``set_grad_checkpointing``); each reaches the
backbone under ``backbone.`` and the plan's exit heads. The backbone's layer grouping is
timm's own (``timm.models.group_parameters`` over its ``group_matcher``), re-expressed
under ``backbone.`` as one exact pattern per parameter; exit head ``k`` joins the group of
the last layer of the backbone module it follows.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
from timm.models import group_parameters
from torch import nn

from .plans import ExitsConfig, ExitsPlan


def wrapper_group_matcher(backbone: nn.Module, exit_modules: Sequence[str], coarse: bool = False) -> Dict[str, List[Any]]:
    """A timm dict ``group_matcher`` for a model holding ``backbone`` and exit heads ``exits.k`` that follow
    the backbone modules ``exit_modules`` (groups in the backbone's order; an exit after a module without
    grouped parameters joins the last group).

    Example:
        >>> import timm
        >>> from timm.models import group_parameters
        >>> backbone = timm.create_model("resnet18")
        >>> wrapped = nn.ModuleDict({"backbone": backbone, "exits": nn.ModuleList([nn.Linear(2, 2)])})
        >>> groups = group_parameters(wrapped, wrapper_group_matcher(backbone, ["layer1"], coarse=True))
        >>> [k for k, v in groups.items() if "exits.0.weight" in v] == [
        ...     k for k, v in groups.items() if "backbone.layer1.1.bn2.weight" in v]
        True
    """
    if not hasattr(backbone, "group_matcher"):
        name = backbone.pretrained_cfg.get("architecture", type(backbone).__name__)
        raise NotImplementedError(f"timm backbone {name} has no group_matcher.")
    groups = group_parameters(backbone, backbone.group_matcher(coarse=coarse))
    group_of = {n: layer for layer, names in groups.items() for n in names}
    matcher: Dict[str, List[Any]] = {
        f"layer{layer}": [("^" + re.escape("backbone." + n) + "$", None) for n in names] for layer, names in groups.items()
    }
    last = max(groups)
    for k, module in enumerate(exit_modules):
        under = [layer for n, layer in group_of.items() if not module or n == module or n.startswith(module + ".")]
        matcher[f"layer{max(under, default=last)}"].append((r"^exits\." + str(k) + r"\.", None))
    return matcher


class TimmModelApi(nn.Module):
    """timm's hooks of a model holding ``backbone``, a ``depth_plan`` and its ``exits`` (a mixin; no class-level
    annotations here: TorchScript reads them when it scripts the model)."""

    @torch.jit.ignore
    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """The backbone's ``forward_intermediates`` (timm's signature; independent of the depth).

        Example:
            >>> import torch, coopnets
            >>> m = coopnets.wrap("resnet18")
            >>> [t.shape[1] for t in m.forward_intermediates(torch.randn(1, 3, 64, 64), intermediates_only=True)]
            [64, 64, 128, 256, 512]
        """
        return self.backbone.forward_intermediates(
            x, indices=indices, norm=norm, stop_early=stop_early, output_fmt=output_fmt,
            intermediates_only=intermediates_only,
        )

    @torch.jit.ignore
    def prune_intermediate_layers(
        self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> List[int]:
        """Prune the backbone past the kept ``indices`` (timm's ``prune_intermediate_layers``) and drop every
        exit head: what is left is a feature extractor (one depth, :meth:`forward_intermediates`).
        Returns the kept indices."""
        kept = self.backbone.prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)
        self.depth_plan = ExitsPlan(self.backbone, ExitsConfig(exit_indices=[], head="linear"), None, self.in_chans)
        self.exits = self.depth_plan.exits
        self.num_depths = self._depth = 1
        return kept

    @torch.jit.ignore
    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace every exit's classifier (and the backbone's) for ``num_classes`` classes.

        ``num_classes=0`` leaves identity classifiers (outputs are pooled embeddings);
        ``global_pool=''`` also drops pooling (unpooled maps), as in timm. ``None`` keeps the pooling.

        Example:
            >>> import torch, coopnets
            >>> m = coopnets.wrap("resnet18").eval()
            >>> m.reset_classifier(0, "")
            >>> [m.forward_depth(torch.randn(1, 3, 64, 64), d).shape[1:] for d in (1, 4)]
            [torch.Size([64, 16, 16]), torch.Size([512, 2, 2])]
        """
        if global_pool is None:
            self.backbone.reset_classifier(num_classes)
        else:
            self.backbone.reset_classifier(num_classes, global_pool)
        for head in self.exits:
            head.reset_classifier(num_classes, global_pool)
        self.num_classes = num_classes

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """The backbone's ``no_weight_decay()`` names under ``backbone.`` (timm's optimizer factory reads it)."""
        names = self.backbone.no_weight_decay() if hasattr(self.backbone, "no_weight_decay") else set()
        return {"backbone." + n for n in names}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """The backbone's layer grouping (timm's own, from its ``group_matcher``) under ``backbone.``; exit
        head ``k`` joins the group of the last layer of the stage (or block, with ``exit_points="blocks"``)
        it follows, so layer-wise lr decay treats it as that stage.

        Example:
            >>> import coopnets
            >>> from timm.models import group_parameters
            >>> m = coopnets.wrap("resnet18")
            >>> groups = group_parameters(m, m.group_matcher(coarse=True))
            >>> [k for k, names in groups.items() if "exits.0.fc.weight" in names] == [
            ...     k for k, names in groups.items() if "backbone.layer1.1.bn2.weight" in names]
            True
        """
        return wrapper_group_matcher(self.backbone, self.depth_plan.exit_modules(), coarse)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Gradient checkpointing of every depth: the backbone's own (timm's) and the plan's block-level runs."""
        self.backbone.set_grad_checkpointing(enable)
        self.depth_plan.set_grad_checkpointing(enable)
