"""The coopnets model registry: a thin layer over timm's, and a leaf (it imports nothing of coopnets).

Every ``coop_*`` model is registered in timm's registry (so ``timm.create_model`` and
``timm.list_models`` know it after ``import coopnets``) and remembered here, so
coopnets' own listing shows only depth-adaptive models: the zoo's (:func:`register_model`).
``coop_<backbone>`` for any other timm backbone (what ``coopnets.wrap(backbone)`` checkpoints
record: :func:`wrapped_backbone`) is a coopnets architecture too (:func:`is_model`), registered
with timm on demand (:func:`register_wrapped_model`, by :mod:`coopnets.models.coop_wrapped`);
the zoo listing does not show those.

Example:
    >>> import coopnets
    >>> "coop_resnet50" in coopnets.list_models("coop_resnet*")
    True
    >>> coopnets.is_model("coop_resnet18.digits"), coopnets.is_model("resnet18"), coopnets.is_model("coop_resnet18d")
    (True, False, True)
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Set, TypeVar, Union

import timm
from timm.models import register_model as timm_register_model
from timm.models import split_model_name_tag

_COOP_MODELS: Set[str] = set()

F = TypeVar("F", bound=Callable[..., Any])


class UnknownBackboneError(RuntimeError):
    """``coop_<backbone>`` names a backbone the installed timm does not have (a ``RuntimeError``, as timm's
    ``Unknown model``; its message does not start so, so transformers passes it on unchanged)."""


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


def register_wrapped_model(fn: F) -> F:
    """Register the ``coop_<backbone>`` builder of a wrapped timm backbone with timm, outside the zoo listing
    (:func:`list_models`); :mod:`coopnets.models.coop_wrapped` makes them on demand."""
    if wrapped_backbone(fn.__name__) is None:
        raise ValueError(f"{fn.__name__!r} is not coop_<backbone> of a timm backbone outside the zoo.")
    timm_register_model(fn)
    return fn


def wrapped_backbone(name: str) -> Optional[str]:
    """The timm backbone ``<backbone>`` of ``coop_<backbone>`` (``.tag`` ignored) when it is no zoo entry and the
    installed timm has it (registered on demand or not yet); ``None`` for every other name.

    Example:
        >>> wrapped_backbone("coop_mobilenetv3_small_100"), wrapped_backbone("coop_resnet18"), wrapped_backbone("resnet18")
        ('mobilenetv3_small_100', None, None)
    """
    arch = split_model_name_tag(name)[0]
    backbone = arch[len("coop_"):] if arch.startswith("coop_") else ""
    if not backbone or backbone.startswith("coop_") or arch in _COOP_MODELS:
        return None
    return backbone if timm.is_model(backbone) else None


def list_models(pattern: Union[str, List[str]] = "*", pretrained: bool = False) -> List[str]:
    """Names of the registered depth-adaptive models matching ``pattern`` (fnmatch style).

    With ``pretrained=True`` lists ``name.tag`` for every published checkpoint instead.
    """
    names = timm.list_models(pattern, pretrained=pretrained)
    return [n for n in names if split_model_name_tag(n)[0] in _COOP_MODELS]


def is_model(name: str) -> bool:
    """Whether ``name`` (optionally with a ``.tag``) is a coopnets architecture: a zoo entry, or ``coop_<backbone>``
    of a backbone the installed timm has (:func:`wrapped_backbone`; timm learns it on demand)."""
    arch = split_model_name_tag(name)[0]
    return arch in _COOP_MODELS or wrapped_backbone(arch) is not None


def model_names() -> List[str]:
    """Every ``coop_*`` architecture of the zoo, sorted."""
    return sorted(_COOP_MODELS)
