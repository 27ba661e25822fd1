"""Serving under changing load: pick each batch's depth (or early-exit thresholds) to meet its deadline.

Engine-free: any server (Ray Serve, a thread pool, :class:`DynamicBatcher`) calls
:meth:`DepthController.run` with a batch and how long its requests have waited.

* :mod:`.latency` -- :class:`LatencyModel`, the online latency model per (option, batch size)
  and its profiled prior;
* :mod:`.controller` -- :class:`ServingOption`, :class:`Decision`, :class:`DepthController`;
* :mod:`.calibration` -- what the controller trades depths by: :func:`recorded_accuracies` (the
  checkpoint's validation accuracies first), :func:`measured_accuracies`, and :func:`load_calibration`
  (labelled batches from an ImageFolder or a run folder's validation split);
* :mod:`.batcher` -- :class:`DynamicBatcher`, an in-process dynamic batcher with deadlines, admission
  (:class:`Overloaded`) and expiry (:class:`DeadlineExpired`), and :class:`ServedResult`;
* :mod:`.family` -- :class:`ModelFamily`, the model-switching baseline: separately trained models served
  as the depths of one (an ``independent`` sweep);
* :mod:`.stats` and :mod:`.metrics` -- the counters every server keeps, ``/stats`` and Prometheus' ``/metrics``;
* the server (``coopnets serve``): :mod:`.core` (one server's request path), :mod:`.http` (the HTTP
  contract, an ASGI app), :mod:`.local` (the embedded uvicorn engine), :mod:`.ray_engine` (Ray Serve).
"""
from .batcher import DeadlineExpired, DynamicBatcher, Overloaded, ServedResult
from .calibration import RecordedAccuracies, load_calibration, measured_accuracies, recorded_accuracies
from .controller import Decision, DepthController, ServingOption
from .family import ModelFamily
from .latency import LatencyModel

__all__ = ["DeadlineExpired", "Decision", "DepthController", "DynamicBatcher", "Overloaded", "LatencyModel", "ModelFamily", "RecordedAccuracies", "ServedResult",
           "ServingOption", "load_calibration", "measured_accuracies", "recorded_accuracies"]
