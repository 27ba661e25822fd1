"""One builder for every zoo entry, in timm's shape: pretrained configs are data.

Each ``coop_*`` family file declares ``default_cfgs`` (via timm's
``generate_default_cfgs``) and one registered function per model that calls
:func:`build_coop_model`. Pretrained tags (``coop_resnet18.digits``) come from the
checkpoint manifest (:mod:`coopnets.hub.manifest`): only checkpoints this project
trained and measured are listed.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg

from ..hub.load import load_pretrained
from ..hub.location import pop_download_args
from ..hub.manifest import pretrained_cfgs_for
from .depth_adaptive import DepthAdaptiveModel, prefixed_cfg

#: preprocessing / shape fields a zoo entry takes from its timm backbone's default config (``pool_size``
#: even when it is ``None``: a ViT's features are tokens, with no spatial pool size)
BACKBONE_CFG_KEYS = (
    "input_size", "pool_size", "crop_pct", "interpolation", "mean", "std", "fixed_input_size", "min_input_size",
    "first_conv", "classifier",
)


def coop_cfg(backbone: Optional[str] = None, **kwargs: Any) -> Dict[str, Any]:
    """The pretrained config of an untrained zoo entry: ImageNet-style preprocessing, with the input
    size, pool size, ``fixed_input_size`` and ``first_conv`` / ``classifier`` (under ``backbone.``)
    of timm backbone ``backbone`` when given.

    Example:
        >>> cfg = coop_cfg("vit_small_patch16_224")
        >>> cfg["fixed_input_size"], cfg["first_conv"], cfg["classifier"], cfg["pool_size"]
        (True, 'backbone.patch_embed.proj', ('backbone.head',), None)
        >>> coop_cfg("resnet50")["pool_size"]
        (7, 7)
    """
    cfg: Dict[str, Any] = {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "license": "apache-2.0",
    }
    if backbone is not None:
        timm_cfg = get_pretrained_cfg(backbone)
        if timm_cfg is None:
            raise ValueError(f"timm has no pretrained config for backbone {backbone!r}.")
        own = {k: v for k, v in timm_cfg.to_dict().items() if k in BACKBONE_CFG_KEYS and (v is not None or k == "pool_size")}
        classifier = own.get("classifier") or ()
        classifier = [classifier] if isinstance(classifier, str) else list(classifier)
        cfg.update(prefixed_cfg(own, ["backbone." + c for c in classifier]))
    cfg.update(kwargs)
    return cfg


def _backbone_of(name: str) -> str:
    return name[len("coop_"):] if name.startswith("coop_") else name


def zoo_cfgs(*names: str) -> Dict[str, Any]:
    """timm ``default_cfgs`` for a family file: an untagged cfg per name plus every manifest checkpoint.
    Zoo entry ``coop_<backbone>`` takes its input and stem / classifier fields from timm's ``<backbone>``."""
    cfgs: Dict[str, Dict[str, Any]] = {name: coop_cfg(_backbone_of(name)) for name in names}
    for name in names:
        cfgs.update({tagged: coop_cfg(_backbone_of(name), **fields) for tagged, fields in pretrained_cfgs_for(name).items()})
    return generate_default_cfgs(cfgs)


def build_coop_model(variant: str, backbone: str, pretrained: bool = False, **kwargs: Any) -> DepthAdaptiveModel:
    """Build zoo entry ``variant`` around timm backbone ``backbone``.

    ``pretrained=True`` loads the coopnets checkpoint named by the variant's pretrained
    config (``hf_hub_id``) through the Hugging Face Hub client; it is not timm's ImageNet
    backbone weights (pass ``pretrained_backbone=True`` for those). huggingface_hub's
    ``revision``, ``token``, ``force_download``, ``local_files_only`` and ``cache_dir`` go to that download.

    ``features_only=True`` returns timm's ``FeatureGetterNet`` over the backbone's
    ``forward_intermediates`` (the exit heads are dropped), with the backbone's
    ``feature_info``; ``out_indices`` picks entries (default: all).

    Example:
        >>> import timm, torch
        >>> m = timm.create_model("coop_resnet18", features_only=True)
        >>> m.feature_info.channels(), [t.shape[-1] for t in m(torch.randn(1, 3, 64, 64))]
        ([64, 64, 128, 256, 512], [32, 16, 8, 4, 2])
    """
    download = pop_download_args(kwargs)
    revision = kwargs.pop("revision", None)
    if kwargs.get("features_only", False):
        if pretrained:
            raise ValueError(
                f"{variant}: features_only=True with pretrained=True is not supported; build the model with "
                f"pretrained=True and call forward_intermediates, or use timm.create_model({backbone!r}, features_only=True)."
            )
        feature_cfg = dict(feature_cls="getter", out_indices=kwargs.pop("out_indices", None))
        return build_model_with_cfg(
            DepthAdaptiveModel, variant, pretrained=False, feature_cfg=feature_cfg, backbone=backbone, **kwargs
        )
    model = build_model_with_cfg(DepthAdaptiveModel, variant, pretrained=False, backbone=backbone, **kwargs)
    # the registry cfg names the backbone's classifier; this instance's exits are classifiers too
    model.pretrained_cfg["classifier"] = tuple(model.classifier_names())
    model.default_cfg = model.pretrained_cfg
    return load_pretrained(model, revision=revision, **download) if pretrained else model
