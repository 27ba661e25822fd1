"""The model card (``README.md``) of a coopnets checkpoint, built from its ``config.json``.

The card is rendered with huggingface_hub's :class:`~huggingface_hub.ModelCard` from the
template ``coopnets/hub/templates/model_card.md`` (``hub/model_card_template.md`` points
there). Its metadata holds a ``model-index`` with one top-1 accuracy entry per depth
(the depth is in the metric name), so the Hub shows the accuracy of every depth.

Example:
    >>> import coopnets
    >>> from coopnets.hub import HubLocation
    >>> from coopnets.hub.format import checkpoint_config
    >>> m = coopnets.create_model("coop_resnet18", num_classes=10)
    >>> rows = [{"depth": d, "accuracy": 0.5 + d / 10} for d in range(1, 5)]
    >>> cfg = checkpoint_config(m, per_depth=rows, training={"dataset": "digits"})
    >>> card = model_card(cfg, HubLocation.parse("hf-hub:org/r18"))
    >>> [m["name"] for m in card.data.to_dict()["model-index"][0]["results"][0]["metrics"]][:2]
    ['Top-1 accuracy at depth 1 of 4', 'Top-1 accuracy at depth 2 of 4']
    >>> card_title(cfg, HubLocation.parse("hf-hub:org/r18")), card_title(cfg, HubLocation.local("runs/r18/model"))
    ('r18', 'coop_resnet18.digits')
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..models._registry import is_model
from ..models._utils import default_input_size
from ..models.plans import describe_plan
from .format import missing_data_config
from .location import HubLocation

TEMPLATE_PATH = Path(__file__).with_name("templates") / "model_card.md"


def _si(value: Optional[float], digits: int = 2) -> str:
    """``11689512 -> '11.69M'``; ``'-'`` when unknown."""
    if value is None:
        return "-"
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= factor:
            return f"{value / factor:.{digits}f}{suffix}"
    return f"{value:g}"


def _table_rows(per_depth: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    rows = []
    for row in per_depth:
        acc = row.get("accuracy")
        val = row.get("val_accuracy")
        latency = row.get("latency_ms")
        rows.append({
            **row,
            "accuracy_text": "-" if acc is None else f"{100 * acc:.2f}%",
            "val_accuracy_text": "-" if val is None else f"{100 * val:.2f}%",
            "params_text": _si(row.get("params")),
            "flops_text": _si(row.get("flops")),
            "latency_text": "-" if latency is None else f"{latency:.2f}",
        })
    return rows


def _measured_on(per_depth: List[Dict[str, Any]]) -> str:
    setups = sorted({(str(r.get("device", "unknown device")), r.get("batch_size")) for r in per_depth}, key=str)
    return "; ".join(f"{device}, batch size {bs if bs is not None else 'unknown'}" for device, bs in setups)


def _training_rows(training: Dict[str, Any]) -> Dict[str, str]:
    """The card's training table: scalar fields only (per-net accuracy lists live in the results table)."""
    return {k: f"{v:.4g}" if isinstance(v, float) else str(v) for k, v in training.items()
            if v is not None and not isinstance(v, (dict, list, tuple))}


#: folder names that say nothing about the model (``coopnets train`` writes ``RUN_DIR/model``)
_GENERIC_FOLDER_NAMES = ("model", "checkpoint", "ckpt")


def card_title(config: Dict[str, Any], location: HubLocation) -> str:
    """The card's title: the Hub repo's name, or the folder's unless it is a generic one
    (``model``...), in which case the architecture with the training dataset (``coop_resnet18.digits``)."""
    if location.folder is None or location.name.lower() not in _GENERIC_FOLDER_NAMES:
        return location.name
    dataset = (config["coopnets"].get("training") or {}).get("dataset")
    return f"{config['architecture']}.{dataset}" if dataset else config["architecture"]


def _transformers_id(location: HubLocation) -> str:
    """How transformers names the checkpoint: ``ORG/NAME`` (revision passed apart) or the folder path."""
    return str(location.folder) if location.folder is not None else str(location.repo_id)


def model_card(config: Dict[str, Any], location: HubLocation) -> ModelCard:
    """The model card of a checkpoint with ``config`` (a ``config.json`` dict) loaded from ``location``.

    Args:
        config: the checkpoint's configuration (:func:`coopnets.hub.format.checkpoint_config`).
        location: where it is loaded from, shown in the usage snippet.
    """
    coop = config["coopnets"]
    training = dict(coop.get("training") or {})
    per_depth = list(coop.get("per_depth") or [])
    cfg = config["pretrained_cfg"]
    name = card_title(config, location)
    model_args = config["model_args"]
    dataset = training.get("dataset")
    eval_results = [
        EvalResult(
            task_type="image-classification",
            dataset_type=str(dataset or "unknown"),
            dataset_name=str(dataset or "unknown"),
            metric_type="accuracy",
            metric_value=row["accuracy"],
            metric_name=f"Top-1 accuracy at depth {row['depth']} of {coop['num_depths']}",
        )
        for row in per_depth
        if row.get("accuracy") is not None
    ]
    data = ModelCardData(
        library_name="timm",
        license=cfg.get("license"),
        pipeline_tag="image-classification",
        tags=["image-classification", "timm", "coopnets", "depth-adaptive", "early-exit"],
        datasets=[str(dataset)] if dataset else None,
        model_name=name,
        eval_results=eval_results or None,
    )
    input_size = list(default_input_size(cfg))
    missing = missing_data_config(config)
    return ModelCard.from_template(
        data,
        template_path=str(TEMPLATE_PATH),
        title=name,
        model_id=str(location),
        transformers_id=_transformers_id(location),
        revision=location.revision,
        architecture=config["architecture"],
        timm_loadable=is_model(config["architecture"]),
        backbone=coop["backbone"],
        plan=model_args["plan"],
        plan_text=describe_plan(model_args),
        num_depths=coop["num_depths"],
        example_depth=max(1, coop["num_depths"] - 1),
        num_classes=config["num_classes"],
        input_size=input_size,
        mean=tuple(round(v, 4) for v in cfg.get("mean", ())),
        std=tuple(round(v, 4) for v in cfg.get("std", ())),
        interpolation=cfg.get("interpolation", "bicubic"),
        crop_pct=cfg.get("crop_pct", 0.875),
        crop_mode=cfg.get("crop_mode", "center"),
        label_names=list(config.get("label_names") or cfg.get("label_names") or []),
        recorded=not missing,
        missing=missing,
        digits=dataset == "digits",
        training=_training_rows(training),
        per_depth=_table_rows(per_depth),
        has_val=any(row.get("val_accuracy") is not None for row in per_depth),
        test_split="validation" if training.get("test_split") == "val" else "test",
        measured_on=_measured_on(per_depth),
    )
