"""The model side: registry (a leaf), factory, builder, the depth-adaptive wrapper, depth plans (``plans/``),
runners (``runners/``), exit heads, block layouts and the zoo family files (``coop_*.py``)."""
from ._factory import create_model
from ._registry import is_model, list_models, register_model
from ._utils import eval_mode
from .depth_adaptive import DepthAdaptiveModel, create_backbone, wrap
from .exit_head import ExitHead
from .layouts import StageLayout, get_layout
from .plans import PLANS, BlocksConfig, BlocksPlan, DepthPlan, ExitOutputs, ExitsConfig, ExitsPlan
from .runners import IntermediatesRunner, LayoutRunner, Runner, SegmentRunner

# zoo family files register their models on import
from . import coop_convnext, coop_efficientnet, coop_mobilenetv3, coop_regnet, coop_resnet, coop_swin, coop_vit  # noqa: E402,F401
# coop_<any timm backbone>: registered when timm (or transformers through it) first resolves the name
from . import coop_wrapped  # noqa: E402

coop_wrapped.install()

__all__ = [
    "PLANS", "BlocksConfig", "BlocksPlan", "DepthAdaptiveModel", "DepthPlan", "ExitHead", "ExitOutputs", "ExitsConfig",
    "ExitsPlan", "IntermediatesRunner", "LayoutRunner", "Runner", "SegmentRunner", "StageLayout",
    "create_backbone", "create_model", "eval_mode", "get_layout", "is_model", "list_models", "register_model", "wrap",
]
