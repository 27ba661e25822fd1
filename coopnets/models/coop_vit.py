"""Vision Transformer zoo entries: exits after evenly spaced blocks (3, 6, 9 and the final head; ``linear`` exit heads).

Depth k runs the stem, the first k stages and exit k; the deepest depth is the plain timm
model with its own head. Pass ``plan="blocks"`` for EKD-style block skipping instead.
"""
from ._registry import register_model
from ._builder import build_coop_model, zoo_cfgs
from .depth_adaptive import DepthAdaptiveModel

default_cfgs = zoo_cfgs('coop_vit_small_patch16_224')


@register_model
def coop_vit_small_patch16_224(pretrained: bool = False, **kwargs) -> DepthAdaptiveModel:
    """ViT-S/16 (vit_small_patch16_224) as a depth-adaptive model."""
    return build_coop_model('coop_vit_small_patch16_224', 'vit_small_patch16_224', pretrained, **kwargs)
