"""transformers loads coopnets checkpoints of every format version: older ones are upgraded on load.

transformers (5.x) reads a timm checkpoint (a ``config.json`` with ``pretrained_cfg``)
through ``TimmWrapperConfig`` and builds the model with ``timm.create_model(architecture,
num_classes=config.num_labels, **config.model_args)``; the labels come from the root
``label_names``. Checkpoints of the current format load as they are, after ``import
coopnets`` (which registers the zoo's ``coop_*`` architectures with timm, and lets timm register
the ``coop_<backbone>`` of any other wrapped backbone when it resolves the name:
:mod:`coopnets.models.coop_wrapped`). Checkpoints of
formats 1 and 2 recorded ``num_classes`` inside ``model_args`` too (transformers' call then
fails: "got multiple values for keyword argument 'num_classes'") and their label names
only in ``pretrained_cfg`` (``id2label`` would be ``LABEL_0...``). That call fails in
transformers before timm, hence before anything of coopnets runs, so the upgrade happens
where transformers reads the config: after ``import coopnets``, ``TimmWrapperConfig.from_dict``
first applies :func:`~coopnets.hub.format.upgrade_config` to a copy of a coopnets config
(one with a ``coopnets`` section of an older version). Nothing on disk changes; other
configs pass through untouched.

coopnets does not import transformers for this: :func:`install` patches the class when
transformers' ``timm_wrapper`` configuration module is imported (a one-shot import hook),
or at once if it already is.

Example:
    >>> install()  # done by ``import coopnets``; installing twice changes nothing
    >>> upgrade_for_transformers({"architecture": "resnet18", "model_args": {"num_classes": 3}})["model_args"]
    {'num_classes': 3}
    >>> upgrade_for_transformers({"architecture": "coop_resnet18", "num_classes": 3, "pretrained_cfg": {},
    ...                           "model_args": {"num_classes": 3}, "coopnets": {"format_version": 2}})["model_args"]
    {}
"""
from __future__ import annotations

import copy
import functools
import importlib.abc
import sys
from types import ModuleType
from typing import Any, Dict, Optional

from .format import FORMAT_VERSION, READABLE_VERSIONS, upgrade_config

#: the transformers module that defines ``TimmWrapperConfig``
TARGET = "transformers.models.timm_wrapper.configuration_timm_wrapper"


def upgrade_for_transformers(config_dict: Dict[str, Any]) -> Dict[str, Any]:
    """``config_dict`` upgraded to the current format if it is an older coopnets config, else unchanged (never mutated)."""
    coop = config_dict.get("coopnets") if isinstance(config_dict, dict) else None
    if not isinstance(coop, dict):
        return config_dict
    version = coop.get("format_version")
    if version == FORMAT_VERSION or version not in READABLE_VERSIONS:
        return config_dict
    return upgrade_config(copy.deepcopy(config_dict))


def _patch(module: ModuleType) -> None:
    """Make ``module.TimmWrapperConfig.from_dict`` upgrade older coopnets configs first (idempotent)."""
    cls = getattr(module, "TimmWrapperConfig", None)
    original = getattr(cls, "from_dict", None)
    if original is None or getattr(original, "_coopnets_upgrade", False):
        return
    original = original.__func__

    @functools.wraps(original)
    def from_dict(klass, config_dict, **kwargs):
        return original(klass, upgrade_for_transformers(config_dict), **kwargs)

    from_dict._coopnets_upgrade = True
    cls.from_dict = classmethod(from_dict)


class _PatchingLoader(importlib.abc.Loader):
    """The target module's own loader, with :func:`_patch` run once the module has executed."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        _patch(module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, ... for tracebacks and inspect
        return getattr(self._loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader of :data:`TARGET` found by the other finders, then leaves."""

    def find_spec(self, fullname: str, path: Any = None, target: Optional[ModuleType] = None):
        if fullname != TARGET:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        for finder in sys.meta_path:
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


def install() -> None:
    """Patch ``TimmWrapperConfig`` now if transformers' module is imported, else when it is."""
    module = sys.modules.get(TARGET)
    if module is not None:
        _patch(module)
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
