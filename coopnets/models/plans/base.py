"""What every depth plan is: a config dataclass of its options, and the plan that runs its depths.

A :class:`DepthPlan` is built from a backbone and its :class:`PlanConfig`. It resolves
the config against the backbone once (defaults filled in, every option validated), owns
the exit heads it adds (registered on the model as ``exits``, so state-dict keys are the
same for every plan), chooses its :class:`~coopnets.models.runners.Runner` and answers
everything that differs between plans, so nothing outside the plans tests a plan's type
or options.
"""
from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple, Type

import torch
from torch import nn

from ..layouts import StageLayout
from ..runners import Runner

FeaturePair = Tuple[torch.Tensor, torch.Tensor]


@dataclass
class ExitOutputs:
    """Everything one shared pass produces for every depth (used by training recipes).

    Attributes:
        logits: class logits per depth, shallowest first.
        embeddings: pooled pre-logit embedding per depth.
        feature_maps: per depth, the NCHW maps that depth computed at its stage
            boundaries (``exits`` plan: the map its exit reads; ``blocks`` plan: every
            stage's output), for feature-level distillation.
    """

    logits: List[torch.Tensor]
    embeddings: List[torch.Tensor] = field(default_factory=list)
    feature_maps: List[List[torch.Tensor]] = field(default_factory=list)


def option_error(plan: str, name: str, value: Any, rule: str) -> ValueError:
    """The one-sentence error for a bad plan option: the option, its value and what is valid."""
    return ValueError(f"Invalid {name}={value!r} for plan={plan!r}: {rule}.")


def int_list(plan: str, name: str, value: Any, depth: int = 1) -> Any:
    """``value`` as a list of ints (``depth=2``: a list of lists of ints), or the option error."""
    def ok(v: Any, d: int) -> bool:
        if d == 0:
            return isinstance(v, int) and not isinstance(v, bool)
        return isinstance(v, (list, tuple)) and all(ok(e, d - 1) for e in v)

    if not ok(value, depth):
        raise option_error(plan, name, value, "must be a list of ints" if depth == 1 else "must be a list of lists of ints")
    return [int_list(plan, name, v, depth - 1) for v in value] if depth > 1 else [int(v) for v in value]


@dataclass
class PlanConfig:
    """Options of one depth plan: its fields, their defaults and their validation (``__post_init__``).

    A field with ``metadata={"schedule": True}`` only chooses a default (how many exits or
    block depths); a plan's resolved config records what it chose instead, so
    :meth:`model_args` leaves such fields out.
    """

    @classmethod
    def option_names(cls) -> Tuple[str, ...]:
        """Every option this plan takes."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def structure_names(cls) -> Tuple[str, ...]:
        """The options that define a built model's structure (recorded in ``model_args``)."""
        return tuple(f.name for f in fields(cls) if not f.metadata.get("schedule"))

    def model_args(self) -> Dict[str, Any]:
        """The structure options as a dict, those at their default left out (``model_args`` is this dict)."""
        out: Dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            default = f.default if f.default is not MISSING else None
            if not f.metadata.get("schedule") and value != default:
                out[f.name] = copy.deepcopy(value)
        return out


class DepthPlan(ABC):
    """Base class of depth plans (see :mod:`coopnets.models.plans`). Subclasses set ``name`` and ``config_cls``.

    Attributes:
        config: the resolved options (defaults filled in for this backbone).
        backbone: the model's timm backbone.
        exits: the exit heads this plan adds (the model registers them as ``exits``).
        layout: the backbone's one :class:`StageLayout`, or ``None`` for a family without one.
        num_depths: number of depths, the last one the full backbone.
    """

    name: ClassVar[str] = ""
    config_cls: ClassVar[Type[PlanConfig]] = PlanConfig
    config: PlanConfig
    num_depths: int

    def __init__(self, backbone: nn.Module, layout: Optional[StageLayout]) -> None:
        self.backbone = backbone
        self.layout = layout
        self.exits = nn.ModuleList()

    # --- records ------------------------------------------------------------------
    @staticmethod
    @abstractmethod
    def describe(model_args: Dict[str, Any]) -> str:
        """One line for people (model cards) on the structure that ``model_args`` records."""

    # --- running ------------------------------------------------------------------
    @property
    def runner(self) -> Optional[Runner]:
        """What runs the backbone to the exit points (``None`` for a plan without exit points)."""
        return None

    def early_exit_runner(self, image_size: Sequence[int]) -> Runner:
        """A resumable runner for early exit with batch compaction on images of ``image_size`` (C, H, W).

        Raises:
            ValueError: this plan or backbone cannot leave early (the sentence says why).
        """
        raise ValueError(
            f"Early exit needs plan='exits' (an exit head after each stage); this model uses plan={self.name!r}, "
            f"whose depths all run every stage, so leaving early saves nothing."
        )

    @abstractmethod
    def forward_depth(self, x: torch.Tensor, depth: int) -> torch.Tensor:
        """Logits of the sub-network at ``depth`` (1-based, already validated)."""

    @abstractmethod
    def forward_exits(self, x: torch.Tensor, with_features: bool) -> ExitOutputs:
        """Logits of every depth from one shared pass (and embeddings/feature maps if asked)."""

    @abstractmethod
    def forward_features(self, x: torch.Tensor, depth: int) -> torch.Tensor:
        """Unpooled features the classifier of ``depth`` (below full) reads (timm's ``forward_features``)."""

    def forward_head(self, x: torch.Tensor, depth: int, pre_logits: bool) -> torch.Tensor:
        """Logits (or the pooled embedding) of ``depth`` (below full) from :meth:`forward_features`' output."""
        return self.backbone.forward_head(x, pre_logits=pre_logits)

    def classifier(self, depth: int) -> nn.Module:
        """The classifier module of ``depth`` (below full)."""
        return self.backbone.get_classifier()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Gradient checkpointing of what the plan runs itself (the backbone's own is the model's)."""
        if self.layout is not None:
            self.layout.grad_checkpointing = enable

    # --- training and export ---------------------------------------------------------
    def exit_modules(self) -> List[str]:
        """Name of the backbone module each exit head follows (``group_matcher`` puts the head in its group)."""
        return []

    def final_embedding_dim(self) -> int:
        """The backbone's pre-logits width (``head_hidden_size`` in timm, which differs from
        ``num_features`` for models with a conv head such as MobileNetV3)."""
        return int(getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features)

    @abstractmethod
    def embedding_dims(self) -> List[int]:
        """Width of ``forward_exits(x, with_features=True).embeddings[k]`` for every depth."""

    @abstractmethod
    def feature_pairs(self, out: ExitOutputs, depth: int) -> List[FeaturePair]:
        """(sub-net map, full-net map) pairs at equal resolution for 0-based ``depth`` (feature distillation)."""

    @abstractmethod
    def export(self, depth: int) -> nn.Module:
        """A standalone copy of what ``depth`` runs (no depth state), in eval mode."""
