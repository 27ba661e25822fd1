"""``coop_<backbone>``: any timm backbone wrapped as a depth-adaptive model, registered on demand.

``coopnets.wrap("mobilenetv3_small_100")`` (and ``coopnets train --model mobilenetv3_small_100``)
saves checkpoints whose ``architecture`` is ``coop_mobilenetv3_small_100``, a name no family
file registers. timm resolves every model it creates, whether named directly or read from a
checkpoint's ``config.json`` (``hf-hub:``, ``local-dir:``, and transformers' ``TimmWrapper``,
which calls ``timm.create_model(config.architecture, **config.model_args)``), through one check
in ``timm.models._factory``: ``is_model(name)``, right before ``model_entrypoint(name)``.
:func:`install` (run once by ``import coopnets``) wraps that one check: a name timm already
knows answers as before; an unknown ``coop_<backbone>`` whose ``<backbone>`` is a timm model is
registered first (:func:`register_wrapped`: with timm; coopnets' :func:`~coopnets.is_model` knows
every such name, its zoo listing does not show them) and then answers ``True``; an unknown ``coop_<backbone>`` whose backbone this timm
lacks raises :class:`UnknownBackboneError` naming the backbone and the timm version. Every other
name is timm's business (``Unknown model``). The builder is the zoo's
(:func:`~coopnets.models._builder.build_coop_model`, with the backbone's pretrained config), so
the checkpoint's ``model_args`` (plan, exits, backbone kwargs) rebuild the same structure
wherever it is loaded. Nothing else of timm is changed.

Example:
    >>> import coopnets, timm
    >>> m = timm.create_model("coop_test_vit", num_classes=3)
    >>> type(m).__name__, m.backbone_name, coopnets.is_model("coop_test_vit")
    ('DepthAdaptiveModel', 'test_vit', True)
    >>> "coop_test_vit" in coopnets.list_models()  # the zoo listing shows zoo entries only
    False
"""
from __future__ import annotations

import difflib
import functools
import threading
from typing import Any, Dict, List

import timm
from timm.models import split_model_name_tag

from ._builder import build_coop_model, zoo_cfgs
from ._registry import UnknownBackboneError, is_model, register_wrapped_model, wrapped_backbone
from .depth_adaptive import DepthAdaptiveModel

#: timm reads the pretrained configs of a registered function from its module's ``default_cfgs``
default_cfgs: Dict[str, Any] = {}
__all__: List[str] = ["UnknownBackboneError", "install", "register_wrapped", "wrapped_backbone"]  # + the registered names

_LOCK = threading.Lock()


def unknown_backbone_message(arch: str, backbone: str) -> str:
    """One line: ``arch`` wraps ``backbone``, which the installed timm lacks (close names, what to do)."""
    if backbone.startswith("coop_"):
        return f"{arch!r} is not a coopnets architecture: {backbone!r} is a coopnets model name, not a timm backbone."
    close = difflib.get_close_matches(backbone, [n for n in timm.list_models() if not n.startswith("coop_")], n=3, cutoff=0.7)
    hint = f" Did you mean: {', '.join(close)}?" if close else " timm.list_models() lists its models."
    return (f"Unknown timm backbone {backbone!r} of coopnets architecture {arch!r}: timm {timm.__version__} has no "
            f"model {backbone!r}.{hint} Load it with a timm version that has {backbone!r} (pip install -U timm).")


def register_wrapped(name: str, strict: bool = False) -> bool:
    """Register ``coop_<backbone>`` (``name``, ``.tag`` ignored) with timm if it is not registered yet and
    ``<backbone>`` is a timm model. Returns whether ``name`` is now a registered coopnets model (zoo entries too).

    With ``strict``, a ``coop_<backbone>`` whose backbone this timm lacks raises :class:`UnknownBackboneError`
    (naming the backbone and the timm version) instead of returning ``False``.
    """
    arch = split_model_name_tag(name)[0]
    if timm.is_model(arch):  # a zoo entry, registered before, or a plain timm model
        return is_model(arch)
    backbone = wrapped_backbone(arch)
    if backbone is None:
        if strict and arch.startswith("coop_") and len(arch) > len("coop_"):
            raise UnknownBackboneError(unknown_backbone_message(arch, arch[len("coop_"):]))
        return False
    with _LOCK:
        if not timm.is_model(arch):
            default_cfgs.update(zoo_cfgs(arch))
            register_wrapped_model(_entrypoint(arch, backbone))
    return True


def _entrypoint(arch: str, backbone: str):
    """The registered builder of ``arch``: the zoo's builder around ``backbone``."""

    def build(pretrained: bool = False, **kwargs: Any) -> DepthAdaptiveModel:
        return build_coop_model(arch, backbone, pretrained, **kwargs)

    build.__name__ = build.__qualname__ = arch
    build.__module__ = __name__
    build.__doc__ = f"{backbone} (timm) as a depth-adaptive model, registered on demand by coopnets."
    return build


def install() -> None:
    """Make timm resolve ``coop_<backbone>`` names on demand: wrap ``timm.models._factory.is_model``, the
    check ``timm.create_model`` runs on every name it creates (named, ``hf-hub:``, ``local-dir:``) before
    ``model_entrypoint``. Idempotent; done by ``import coopnets``."""
    from timm.models import _factory

    check = getattr(_factory, "is_model", None)
    if check is None or getattr(check, "_coopnets_on_demand", False):
        return

    @functools.wraps(check)
    def is_model_or_wrapped(model_name: str) -> bool:
        return check(model_name) or register_wrapped(model_name, strict=True)

    is_model_or_wrapped._coopnets_on_demand = True  # type: ignore[attr-defined]
    _factory.is_model = is_model_or_wrapped
