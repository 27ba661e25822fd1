"""One builder for every zoo entry, in timm's shape: pretrained configs are data.

Each ``coop_*`` family file declares ``default_cfgs`` (via timm's
``generate_default_cfgs``) and one registered function per model that calls
:func:`build_coop_model`. Pretrained tags (``coop_resnet18.digits``) come from the
checkpoint manifest (:mod:`coopnets.models.manifest`): only checkpoints this project
trained and measured are listed.
"""
from __future__ import annotations

from typing import Any, Dict

from timm.models import build_model_with_cfg, generate_default_cfgs

from .depth_adaptive import DepthAdaptiveModel
from .manifest import pretrained_cfgs_for


def coop_cfg(**kwargs: Any) -> Dict[str, Any]:
    """The pretrained config of an untrained zoo entry (ImageNet-style preprocessing)."""
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "license": "apache-2.0",
        **kwargs,
    }


def zoo_cfgs(*names: str) -> Dict[str, Any]:
    """timm ``default_cfgs`` for a family file: an untagged cfg per name plus every manifest checkpoint."""
    cfgs: Dict[str, Dict[str, Any]] = {name: coop_cfg() for name in names}
    for name in names:
        cfgs.update(pretrained_cfgs_for(name))
    return generate_default_cfgs(cfgs)


def build_coop_model(variant: str, backbone: str, pretrained: bool = False, **kwargs: Any) -> DepthAdaptiveModel:
    """Build zoo entry ``variant`` around timm backbone ``backbone``.

    ``pretrained=True`` loads the coopnets checkpoint named by the variant's pretrained
    config (``hf_hub_id``) through the Hugging Face Hub client; it is not timm's ImageNet
    backbone weights (pass ``pretrained_backbone=True`` for those).
    """
    if kwargs.pop("features_only", False):
        raise ValueError(f"{variant} does not support features_only; use timm.create_model({backbone!r}, features_only=True).")
    cache_dir = kwargs.get("cache_dir")
    model = build_model_with_cfg(DepthAdaptiveModel, variant, pretrained=False, backbone=backbone, **kwargs)
    if pretrained:
        from ..pretrained import load_pretrained

        load_pretrained(model, cache_dir=cache_dir)
    return model
