"""RegNet zoo entries: an exit after each of the four stages;
exit heads of the family's measured kind (:func:`~coopnets.models.exit_head.head_kind_for`).

Depth k runs the stem, the first k stages and exit k; the deepest depth is the plain timm
model with its own head. Pass ``plan="blocks"`` for EKD-style block skipping instead.
"""
from ._registry import register_model
from ._builder import build_coop_model, zoo_cfgs
from .depth_adaptive import DepthAdaptiveModel

default_cfgs = zoo_cfgs('coop_regnety_016')


@register_model
def coop_regnety_016(pretrained: bool = False, **kwargs) -> DepthAdaptiveModel:
    """RegNetY-1.6GF (regnety_016) as a depth-adaptive model."""
    return build_coop_model('coop_regnety_016', 'regnety_016', pretrained, **kwargs)
