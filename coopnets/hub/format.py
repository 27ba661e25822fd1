"""The checkpoint format: file names, ``config.json`` (built, parsed, upgraded) and its errors.

A checkpoint is a folder (a Hub repo, or a local directory) with three files:

``model.safetensors``
    The weights (the state dict at any depth: depth is run-time state). Loading never
    unpickles anything.
``config.json``
    timm's format, as timm's ``save_for_hf`` writes it (``architecture``, ``num_classes``,
    ``num_features``, ``label_names``, ``pretrained_cfg``, ``model_args``), so
    ``timm.create_model("hf-hub:...")``, ``local-dir:`` and transformers'
    ``TimmWrapperConfig`` rebuild the model after ``import coopnets``. ``model_args``
    (:meth:`DepthAdaptiveModel.model_args` without ``num_classes``, which is at the root:
    timm and transformers pass it from there) is the only record of the structure (depth
    plan, exits, block depths, backbone kwargs). ``label_names`` are at the root (what timm
    and transformers' ``id2label`` read) and in ``pretrained_cfg`` (what the loaded model's
    ``pretrained_cfg`` holds). The ``coopnets`` section holds the format version, the
    backbone, the number of depths, the measured per-depth table (``accuracy`` on the test split and,
    since coopnets records it, ``val_accuracy`` on the validation split) and how the model was trained.
``README.md``
    The model card (:mod:`coopnets.hub.card`).

Older versions are upgraded on load (:func:`upgrade_config`): version 1 (coopnets 0.1)
wrote the structure twice (``model_args`` and the ``coopnets`` section); versions 1 and 2
had ``num_classes`` inside ``model_args`` too and the label names only in ``pretrained_cfg``.

Example:
    >>> import coopnets
    >>> cfg = checkpoint_config(coopnets.create_model("coop_resnet18", num_classes=10))
    >>> cfg["architecture"], cfg["num_classes"], cfg["model_args"]["exit_indices"], cfg["coopnets"]["num_depths"]
    ('coop_resnet18', 10, [1, 2, 3], 4)
    >>> "num_classes" in cfg["model_args"]
    False
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence

from timm.models import get_pretrained_cfg
from timm.models._pretrained import filter_pretrained_cfg

from ..models.depth_adaptive import DepthAdaptiveModel

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
CHECKPOINT_FILES = (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME)
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
#: what a checkpoint records about how to feed it, in ``pretrained_cfg`` (timm's field names);
#: :meth:`coopnets.train.data.DataSplits.pretrained_cfg_fields` returns exactly these
DATA_CONFIG_KEYS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std", "num_classes", "label_names")
#: keys of format 1's ``coopnets`` section that repeated ``model_args``
_V1_STRUCTURE_KEYS = ("plan", "exit_indices", "head", "head_width", "block_depths", "backbone_kwargs")


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved, found, downloaded or loaded; the message says what to do."""


def architecture_of(model: DepthAdaptiveModel) -> str:
    """The coop model name that rebuilds ``model``: its zoo entry, else ``coop_<backbone>``."""
    arch = model.pretrained_cfg.get("architecture", "")
    return arch if arch.startswith("coop_") else f"coop_{model.backbone_name}"


def check_per_depth(rows: Optional[Sequence[Dict[str, Any]]], num_depths: int) -> List[Dict[str, Any]]:
    """Per-depth rows sorted by depth; each must name a distinct depth in ``1..num_depths``, and a
    ``val_accuracy``, when given, must be a number in [0, 1] (rows of older checkpoints have none).

    Example:
        >>> check_per_depth([{"depth": 2, "accuracy": 0.9, "val_accuracy": 0.88}, {"depth": 1}], 2)
        [{'depth': 1}, {'depth': 2, 'accuracy': 0.9, 'val_accuracy': 0.88}]
        >>> check_per_depth([{"depth": 1, "val_accuracy": 88}], 2)
        Traceback (most recent call last):
        ...
        ValueError: per_depth row of depth 1: val_accuracy must be a number in [0, 1] (a fraction, not a percentage), got 88.
    """
    checked = [dict(r) for r in rows or []]
    depths = [r.get("depth") for r in checked]
    if any(not isinstance(d, int) or not 1 <= d <= num_depths for d in depths) or len(set(depths)) != len(depths):
        raise ValueError(
            f"per_depth rows need distinct integer 'depth' values in 1..{num_depths}, got {depths}. "
            f"Build them with coopnets.profile(model, ...) and add 'accuracy' per depth."
        )
    for r in checked:
        val = r.get("val_accuracy")
        if val is not None and (hasattr(val, "item") and getattr(val, "ndim", 0) == 0):
            val = r["val_accuracy"] = val.item()
        if val is not None and (isinstance(val, bool) or not isinstance(val, (int, float)) or not 0 <= val <= 1):
            raise ValueError(f"per_depth row of depth {r['depth']}: val_accuracy must be a number in [0, 1] "
                             f"(a fraction, not a percentage), got {val!r}.")
    return sorted(checked, key=lambda r: r["depth"])


def to_json_data(obj: Any, what: str) -> Any:
    """``obj`` as plain JSON data (tuples -> lists, numpy/torch numbers -> Python, paths -> str); a clear error otherwise."""

    def plain(value: Any) -> Any:
        if hasattr(value, "tolist"):
            return value.tolist()
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        raise TypeError(f"{type(value).__name__} {value!r} is not JSON-serializable")

    try:
        return json.loads(json.dumps(obj, default=plain))
    except TypeError as e:
        raise ValueError(f"{what} is not JSON-serializable ({e}); pass plain numbers/strings.") from e


def checkpoint_config(
    model: DepthAdaptiveModel,
    per_depth: Optional[Sequence[Dict[str, Any]]] = None,
    training: Optional[Dict[str, Any]] = None,
    data_config: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """The ``config.json`` of ``model``: timm's fields plus the ``coopnets`` section.

    Args:
        model: the depth-adaptive model.
        per_depth: measured rows, one per depth (``depth``, ``accuracy`` (test), ``val_accuracy``
            (validation: what serving trades depths by, :func:`coopnets.serving.recorded_accuracies`;
            optional), ``params``, ``flops``, ``latency_ms``, ``batch_size``, ``device``).
        training: how it was trained (``method``, ``dataset``, ``epochs``, ``seed``, ``command``...).
        data_config: how the run fed its data (:data:`DATA_CONFIG_KEYS`: timm's data config
            ``input_size``, ``interpolation``, ``crop_pct``, ``crop_mode``, ``mean``, ``std``,
            plus ``num_classes`` and ``label_names``), stored in ``pretrained_cfg`` (the label
            names also at the root: :func:`apply_data_config`). Build it
            with ``DataSplits.pretrained_cfg_fields()``; without it the model's own
            ``pretrained_cfg`` defaults are recorded and loading warns (:func:`missing_data_config`).

    Example:
        >>> import coopnets
        >>> m = coopnets.create_model("coop_resnet18", num_classes=2)
        >>> cfg = checkpoint_config(m, data_config={"input_size": (3, 16, 16), "label_names": ["cat", "dog"]})
        >>> cfg["pretrained_cfg"]["input_size"], cfg["pretrained_cfg"]["label_names"], cfg["label_names"]
        ([3, 16, 16], ['cat', 'dog'], ['cat', 'dog'])
        >>> checkpoint_config(m, data_config={"label_names": ["cat"]})
        Traceback (most recent call last):
        ...
        ValueError: data_config['label_names'] names 1 classes but the model has 2.
    """
    if not isinstance(model, DepthAdaptiveModel):
        raise TypeError(f"expected a coopnets DepthAdaptiveModel, got {type(model).__name__}; wrap a timm model with coopnets.wrap(...).")
    architecture = architecture_of(model)
    pretrained_cfg = filter_pretrained_cfg(dict(model.pretrained_cfg), remove_source=True)
    pretrained_cfg = {k: v for k, v in pretrained_cfg.items() if k not in ("tag", "state_dict")}
    if len(pretrained_cfg.get("label_names") or ()) != model.num_classes:  # e.g. stale after reset_classifier(n)
        pretrained_cfg.pop("label_names", None)
    pretrained_cfg.update(architecture=architecture, num_classes=model.num_classes)
    config = {
        "architecture": architecture,
        "num_classes": model.num_classes,
        "num_features": model.num_features,
        "pretrained_cfg": pretrained_cfg,
        "model_args": structure_args(model),
        "coopnets": {
            "format_version": FORMAT_VERSION,
            "backbone": model.backbone_name,
            "num_depths": model.num_depths,
            "per_depth": check_per_depth(per_depth, model.num_depths),
            "training": dict(training or {}),
        },
    }
    apply_data_config(config, data_config)
    return to_json_data(config, f"checkpoint config of {architecture}")


def structure_args(model: DepthAdaptiveModel) -> Dict[str, Any]:
    """The ``model_args`` a checkpoint records: :meth:`DepthAdaptiveModel.model_args` without
    ``num_classes`` (recorded once, at the root of ``config.json``).

    Example:
        >>> import coopnets
        >>> structure_args(coopnets.wrap("resnet18", num_classes=10))
        {'plan': 'exits', 'exit_indices': [1, 2, 3], 'head': 'mlp'}
    """
    return {k: v for k, v in model.model_args().items() if k != "num_classes"}


def apply_data_config(config: Dict[str, Any], data_config: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Record ``data_config`` (:data:`DATA_CONFIG_KEYS`) in a ``config.json`` dict, in place: the fields
    in ``pretrained_cfg``, the label names also at the root; checked against the config's ``num_classes``.

    Example:
        >>> cfg = {"num_classes": 2, "pretrained_cfg": {"num_classes": 2}}
        >>> apply_data_config(cfg, {"mean": (0.5,), "label_names": ["cat", "dog"]})["label_names"]
        ['cat', 'dog']
        >>> cfg["pretrained_cfg"]["mean"], cfg["pretrained_cfg"]["label_names"]
        ((0.5,), ['cat', 'dog'])
        >>> apply_data_config(cfg, {"label_names": ["cat"]})
        Traceback (most recent call last):
        ...
        ValueError: data_config['label_names'] names 1 classes but the model has 2.
    """
    data_config = dict(data_config or {})
    unknown = set(data_config) - set(DATA_CONFIG_KEYS)
    if unknown:
        raise ValueError(f"data_config keys must be among {DATA_CONFIG_KEYS}, got {sorted(unknown)}.")
    num_classes = config["num_classes"]
    if data_config.get("num_classes", num_classes) != num_classes:
        raise ValueError(f"data_config['num_classes'] is {data_config['num_classes']} but the model has {num_classes}.")
    if "label_names" in data_config and len(data_config["label_names"]) != num_classes:
        raise ValueError(f"data_config['label_names'] names {len(data_config['label_names'])} classes but the model has {num_classes}.")
    config["pretrained_cfg"].update(data_config)
    _lift_label_names(config)
    return config


def _lift_label_names(config: Dict[str, Any]) -> None:
    """Put ``pretrained_cfg``'s label names at the root, where timm's ``save_for_hf`` puts them
    (timm and transformers read them there), keeping root and ``pretrained_cfg`` in agreement."""
    names = config.get("label_names") or config["pretrained_cfg"].get("label_names")
    if names:
        config["label_names"] = config["pretrained_cfg"]["label_names"] = list(names)


def missing_data_config(config: Dict[str, Any]) -> List[str]:
    """The :data:`DATA_CONFIG_KEYS` a checkpoint's ``pretrained_cfg`` lacks (checkpoints saved
    before coopnets recorded the run's preprocessing lack some; then timm's defaults apply).

    Example:
        >>> missing_data_config({"pretrained_cfg": {"input_size": [3, 224, 224], "mean": [0.5], "std": [0.5]}})
        ['interpolation', 'crop_pct', 'crop_mode', 'num_classes', 'label_names']
    """
    cfg = config.get("pretrained_cfg") or {}
    return [k for k in DATA_CONFIG_KEYS if k not in cfg]


def parse_config(text: str, where: object) -> Dict[str, Any]:
    """A ``config.json`` text as the current format (older versions upgraded); ``where`` names it in errors.

    Example:
        >>> cfg = parse_config('{"architecture": "coop_x", "model_args": {"plan": "exits"},'
        ...                    ' "coopnets": {"format_version": 1, "plan": "exits", "num_depths": 2}}', "demo")
        >>> cfg["coopnets"], cfg["model_args"]
        ({'format_version': 3, 'num_depths': 2}, {'plan': 'exits'})
    """
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{where}: {CONFIG_NAME} is not valid JSON ({e}); re-save the checkpoint with coopnets.save_pretrained.") from e
    if not isinstance(config, dict) or not isinstance(config.get("coopnets"), dict) or "architecture" not in config:
        raise CheckpointError(
            f"{where}: {CONFIG_NAME} has no 'coopnets' section, so this is not a coopnets checkpoint "
            f"(a plain timm model loads with timm.create_model). Save coopnets models with coopnets.save_pretrained."
        )
    version = config["coopnets"].get("format_version")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{where}: checkpoint format version {version!r}; this coopnets reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}. Upgrade coopnets."
        )
    return upgrade_config(config)


def upgrade_config(config: Dict[str, Any]) -> Dict[str, Any]:
    """A parsed ``config.json`` of a readable older format version, upgraded in place to the current one.

    Version 1 -> 2: the structure keys repeated in the ``coopnets`` section are dropped
    (``model_args`` holds them). Version 2 -> 3: ``num_classes`` leaves ``model_args`` (it is at
    the root), the label names are also put at the root, and a ``pool_size`` that the backbone
    does not have (zoo ViTs claimed ``(7, 7)``; their features are tokens) becomes ``None``.
    Current or unknown versions are returned unchanged. transformers' loading runs this too
    (:mod:`coopnets.hub.transformers_compat`).

    Example:
        >>> cfg = upgrade_config({"num_classes": 2, "model_args": {"num_classes": 2, "plan": "exits"},
        ...                       "pretrained_cfg": {"label_names": ["cat", "dog"]}, "coopnets": {"format_version": 2}})
        >>> cfg["model_args"], cfg["label_names"], cfg["coopnets"]["format_version"]
        ({'plan': 'exits'}, ['cat', 'dog'], 3)
    """
    coop = config.get("coopnets") if isinstance(config, dict) else None
    version = coop.get("format_version") if isinstance(coop, dict) else None
    if version == 1:  # the structure lived in model_args and (again) in the coopnets section
        for key in _V1_STRUCTURE_KEYS:
            coop.pop(key, None)
        version = 2
    if version == 2:  # num_classes lived in model_args too; the label names only in pretrained_cfg
        model_args = config.get("model_args") or {}
        if "num_classes" in model_args:
            config.setdefault("num_classes", model_args["num_classes"])
        config["model_args"] = {k: v for k, v in model_args.items() if k != "num_classes"}
        if isinstance(config.get("pretrained_cfg"), dict):
            _lift_label_names(config)
            backbone_cfg = get_pretrained_cfg(str(coop.get("backbone")))
            if backbone_cfg is not None and backbone_cfg.pool_size is None:
                config["pretrained_cfg"]["pool_size"] = None
        coop["format_version"] = version = FORMAT_VERSION
    return config
