"""Serving under changing load: pick each batch's depth (or early-exit thresholds) to meet its deadline.

Engine-free: any server (Ray Serve, a thread pool, :class:`DynamicBatcher`) calls
:meth:`DepthController.run` with a batch and how long its requests have waited.

* :mod:`.latency` -- :class:`LatencyModel`, the online latency model per (option, batch size)
  and its profiled prior;
* :mod:`.controller` -- :class:`ServingOption`, :class:`Decision`, :class:`DepthController`;
* :mod:`.batcher` -- :class:`DynamicBatcher`, an in-process dynamic batcher, and :class:`ServedResult`.
"""
from .batcher import DynamicBatcher, ServedResult
from .controller import Decision, DepthController, ServingOption, checkpoint_accuracies
from .latency import LatencyModel

__all__ = ["Decision", "DepthController", "DynamicBatcher", "LatencyModel", "ServedResult", "ServingOption",
           "checkpoint_accuracies"]
