"""ResNet zoo entries: an exit after each of the four stages;
exit heads of the family's measured kind (:func:`~coopnets.models.exit_head.head_kind_for`).

Depth k runs the stem, the first k stages and exit k; the deepest depth is the plain timm
model with its own head. Pass ``plan="blocks"`` for EKD-style block skipping instead.
"""
from ._registry import register_model
from ._builder import build_coop_model, zoo_cfgs
from .depth_adaptive import DepthAdaptiveModel

default_cfgs = zoo_cfgs('coop_resnet18', 'coop_resnet34', 'coop_resnet50', 'coop_resnet101')


@register_model
def coop_resnet18(pretrained: bool = False, **kwargs) -> DepthAdaptiveModel:
    """ResNet-18 (resnet18) as a depth-adaptive model."""
    return build_coop_model('coop_resnet18', 'resnet18', pretrained, **kwargs)


@register_model
def coop_resnet34(pretrained: bool = False, **kwargs) -> DepthAdaptiveModel:
    """ResNet-34 (resnet34) as a depth-adaptive model."""
    return build_coop_model('coop_resnet34', 'resnet34', pretrained, **kwargs)


@register_model
def coop_resnet50(pretrained: bool = False, **kwargs) -> DepthAdaptiveModel:
    """ResNet-50 (resnet50) as a depth-adaptive model."""
    return build_coop_model('coop_resnet50', 'resnet50', pretrained, **kwargs)


@register_model
def coop_resnet101(pretrained: bool = False, **kwargs) -> DepthAdaptiveModel:
    """ResNet-101 (resnet101) as a depth-adaptive model."""
    return build_coop_model('coop_resnet101', 'resnet101', pretrained, **kwargs)
