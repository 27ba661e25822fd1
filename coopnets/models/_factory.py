"""``create_model``: the one entry point that builds a depth-adaptive model by name.

A zoo name (``coop_resnet50``, optionally ``.tag``) goes through timm's registry, as does
``coop_<backbone>`` for any other timm backbone (registered on demand: :mod:`.coop_wrapped`); a
checkpoint location (``hf-hub:ORG/NAME[@REV]``, ``local-dir:PATH``) is rebuilt from its
``config.json`` by :func:`coopnets.hub.load.create_from_hub`.

Example:
    >>> import coopnets, torch
    >>> m = coopnets.create_model("coop_resnet18", num_classes=10).set_depth(2)
    >>> m(torch.randn(1, 3, 64, 64)).shape
    torch.Size([1, 10])
"""
from __future__ import annotations

import difflib
from typing import Any, Optional

import timm
from timm.models import split_model_name_tag

from ..hub.load import create_from_hub
from ..hub.location import HubLocation
from ..hub.manifest import BUILDER_HINT
from ._registry import is_model, list_models, model_names
from .coop_wrapped import register_wrapped
from .depth_adaptive import DepthAdaptiveModel


def create_model(
    model_name: str,
    pretrained: bool = False,
    num_classes: Optional[int] = None,
    **kwargs: Any,
) -> DepthAdaptiveModel:
    """Create a depth-adaptive model from the zoo, or from a Hub / local checkpoint.

    Args:
        model_name: a zoo name (``coop_resnet50``), optionally with a pretrained tag
            (``coop_resnet18.digits``), ``coop_<backbone>`` for any timm backbone (what
            ``coopnets.wrap(backbone)`` checkpoints record as their architecture), or ``hf-hub:ORG/NAME[@REVISION]`` /
            ``local-dir:PATH`` for a published checkpoint.
        pretrained: load the coopnets checkpoint of the tag (downloaded from the
            Hugging Face Hub and cached).
        num_classes: classes of every exit (default: the model's config).
        **kwargs: depth-plan and backbone options of :class:`DepthAdaptiveModel`
            (``plan``, ``exit_indices``, ``head``, ``img_size``, ``drop_rate``...).

    Example:
        >>> import coopnets
        >>> coopnets.create_model("coop_resnet18", num_classes=10).num_depths
        4
    """
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if HubLocation.is_location(model_name):
        return create_from_hub(HubLocation.parse(model_name), pretrained=pretrained, **kwargs)
    arch, tag = split_model_name_tag(model_name)
    if not register_wrapped(arch):
        close = difflib.get_close_matches(arch, model_names(), n=5, cutoff=0.5)
        hint = f"Did you mean: {', '.join(close)}?" if close else f"Available: {', '.join(model_names())}."
        wrap_hint = " To wrap any timm backbone, use coopnets.wrap(name)." if timm.is_model(arch) else ""
        raise ValueError(f"Unknown coopnets model {model_name!r}. {hint}{wrap_hint}")
    if tag and model_name not in list_models(f"{arch}.*", pretrained=True):
        tags = list_models(arch, pretrained=True)
        raise ValueError(
            f"{arch} has no pretrained tag {tag!r}. Published tags: {', '.join(tags) or 'none yet'}. {BUILDER_HINT}"
        )
    return timm.create_model(model_name, pretrained=pretrained, **kwargs)
