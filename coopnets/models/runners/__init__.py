"""Runners: one concept, "run the backbone from the input, or from where it stopped, to exit point k".

:class:`Runner` is the protocol (``start``, ``advance``, ``finish``, ``compact``, and the
cached per-step FLOPs); each way of running is one implementation: the hand-written
stage layouts (:class:`LayoutRunner`), traced segments (:class:`SegmentRunner`) and
timm's ``forward_intermediates`` (:class:`IntermediatesRunner`). Depth plans choose and
build them (:meth:`coopnets.models.plans.DepthPlan.runner`); nothing else does.
"""
from .base import Runner, State
from .intermediates import IntermediatesRunner
from .layout import LayoutRunner
from .segments import SegmentRunner, build_segments

__all__ = ["IntermediatesRunner", "LayoutRunner", "Runner", "SegmentRunner", "State", "build_segments"]
