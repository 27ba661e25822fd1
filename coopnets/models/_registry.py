"""The coopnets model registry: a thin layer over timm's, and a leaf (it imports nothing of coopnets).

Every ``coop_*`` model is registered in timm's registry (so ``timm.create_model`` and
``timm.list_models`` know it after ``import coopnets``) and remembered here, so
coopnets' own listing shows only depth-adaptive models.

Example:
    >>> import coopnets
    >>> "coop_resnet50" in coopnets.list_models("coop_resnet*")
    True
    >>> coopnets.is_model("coop_resnet18.digits"), coopnets.is_model("resnet18")
    (True, False)
"""
from __future__ import annotations

from typing import Any, Callable, List, Set, TypeVar, Union

import timm
from timm.models import register_model as timm_register_model
from timm.models import split_model_name_tag

_COOP_MODELS: Set[str] = set()

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
    """Whether ``name`` (optionally with a ``.tag``) is a registered ``coop_*`` model."""
    return split_model_name_tag(name)[0] in _COOP_MODELS


def model_names() -> List[str]:
    """Every registered ``coop_*`` architecture, sorted."""
    return sorted(_COOP_MODELS)
