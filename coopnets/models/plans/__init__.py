"""Depth plans: how one backbone becomes ``num_depths`` nested sub-networks.

A plan is a :class:`~coopnets.models.plans.base.DepthPlan` plus one config dataclass of its
options (fields, defaults, validation). It owns everything that differs between plans:
the exit heads, the runner that takes the backbone to the exit points, the forward at
one depth or at every depth, what feature distillation compares, and export. The model
(:class:`~coopnets.models.depth_adaptive.DepthAdaptiveModel`) stores none of a plan's
options; its ``model_args`` are the resolved config's dict.

``exits`` (:mod:`~coopnets.models.plans.exits`, default)
    An exit head after chosen exit points (:mod:`~coopnets.models.plans.exit_points`:
    ``feature_info`` stages, or every block end with ``exit_points="blocks"``); the last
    depth is the plain backbone.
``blocks`` (:mod:`~coopnets.models.plans.blocks`)
    Every depth runs all stages with only their first ``n`` blocks and the shared final
    head (EKD's depth-level sub-networks).

A new plan is one module here with a ``DepthPlan`` subclass and its ``PlanConfig``, plus
an entry in :data:`PLAN_CLASSES`.

Example:
    >>> import coopnets
    >>> m = coopnets.wrap("resnet18", num_classes=10, plan="blocks")
    >>> type(m.depth_plan).__name__, m.depth_plan.config.model_args()
    ('BlocksPlan', {'block_depths': [[1, 1, 1, 1], [2, 2, 2, 2]]})
    >>> coopnets.wrap("resnet18", num_classes=10, exit_points="blocks").depth_plan.config.model_args()
    {'exit_indices': [0, 1, 2, 3, 4, 5, 6], 'head': 'mlp', 'exit_points': 'blocks'}
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Type

from torch import nn

from ..layouts import StageLayout
from .base import DepthPlan, ExitOutputs, FeaturePair, PlanConfig
from .blocks import BlocksConfig, BlocksPlan
from .exit_points import EXIT_POINTS, BlockPoints, ExitPoints, StagePoints
from .exits import ExitModel, ExitsConfig, ExitsPlan

PLAN_CLASSES: Dict[str, Type[DepthPlan]] = {"exits": ExitsPlan, "blocks": BlocksPlan}
PLANS: Tuple[str, ...] = tuple(PLAN_CLASSES)

__all__ = [
    "EXIT_POINTS", "PLANS", "PLAN_CLASSES", "BlockPoints", "BlocksConfig", "BlocksPlan", "DepthPlan", "ExitModel",
    "ExitOutputs", "ExitPoints", "ExitsConfig", "ExitsPlan", "FeaturePair", "PlanConfig", "StagePoints",
    "create_plan", "describe_plan", "plan_class", "split_plan_options", "structure_keys",
]


def plan_class(name: str) -> Type[DepthPlan]:
    """The plan class called ``name``; an unknown name lists the valid plans."""
    if name not in PLAN_CLASSES:
        raise ValueError(f"Unknown depth plan {name!r}; valid plans: {', '.join(PLANS)}.")
    return PLAN_CLASSES[name]


def split_plan_options(name: str, kwargs: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``kwargs`` split into plan ``name``'s options and the rest (the backbone's kwargs).

    An option of another plan is an error that says which plan it belongs to.

    Example:
        >>> split_plan_options("exits", {"head": "linear", "drop_rate": 0.1})
        ({'head': 'linear'}, {'drop_rate': 0.1})
        >>> split_plan_options("exits", {"block_depths": [[1], [2]]})
        Traceback (most recent call last):
            ...
        ValueError: block_depths belongs to plan='blocks'; drop it or pass plan='blocks'.
    """
    own = plan_class(name).config_cls.option_names()
    for other, cls in PLAN_CLASSES.items():
        foreign = [k for k in kwargs if k in cls.config_cls.option_names() and k not in own]
        if foreign:
            verb = "belongs" if len(foreign) == 1 else "belong"
            raise ValueError(f"{'/'.join(foreign)} {verb} to plan={other!r}; drop {'it' if len(foreign) == 1 else 'them'} "
                             f"or pass plan={other!r}.")
    return {k: v for k, v in kwargs.items() if k in own}, {k: v for k, v in kwargs.items() if k not in own}


def create_plan(name: str, backbone: nn.Module, options: Dict[str, Any], layout: Optional[StageLayout],
                in_chans: int = 3) -> DepthPlan:
    """Build plan ``name`` for ``backbone`` (whose layout is ``layout``, images ``in_chans`` channels) from its
    ``options`` (the fields of its config dataclass).

    Example:
        >>> import timm
        >>> from coopnets.models.layouts import get_layout
        >>> backbone = timm.create_model("resnet18")
        >>> create_plan("exits", backbone, {"head": "linear"}, get_layout(backbone)).config.head
        'linear'
    """
    cls = plan_class(name)
    return cls(backbone, cls.config_cls(**options), layout, in_chans)


def describe_plan(model_args: Dict[str, Any]) -> str:
    """The plan description of a checkpoint's ``model_args`` (see :meth:`DepthPlan.describe`).

    Example:
        >>> describe_plan({"plan": "blocks", "block_depths": [[1, 1], [2, 2]]})
        'every depth runs all stages with the first n blocks of each: [1, 1], [2, 2]'
    """
    return plan_class(model_args["plan"]).describe(model_args)


def structure_keys() -> Tuple[str, ...]:
    """The ``model_args`` keys that define a model's depth structure (classes, plan and every plan's options).

    Example:
        >>> structure_keys()
        ('num_classes', 'plan', 'exit_indices', 'head', 'head_width', 'exit_points', 'block_depths')
    """
    names = (k for cls in PLAN_CLASSES.values() for k in cls.config_cls.structure_names())
    return ("num_classes", "plan", *dict.fromkeys(names))
