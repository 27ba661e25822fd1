"""Reading checkpoints: :func:`create_from_hub` (build from a checkpoint's config) and
:func:`load_pretrained` (load a zoo tag's weights into a built model).

Loading is strict: the checkpoint's architecture, structure (``model_args``), classes and
state dict keys must match the model, and downloaded files are checked against the
Hub's hashes; every failure is a :class:`~coopnets.hub.format.CheckpointError` that
names the checkpoint and says what to do. ``config.json`` is read once per load (older
format versions upgraded: :func:`~coopnets.hub.format.upgrade_config`).

Every loader takes huggingface_hub's arguments under their names: ``revision`` (as well as
``@REV``), ``token``, ``force_download``, ``local_files_only`` and ``cache_dir``
(:data:`~coopnets.hub.location.DOWNLOAD_ARGS`).

Example:
    >>> import coopnets, tempfile
    >>> path = coopnets.save_pretrained(coopnets.wrap("test_resnet", num_classes=3), tempfile.mkdtemp() + "/t")
    >>> coopnets.create_model(f"local-dir:{path}", pretrained=True, local_files_only=True).num_classes
    3
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Union

import safetensors.torch
import timm

from ..models._registry import UnknownBackboneError, is_model, list_models
from ..models.depth_adaptive import DepthAdaptiveModel
from ..models.plans import structure_keys
from .format import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    architecture_of,
    missing_data_config,
    parse_config,
    structure_args,
    to_json_data,
)
from .location import HubLocation, pop_download_args
from .manifest import BUILDER_HINT

CacheDir = Optional[Union[str, Path]]


def read_config(location: HubLocation, cache_dir: CacheDir = None, **download: Any) -> Dict[str, Any]:
    """The checkpoint's ``config.json`` in the current format (downloaded and cached for a Hub repo;
    ``download``: ``token``, ``force_download``, ``local_files_only``).

    A checkpoint that does not record how it was fed (:func:`~coopnets.hub.format.missing_data_config`,
    e.g. one saved before coopnets recorded it) still loads, with one ``UserWarning`` naming
    the missing fields.
    """
    config = parse_config(location.fetch(CONFIG_NAME, cache_dir, **download).read_text(), location)
    check_config_fields(config, location)
    missing = missing_data_config(config)
    if missing:
        cfg = config["pretrained_cfg"]
        warnings.warn(
            f"{location} does not record how its training data was fed (no {', '.join(missing)} in its "
            f"pretrained_cfg; it was saved by an older coopnets or without data_config), so timm's data config "
            f"falls back to input_size {cfg.get('input_size', 'default')}, mean {cfg.get('mean', 'default')}, "
            f"std {cfg.get('std', 'default')}, which may not be what it was trained on. Re-save it with "
            f"save_pretrained(..., data_config=splits.pretrained_cfg_fields()).",
            UserWarning, stacklevel=3,
        )
    return config


def check_config_fields(config: Dict[str, Any], location: Any) -> None:
    """Refuse (one :class:`CheckpointError` naming every bad field) a ``config.json`` whose fields a build reads
    are missing or of the wrong type; a missing ``pretrained_cfg`` counts as empty.

    Example:
        >>> check_config_fields({"architecture": "coop_resnet18", "num_classes": "ten", "coopnets": {}}, "demo")
        Traceback (most recent call last):
        ...
        coopnets.hub.format.CheckpointError: demo: config.json is damaged: num_classes must be an int >= 1 (got 'ten'); model_args is missing (a JSON object of the model's structure: plan, exit_indices, head...). Re-save the checkpoint with coopnets.save_pretrained, or restore its config.json.
    """
    config.setdefault("pretrained_cfg", {})
    args = config.get("model_args")
    checks = [("architecture", config.get("architecture"), lambda v: isinstance(v, str) and v, "a model name"),
              ("num_classes", config.get("num_classes"), lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
               "an int >= 1"),
              ("model_args", args, lambda v: isinstance(v, dict), "a JSON object of the model's structure: plan, "
                                                                  "exit_indices, head..."),
              ("pretrained_cfg", config["pretrained_cfg"], lambda v: isinstance(v, dict), "a JSON object")]
    if isinstance(args, dict) and "num_classes" in args:
        checks.append(("model_args.num_classes", args["num_classes"], checks[1][2], "an int >= 1"))
    if not is_model(str(config.get("architecture"))):
        checks.append(("coopnets.backbone", config["coopnets"].get("backbone"), lambda v: isinstance(v, str) and v,
                       "the timm backbone name"))
    problems = [f"{name} is missing ({rule})" if value is None else f"{name} must be {rule} (got {value!r})"
                for name, value, ok, rule in checks if not ok(value)]
    if problems:
        raise CheckpointError(f"{location}: {CONFIG_NAME} is damaged: {'; '.join(problems)}. Re-save the checkpoint "
                              f"with coopnets.save_pretrained, or restore its {CONFIG_NAME}.")


def _check_compatible(model: DepthAdaptiveModel, config: Dict[str, Any], location: HubLocation) -> None:
    keys = ("architecture", *structure_keys())
    args = to_json_data(structure_args(model), "model_args")
    expected = {"architecture": architecture_of(model), "num_classes": model.num_classes, **args}
    found = {"architecture": config["architecture"], "num_classes": config["num_classes"], **config["model_args"]}
    diffs = [f"{k}: checkpoint {found.get(k)!r}, model {expected.get(k)!r}" for k in keys if found.get(k) != expected.get(k)]
    if diffs:
        hint = (
            "To fine-tune on other classes, load it as saved and call model.reset_classifier(n)."
            if [d.split(":")[0] for d in diffs] == ["num_classes"]
            else f"Load it with coopnets.create_model('{location}', pretrained=True), which rebuilds the model from the checkpoint's config."
        )
        raise CheckpointError(f"{location} does not match the requested model ({'; '.join(diffs)}). {hint}")


def _load_weights(model: DepthAdaptiveModel, path: Path, location: HubLocation) -> None:
    try:
        state_dict = safetensors.torch.load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own error types for truncated/corrupted files
        raise CheckpointError(
            f"{location}: {WEIGHTS_NAME} is truncated or corrupted ({e}). Download it again "
            f"(hf_hub_download(..., force_download=True)) or re-save the checkpoint."
        ) from e
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = [f"{label} ({len(keys)}): {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}"
                 for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if keys]
        raise CheckpointError(
            f"{location}: the weights do not fit the model: {'; '.join(parts)}. The checkpoint was saved from a "
            f"differently configured model; load it with coopnets.create_model('{location}', pretrained=True), "
            f"which rebuilds the model from the checkpoint's config.json (model_args)."
        )
    model.load_state_dict(state_dict, strict=True)


def load_checkpoint_into(model: DepthAdaptiveModel, location: HubLocation, config: Dict[str, Any],
                         cache_dir: CacheDir = None, **download: Any) -> DepthAdaptiveModel:
    """Check ``model`` against the checkpoint's (already read) ``config`` and load its weights strictly."""
    _check_compatible(model, config, location)
    _load_weights(model, location.fetch(WEIGHTS_NAME, cache_dir, **download), location)
    return model


def load_pretrained(model: DepthAdaptiveModel, cache_dir: CacheDir = None, revision: Optional[str] = None,
                    **download: Any) -> DepthAdaptiveModel:
    """Load the coopnets checkpoint named by ``model.pretrained_cfg`` into ``model`` (strictly).

    The checkpoint is ``pretrained_cfg["file"]`` (a local folder) or
    ``pretrained_cfg["hf_hub_id"]`` (``ORG/NAME[@REVISION]``, downloaded with
    ``hf_hub_download`` into the Hub cache). Zoo entries call this for ``pretrained=True``.
    ``revision`` and ``download`` (``token``, ``force_download``, ``local_files_only``) are
    huggingface_hub's arguments.

    Raises:
        CheckpointError: no published weights, not found, offline without a cached copy,
            corrupted download, or a checkpoint that does not match the model.

    Example:
        >>> import coopnets
        >>> coopnets.create_model("coop_resnet18", pretrained=True)  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        coopnets.hub.format.CheckpointError: coop_resnet18 has no published coopnets weights ...
    """
    cfg = model.pretrained_cfg
    arch = cfg.get("architecture") or architecture_of(model)
    location = HubLocation.from_pretrained_cfg(cfg) if arch.startswith("coop_") or cfg.get("file") else None
    if location is None:
        published = list_models(f"{arch}.*", pretrained=True)
        raise CheckpointError(
            f"{arch} has no published coopnets weights for this config (no hf_hub_id). "
            f"Published checkpoints: {', '.join(published) or 'none for this model yet'}. {BUILDER_HINT} "
            f"For timm's ImageNet backbone weights instead, pass pretrained_backbone=True."
        )
    location = location.at_revision(revision)
    return load_checkpoint_into(model, location, read_config(location, cache_dir, **download), cache_dir, **download)


def create_from_hub(location: HubLocation, pretrained: bool = False, **kwargs: Any) -> DepthAdaptiveModel:
    """Build the model of the checkpoint at ``location`` from its config; ``pretrained=True`` loads its weights.

    The structure comes from the checkpoint's ``config.json`` (``num_classes`` and
    ``model_args``; ``kwargs`` override them). Zoo architectures and the ``coop_<backbone>`` of
    other wrapped timm backbones (registered on demand when timm resolves the name:
    :mod:`coopnets.models.coop_wrapped`) go through timm's registry, as they do in
    ``timm.create_model`` and transformers; a backbone this timm lacks is a
    :class:`CheckpointError` naming it and the timm version.
    ``kwargs`` may hold huggingface_hub's ``revision``, ``token``, ``force_download``,
    ``local_files_only`` and ``cache_dir``. Called by ``coopnets.create_model("hf-hub:...")``.
    """
    download = pop_download_args(kwargs)
    location = location.at_revision(kwargs.pop("revision", None))
    config = read_config(location, **download)
    pretrained_cfg = {**config["pretrained_cfg"], **location.pretrained_cfg_fields()}
    args = {"num_classes": config["num_classes"], **config["model_args"], **kwargs}
    arch, backbone = config["architecture"], config["coopnets"].get("backbone")
    try:
        if is_model(arch) or arch == f"coop_{backbone}":  # wrapped backbones: registered on demand by timm's name check
            model = timm.create_model(arch, pretrained=False, pretrained_cfg=pretrained_cfg, **args)
        else:
            model = DepthAdaptiveModel(backbone, **args)
            model.pretrained_cfg = model.default_cfg = pretrained_cfg
    except UnknownBackboneError as e:  # this timm lacks the wrapped backbone
        raise CheckpointError(f"{location}: {e}") from None
    except (ValueError, TypeError) as e:  # model_args a plan's config or the timm model refuses
        raise CheckpointError(f"{location}: the model_args of its {CONFIG_NAME} do not build a model "
                              f"({' '.join(str(e).split())}). Re-save the checkpoint with coopnets.save_pretrained, "
                              f"or restore its {CONFIG_NAME}.") from None
    return load_checkpoint_into(model, location, config, **download) if pretrained else model
