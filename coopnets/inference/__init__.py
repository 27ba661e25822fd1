"""Cost-adaptive inference on a trained model: early exit with compaction, budgets, standalone export, profiling.

* :mod:`.early_exit` -- per-sample early exit on a batch (:class:`EarlyExit`) and its simulation;
* :mod:`.budget` -- thresholds for a compute budget, latency budgets;
* :mod:`.export` -- one depth as ONNX / TorchScript / safetensors;
* :mod:`.profiler` -- per-depth params, FLOPs and latency.
"""
from .budget import budget_curve, calibrate, set_depth_for_budget
from .early_exit import EarlyExit, EarlyExitResult, simulate
from .profiler import profile

__all__ = ["EarlyExit", "EarlyExitResult", "budget_curve", "calibrate", "profile", "set_depth_for_budget", "simulate"]
