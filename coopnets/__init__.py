"""coopnets: one trained network, several depths chosen at run time.

Example:
    >>> import coopnets, torch
    >>> m = coopnets.create_model("coop_resnet18", num_classes=10).eval()
    >>> m.set_depth(2)(torch.randn(1, 3, 64, 64)).shape
    torch.Size([1, 10])
"""
from .models import (
    DepthAdaptiveModel,
    ExitHead,
    ExitOutputs,
    StageLayout,
    create_model,
    get_layout,
    is_model,
    list_models,
    register_model,
    wrap,
)
from .hub import push_to_hub, save_pretrained
from .inference import EarlyExit, EarlyExitResult, budget_curve, calibrate, profile, set_depth_for_budget, simulate
from .serving import DepthController, DynamicBatcher, LatencyModel, ServingOption

__version__ = "0.1.0"

__all__ = [
    "DepthAdaptiveModel",
    "EarlyExit",
    "EarlyExitResult",
    "ExitHead",
    "ExitOutputs",
    "StageLayout",
    "budget_curve",
    "calibrate",
    "create_model",
    "get_layout",
    "is_model",
    "list_models",
    "profile",
    "push_to_hub",
    "register_model",
    "save_pretrained",
    "set_depth_for_budget",
    "simulate",
    "wrap",
    "DepthController",
    "DynamicBatcher",
    "LatencyModel",
    "ServingOption",
]
