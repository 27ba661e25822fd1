"""The checkpoint manifest: which zoo entries have published, measured weights.

``manifest.json`` (next to this file; ``hub/manifest.json`` points here) lists every
checkpoint this project trained and published, with how it was produced (command,
seed, data) and its measured per-depth numbers. A pretrained tag such as
``coop_resnet18.digits`` exists only if it is recorded here.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List

MANIFEST_PATH = Path(__file__).with_name("manifest.json")


@lru_cache(maxsize=1)
def load_manifest() -> List[Dict[str, Any]]:
    """All checkpoint records of the manifest."""
    if not MANIFEST_PATH.exists():
        return []
    return list(json.loads(MANIFEST_PATH.read_text())["checkpoints"])


def pretrained_cfgs_for(model_name: str) -> Dict[str, Dict[str, Any]]:
    """timm pretrained cfgs (``{"name.tag": cfg}``) for the manifest's checkpoints of ``model_name``."""
    from ._builder import coop_cfg

    cfgs = {}
    for rec in load_manifest():
        if rec["model"] != model_name:
            continue
        cfgs[f"{model_name}.{rec['tag']}"] = coop_cfg(
            hf_hub_id=rec["hf_hub_id"],
            num_classes=rec["num_classes"],
            input_size=tuple(rec["input_size"]),
            mean=tuple(rec.get("mean", (0.485, 0.456, 0.406))),
            std=tuple(rec.get("std", (0.229, 0.224, 0.225))),
            crop_pct=rec.get("crop_pct", 1.0),
            interpolation=rec.get("interpolation", "bilinear"),
        )
    return cfgs
