"""The recipe interface: what a training method is, so that one trainer runs them all.

A :class:`Recipe` is an ``nn.Module`` that owns every trainable part of a method (the
depth-adaptive nets, a Leader, weighting modules...) and whose ``forward(x, y)`` returns
the training loss. The trainer (:mod:`coopnets.train.trainer`) builds one optimizer over
``recipe.parameters()``, wraps the recipe in DistributedDataParallel when distributed,
and validates ``recipe.eval_models()`` at every depth each epoch. Methods therefore only
differ in this file's subclasses; the loop, checkpoints, metrics and plots exist once.
A method that trains one net subclasses :class:`SingleNetRecipe` and writes only its loss.

Recipes register themselves by name with :func:`register_recipe`; :func:`create_recipe`
builds one (unknown names list the valid ones).

Example:
    >>> import torch, coopnets
    >>> from coopnets.train.recipe import create_recipe
    >>> recipe = create_recipe("multi_exit", lambda: coopnets.wrap("test_resnet", num_classes=3))
    >>> out = recipe(torch.randn(2, 3, 32, 32), torch.tensor([0, 2]))
    >>> out.loss.ndim, len(out.logits)
    (0, 4)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Set, Tuple, Type

import torch
from timm.models import group_parameters
from torch import nn

from ..models.depth_adaptive import DepthAdaptiveModel
from .best import score_of
from .fields import field_problems

ModelFactory = Callable[[], DepthAdaptiveModel]


@dataclass
class RecipeOutput:
    """What ``Recipe.forward`` returns.

    Attributes:
        loss: scalar training loss (what the trainer back-propagates).
        logits: per-depth logits of the main net (for running train accuracy).
        terms: named loss terms for logging; tensors are detached and every value is
            stored as a ``float``.
    """

    loss: torch.Tensor
    logits: List[torch.Tensor]
    terms: Dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.terms = {k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for k, v in self.terms.items()}


@dataclass
class RecipeConfig:
    """Base of every recipe's config: documented weights and temperatures live in subclasses."""

    label_smoothing: float = 0.0

    @classmethod
    def from_dict(cls, values: Optional[Mapping[str, Any]]) -> "RecipeConfig":
        """Build from a mapping; unknown keys and values of the wrong type are an error that names
        the option, the value and what is valid.

        Example:
            >>> RecipeConfig.from_dict({"label_smoothing": "hot"})
            Traceback (most recent call last):
            ...
            ValueError: RecipeConfig: label_smoothing must be a number (got 'hot'); options: label_smoothing.
        """
        values = dict(values or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"Unknown option(s) {unknown} for {cls.__name__}; valid: {sorted(names)}.")
        problems = field_problems(cls, values)
        if problems:
            raise ValueError(f"{cls.__name__}: {'; '.join(problems)}; options: {', '.join(sorted(names))}.")
        return cls(**values)


class Recipe(nn.Module):
    """Base class of training methods. Subclasses set ``name`` and ``config_cls``.

    Args:
        model_fn: builds a fresh depth-adaptive model (called once per net the method needs).
        config: the recipe's config (a ``config_cls`` instance or a dict of overrides).
    """

    name: ClassVar[str] = ""
    config_cls: ClassVar[Type[RecipeConfig]] = RecipeConfig
    #: False when some parameters legitimately get no gradient in a step (DDP then
    #: needs ``find_unused_parameters=True``).
    trains_all_parameters: ClassVar[bool] = True

    def __init__(self, model_fn: ModelFactory, config: Any = None) -> None:
        super().__init__()
        self.config = config if isinstance(config, self.config_cls) else self.config_cls.from_dict(config)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> RecipeOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def eval_models(self) -> Dict[str, DepthAdaptiveModel]:
        """The nets validated at every depth each epoch, by name."""
        raise NotImplementedError

    @classmethod
    def runs_per_depth(cls, options: Mapping[str, Any]) -> bool:
        """Whether ``options`` ask for one separate run per depth instead of one run.

        The trainer then trains every depth in a run of its own, passing ``depth=d``
        (:func:`coopnets.train.sweep.train_each_depth`). Default: never.
        """
        return False

    def reference_models(self) -> Dict[str, nn.Module]:
        """Plain classifiers the method trains alongside (e.g. the cooperative Leader), by name.

        Never deployed; the trainer scores them once on the test split so that a run
        reports its own plain-network baseline. Default: none.
        """
        return {}

    def deployable(self, val_accuracy: Mapping[str, List[float]]) -> str:
        """Name (a key of :meth:`eval_models`) of the net to deploy, given per-depth val accuracy."""
        return max(val_accuracy, key=lambda k: score_of(val_accuracy[k], "mean_accuracy"))

    # --- timm's optimizer hooks, over every net of the recipe ---------------------------
    def _timm_nets(self, hook: str) -> List[Tuple[str, nn.Module]]:
        """The outermost submodules that have timm's ``hook`` (the nets: Teammates, Leader...), by name."""
        found: List[Tuple[str, nn.Module]] = []
        for name, module in self.named_modules():
            if name and hasattr(module, hook) and not any(name.startswith(f + ".") for f, _ in found):
                found.append((name, module))
        return found

    def no_weight_decay(self) -> Set[str]:
        """Every net's ``no_weight_decay()`` names, prefixed with the net's name in the recipe.

        timm's ``create_optimizer_v2`` reads it, so e.g. a ViT's ``pos_embed`` stays out of
        weight decay in every net a recipe trains.
        """
        return {f"{prefix}.{n}" for prefix, net in self._timm_nets("no_weight_decay") for n in net.no_weight_decay()}

    def group_matcher(self, coarse: bool = False) -> Callable[[str], Tuple[float]]:
        """Layer ordinals for timm's layer-wise lr decay (``--layer-decay``) over all nets.

        Each net keeps its own ``group_matcher`` layering; nets are aligned at the top, so
        every net's last layer (its heads) gets the full learning rate and its earlier layers
        decay from there, as they would when the net is trained alone. Parameters outside
        such nets (e.g. distillation projections) count as top layer.

        Example:
            >>> import coopnets
            >>> from timm.optim import create_optimizer_v2
            >>> r = create_recipe("cooperative", lambda: coopnets.wrap("test_resnet", num_classes=3))
            >>> opt = create_optimizer_v2(r, "sgd", lr=1.0, layer_decay=0.5)
            >>> scale = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
            >>> [scale[id(r.get_parameter(n))] for n in ("teammate_a.backbone.conv1.0.weight",
            ...     "leader.conv1.0.weight", "teammate_b.exits.0.fc.weight", "teammate_a.backbone.fc.weight")]
            [0.03125, 0.03125, 0.0625, 1.0]
        """
        layers = {prefix: group_parameters(net, net.group_matcher(coarse=coarse), reverse=True)
                  for prefix, net in self._timm_nets("group_matcher")}  # net -> {param name: layer}
        top = max((max(ids.values(), default=0) for ids in layers.values()), default=0)
        ordinals = {f"{prefix}.{name}": float(layer + top - max(ids.values(), default=0))
                    for prefix, ids in layers.items() for name, layer in ids.items()}
        return lambda name: (ordinals.get(name, float(top)),)


class SingleNetRecipe(Recipe):
    """Base of the methods that train ONE depth-adaptive net, ``self.net``.

    ``__init__`` builds the net (one ``model_fn()`` call), then :meth:`setup` adds the
    method's own modules; the net is the only eval net and the deployable one. A
    subclass sets ``name`` and ``config_cls`` and writes ``forward``: its loss.

    Example:
        >>> import torch, coopnets
        >>> from coopnets.train.losses import ce
        >>> class LastExit(SingleNetRecipe):
        ...     name = "last_exit"
        ...     def forward(self, x, y):
        ...         logits = self.net.forward_exits(x)
        ...         loss = ce(logits[-1], y)
        ...         return RecipeOutput(loss, logits, {"ce": loss})
        >>> r = LastExit(lambda: coopnets.wrap("test_resnet", num_classes=3))
        >>> out = r(torch.randn(2, 3, 32, 32), torch.tensor([0, 2]))
        >>> sorted(r.eval_models()), r.deployable({"net": [0.5]}), type(out.terms["ce"])
        (['net'], 'net', <class 'float'>)
    """

    def __init__(self, model_fn: ModelFactory, config: Any = None) -> None:
        super().__init__(model_fn, config)
        self.net = model_fn()
        self.setup()

    def setup(self) -> None:
        """Build the method's own modules (adapters, weighting layers...), right after ``self.net``.

        Creation order is parameter order and RNG order, so checkpoints depend on it.
        Default: nothing.
        """

    def eval_models(self) -> Dict[str, DepthAdaptiveModel]:
        """``{"net": self.net}``."""
        return {"net": self.net}

    def deployable(self, val_accuracy: Mapping[str, List[float]]) -> str:
        """``"net"``, the only net."""
        return "net"


RECIPES: Dict[str, Type[Recipe]] = {}


def register_recipe(cls: Type[Recipe]) -> Type[Recipe]:
    """Class decorator: make a recipe available by its ``name`` (``--method NAME``)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty class attribute 'name'.")
    RECIPES[cls.name] = cls
    return cls


def create_recipe(name: str, model_fn: ModelFactory, config: Any = None) -> Recipe:
    """Instantiate the recipe registered as ``name``."""
    if name not in RECIPES:
        raise ValueError(f"Unknown training method {name!r}; valid methods: {', '.join(sorted(RECIPES))}.")
    return RECIPES[name](model_fn, config)
