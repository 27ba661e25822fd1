"""One builder for every zoo entry, in timm's shape: pretrained configs are data.

Each ``coop_*`` family file declares ``default_cfgs`` (via timm's
``generate_default_cfgs``) and one registered function per model that calls
:func:`build_coop_model`. Pretrained tags (``coop_resnet18.digits``) come from the
checkpoint manifest (:mod:`coopnets.hub.manifest`): only checkpoints this project
trained and measured are listed.
"""
from __future__ import annotations

from typing import Any, Dict

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs

from ..hub.load import load_pretrained
from ..hub.manifest import pretrained_cfgs_for
from .depth_adaptive import DepthAdaptiveModel


def coop_cfg(**kwargs: Any) -> Dict[str, Any]:
    """The pretrained config of an untrained zoo entry (ImageNet-style preprocessing)."""
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "license": "apache-2.0",
        **kwargs,
    }


def zoo_cfgs(*names: str) -> Dict[str, Any]:
    """timm ``default_cfgs`` for a family file: an untagged cfg per name plus every manifest checkpoint."""
    cfgs: Dict[str, Dict[str, Any]] = {name: coop_cfg() for name in names}
    for name in names:
        cfgs.update({tagged: coop_cfg(**fields) for tagged, fields in pretrained_cfgs_for(name).items()})
    return generate_default_cfgs(cfgs)


def build_coop_model(variant: str, backbone: str, pretrained: bool = False, **kwargs: Any) -> DepthAdaptiveModel:
    """Build zoo entry ``variant`` around timm backbone ``backbone``.

    ``pretrained=True`` loads the coopnets checkpoint named by the variant's pretrained
    config (``hf_hub_id``) through the Hugging Face Hub client; it is not timm's ImageNet
    backbone weights (pass ``pretrained_backbone=True`` for those).
    """
    if kwargs.pop("features_only", False):
        raise ValueError(f"{variant} does not support features_only; use timm.create_model({backbone!r}, features_only=True).")
    cache_dir = kwargs.pop("cache_dir", None)
    model = build_model_with_cfg(DepthAdaptiveModel, variant, pretrained=False, backbone=backbone, **kwargs)
    return load_pretrained(model, cache_dir=cache_dir) if pretrained else model
