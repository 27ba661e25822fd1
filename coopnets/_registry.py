"""The coopnets model registry: a thin layer over timm's.

Every ``coop_*`` model is registered in timm's registry (so ``timm.create_model`` and
``timm.list_models`` know it after ``import coopnets``) and remembered here, so
coopnets' own listing shows only depth-adaptive models.

Example:
    >>> import coopnets
    >>> "coop_resnet50" in coopnets.list_models("coop_resnet*")
    True
    >>> coopnets.create_model("coop_resnet18", num_classes=10).num_depths
    4
"""
from __future__ import annotations

import difflib
import fnmatch
from typing import TYPE_CHECKING, Any, Callable, List, Optional, TypeVar, Union

import timm
from timm.models import register_model as timm_register_model
from timm.models import split_model_name_tag

if TYPE_CHECKING:
    from .models.depth_adaptive import DepthAdaptiveModel

_COOP_MODELS: set = set()
HUB_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:")

F = TypeVar("F", bound=Callable[..., Any])


def register_model(fn: F) -> F:
    """Decorator: register a ``coop_*`` model builder with timm and with coopnets.

    The function name is the model name and must start with ``coop_``; the module that
    defines it must define ``default_cfgs`` before the decorator runs (timm's rule).
    """
    if not fn.__name__.startswith("coop_"):
        raise ValueError(f"coopnets model names start with 'coop_', got {fn.__name__!r}.")
    timm_register_model(fn)
    _COOP_MODELS.add(fn.__name__)
    return fn


def list_models(pattern: Union[str, List[str]] = "*", pretrained: bool = False) -> List[str]:
    """Names of the registered depth-adaptive models matching ``pattern`` (fnmatch style).

    With ``pretrained=True`` lists ``name.tag`` for every published checkpoint instead.
    """
    names = timm.list_models(pattern, pretrained=pretrained)
    return [n for n in names if split_model_name_tag(n)[0] in _COOP_MODELS]


def is_model(name: str) -> bool:
    return split_model_name_tag(name)[0] in _COOP_MODELS


def create_model(
    model_name: str,
    pretrained: bool = False,
    num_classes: Optional[int] = None,
    **kwargs: Any,
) -> "DepthAdaptiveModel":
    """Create a depth-adaptive model from the zoo, or from a Hub / local checkpoint.

    Args:
        model_name: a zoo name (``coop_resnet50``), optionally with a pretrained tag
            (``coop_resnet18.digits``), or ``hf-hub:ORG/NAME[@REVISION]`` /
            ``local-dir:PATH`` for a published checkpoint.
        pretrained: load the coopnets checkpoint of the tag (downloaded from the
            Hugging Face Hub and cached).
        num_classes: classes of every exit (default: the model's config).
        **kwargs: depth-plan and backbone options of :class:`DepthAdaptiveModel`
            (``plan``, ``exit_indices``, ``head``, ``img_size``, ``drop_rate``...).

    Example:
        >>> import coopnets, torch
        >>> m = coopnets.create_model("coop_resnet18", num_classes=10).set_depth(2)
        >>> m(torch.randn(1, 3, 64, 64)).shape
        torch.Size([1, 10])
    """
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if model_name.startswith(HUB_PREFIXES):
        from .pretrained import create_from_hub

        return create_from_hub(model_name, pretrained=pretrained, **kwargs)
    arch, _tag = split_model_name_tag(model_name)
    if arch not in _COOP_MODELS:
        close = difflib.get_close_matches(arch, sorted(_COOP_MODELS), n=5, cutoff=0.5)
        hint = f"Did you mean: {', '.join(close)}?" if close else f"Available: {', '.join(sorted(_COOP_MODELS))}."
        wrap_hint = " To wrap any timm backbone, use coopnets.wrap(name)." if timm.is_model(arch) else ""
        raise ValueError(f"Unknown coopnets model {model_name!r}. {hint}{wrap_hint}")
    if _tag and model_name not in list_models(f"{arch}.*", pretrained=True):
        tags = list_models(arch, pretrained=True)
        raise ValueError(
            f"{arch} has no pretrained tag {_tag!r}. Published tags: {', '.join(tags) or 'none yet'}."
        )
    return timm.create_model(model_name, pretrained=pretrained, **kwargs)
