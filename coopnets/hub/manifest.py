"""The checkpoint manifest: which zoo entries have published, measured weights.

``manifest.json`` (next to this file; ``hub/manifest.json`` points here) lists every
checkpoint this project trained and published, with how it was produced (command,
seed, data) and its measured per-depth numbers. A pretrained tag such as
``coop_resnet18.digits`` exists only if it is recorded here.
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List

MANIFEST_PATH = Path(__file__).with_name("manifest.json")
#: what to do when a zoo entry has no published checkpoint
BUILDER_HINT = (
    "Train one with `coopnets train ... --out RUN_DIR`, publish it with "
    "`coopnets push RUN_DIR --repo-id ORG/NAME` (zoo entries: `python hub/publish.py RUN_DIR --repo-id ORG/NAME --tag TAG`), "
    "then load it with coopnets.create_model('hf-hub:ORG/NAME', pretrained=True)."
)


@lru_cache(maxsize=1)
def load_manifest() -> List[Dict[str, Any]]:
    """All checkpoint records of the manifest."""
    if not MANIFEST_PATH.exists():
        return []
    return list(json.loads(MANIFEST_PATH.read_text())["checkpoints"])


#: ``ORG/NAME@<40-hex commit>``: a record pinned to a pushed commit
_PINNED = re.compile(r"^[^@\s]+/[^@\s]+@[0-9a-f]{40}$")


def is_pinned(hf_hub_id: Any) -> bool:
    """Whether ``hf_hub_id`` names a pushed commit (``ORG/NAME@SHA``, 40 hex digits), not a branch or nothing.

    Example:
        >>> is_pinned("org/r18@" + "a" * 40), is_pinned("org/r18@main"), is_pinned("org/r18"), is_pinned(None)
        (True, False, False, False)
    """
    return isinstance(hf_hub_id, str) and bool(_PINNED.match(hf_hub_id))


def _preprocessing(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The preprocessing fields of a pretrained cfg or manifest record (lists for sizes and statistics)."""
    return {
        "input_size": list(cfg["input_size"]),
        "mean": list(cfg["mean"]),
        "std": list(cfg["std"]),
        "crop_pct": cfg.get("crop_pct", 1.0),
        "interpolation": cfg.get("interpolation", "bilinear"),
        **{k: cfg[k] for k in ("crop_mode", "label_names") if k in cfg},
    }


def pretrained_cfgs_for(model_name: str) -> Dict[str, Dict[str, Any]]:
    """Pretrained-cfg fields (``{"name.tag": {...}}``) of the manifest's checkpoints of ``model_name``.

    The zoo builder (:func:`coopnets.models._builder.zoo_cfgs`) merges them into the
    entry's default cfg; every record carries its own preprocessing. Only records pinned
    to a pushed commit (:func:`is_pinned`) give a tag, so ``list_models(pretrained=True)``
    never lists weights that were not published.
    """
    cfgs = {}
    for rec in load_manifest():
        if rec["model"] != model_name or not is_pinned(rec.get("hf_hub_id")):
            continue
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in _preprocessing(rec).items()}
        cfgs[f"{model_name}.{rec['tag']}"] = {"hf_hub_id": rec["hf_hub_id"], "num_classes": rec["num_classes"], **fields}
    return cfgs


REQUIRED_TRAINING_KEYS = ("command", "seed", "dataset")


def checkpoint_record(config: Dict[str, Any], model: str, tag: str, hf_hub_id: str) -> Dict[str, Any]:
    """The manifest record of a published checkpoint, from its ``config.json``.

    The numbers come only from the checkpoint's own measured ``coopnets.per_depth`` table,
    and its ``coopnets.training`` record must say how it was produced (command, seed,
    dataset); otherwise it cannot enter the zoo.

    Example:
        >>> import coopnets
        >>> from coopnets.hub.format import checkpoint_config
        >>> cfg = checkpoint_config(coopnets.create_model("coop_resnet18", num_classes=10),
        ...     per_depth=[{"depth": d, "accuracy": 0.8} for d in range(1, 5)],
        ...     training={"command": "coopnets train ...", "seed": 0, "dataset": "digits"})
        >>> checkpoint_record(cfg, "coop_resnet18", "digits", "org/coop_resnet18.digits@abc")["num_classes"]
        10
    """
    coop = config["coopnets"]
    training = coop.get("training") or {}
    per_depth = coop.get("per_depth") or []
    problems = [f"training record lacks {k!r}" for k in REQUIRED_TRAINING_KEYS if k not in training]
    if len(per_depth) != coop["num_depths"] or any(r.get("accuracy") is None for r in per_depth):
        problems.append(f"per_depth must hold a measured accuracy for each of the {coop['num_depths']} depths")
    if config["architecture"] != model:
        problems.append(f"the checkpoint is a {config['architecture']}, not a {model}")
    if problems:
        raise ValueError(
            f"cannot record {model}.{tag}: {'; '.join(problems)}. Zoo checkpoints must come from a real "
            f"`coopnets train` run, whose checkpoint folder records these."
        )
    cfg = config["pretrained_cfg"]
    return {
        "model": model,
        "tag": tag,
        "hf_hub_id": hf_hub_id,
        "num_classes": config["num_classes"],
        **_preprocessing(cfg),
        "training": dict(training),
        "per_depth": list(per_depth),
    }


def add_checkpoint(record: Dict[str, Any], path: Path = MANIFEST_PATH) -> None:
    """Add (or replace, by model and tag) a checkpoint record in the manifest file at ``path``."""
    records = json.loads(path.read_text())["checkpoints"] if path.exists() else []
    records = [r for r in records if (r["model"], r["tag"]) != (record["model"], record["tag"])] + [record]
    records.sort(key=lambda r: (r["model"], r["tag"]))
    path.write_text(json.dumps({"checkpoints": records}, indent=2) + "\n")
    load_manifest.cache_clear()
