"""Depth-adaptive models: the wrapper, its exit heads, block layouts and the zoo."""
from .depth_adaptive import DepthAdaptiveModel, ExitOutputs, wrap
from .exit_head import ExitHead
from .layouts import StageLayout, get_layout

# zoo family files register their models on import
from . import coop_convnext, coop_efficientnet, coop_mobilenetv3, coop_regnet, coop_resnet, coop_swin, coop_vit  # noqa: E402,F401

__all__ = ["DepthAdaptiveModel", "ExitOutputs", "ExitHead", "StageLayout", "get_layout", "wrap"]
