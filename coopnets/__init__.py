"""coopnets: one trained network, several depths chosen at run time.

Example:
    >>> import coopnets, torch
    >>> m = coopnets.create_model("coop_resnet18", num_classes=10).eval()
    >>> m.set_depth(2)(torch.randn(1, 3, 64, 64)).shape
    torch.Size([1, 10])
"""
from ._registry import create_model, is_model, list_models, register_model
from .models import DepthAdaptiveModel, ExitHead, ExitOutputs, StageLayout, get_layout, wrap
from .profiler import profile
from .budget import budget_curve, calibrate
from .early_exit import EarlyExit, EarlyExitResult, simulate
from .pretrained import push_to_hub, save_pretrained

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
    "simulate",
    "wrap",
]
