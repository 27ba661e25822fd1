"""The parts a run is built from: nets (from the model factory), data loaders, optimizer and scheduler.

Example:
    >>> build = model_factory("test_resnet", num_classes=3)
    >>> build().num_depths, count_depths("test_resnet")
    (4, 4)
"""
from __future__ import annotations

import inspect
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

import timm
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from ..hub.location import HubLocation
from ..models import DepthAdaptiveModel, create_model, is_model, list_models, wrap
from ..models.plans import plan_class, split_plan_options
from .config import TrainConfig
from .fields import signature_problems
from .recipe import ModelFactory
from .timm_flags import OPTIMIZER_FLAGS, flag, flag_kwargs_given, backbone_kwargs, option_problems, optimizer_kwargs, \
    scheduler_kwargs


# --- nets -----------------------------------------------------------------------------
class NetFactory:
    """Builds fresh depth-adaptive nets for a run (a :data:`ModelFactory`).

    * zoo names via the registry, other timm names wrapped (:func:`coopnets.wrap`);
    * ``pretrained``: the backbone starts from timm's own pretrained weights
      (``pretrained_backbone=True``: timm resolves tags, ``HF_ENDPOINT``, ``HF_HUB_OFFLINE``...);
    * ``hf-hub:``/``local-dir:`` names and ``initial_checkpoint``: start from a coopnets
      checkpoint; when its classes differ from ``num_classes`` only the classifiers are
      re-initialised (``reset_classifier``);
    * ``model_kwargs`` (and ``img_size`` where the backbone takes one, e.g. ViT/Swin)
      reach ``timm.create_model``.

    Recipes read :attr:`pretrained` (e.g. the cooperative Leader starts from the same weights).
    """

    def __init__(self, name: str, num_classes: int, plan: str = "exits", pretrained: bool = False,
                 model_kwargs: Optional[Mapping[str, Any]] = None, img_size: Optional[int] = None,
                 initial_checkpoint: Optional[str] = None) -> None:
        self.name, self.num_classes, self.plan, self.pretrained = name, num_classes, plan, pretrained
        self.initial_checkpoint = initial_checkpoint
        self.kwargs: Dict[str, Any] = dict(model_kwargs or {})
        if img_size is not None and "img_size" not in self.kwargs and self._takes_img_size(img_size):
            self.kwargs["img_size"] = img_size

    def _fresh(self, pretrained: bool, **kwargs: Any) -> DepthAdaptiveModel:
        if is_model(self.name):
            return create_model(self.name, num_classes=self.num_classes, plan=self.plan,
                                pretrained_backbone=pretrained, **kwargs)
        return wrap(self.name, num_classes=self.num_classes, plan=self.plan, pretrained_backbone=pretrained, **kwargs)

    def _takes_img_size(self, img_size: int) -> bool:
        """Whether the backbone accepts ``img_size`` (ViT, Swin... do; CNNs do not): asked on ``meta``."""
        if HubLocation.is_location(self.name):
            return False
        try:
            with torch.device("meta"):
                self._fresh(False, **self.kwargs, img_size=img_size)
        except TypeError as e:
            if "img_size" in str(e):
                return False
            raise
        return True

    @staticmethod
    def _load(source: str) -> DepthAdaptiveModel:
        location = source if HubLocation.is_location(source) else f"local-dir:{source}"
        return create_model(location, pretrained=True)

    def _fit_classes(self, model: DepthAdaptiveModel) -> DepthAdaptiveModel:
        if model.num_classes != self.num_classes:
            model.reset_classifier(self.num_classes)
        return model

    def __call__(self) -> DepthAdaptiveModel:
        if HubLocation.is_location(self.name):
            return self._fit_classes(self._load(self.name))
        model = self._fresh(self.pretrained, **self.kwargs)
        if self.initial_checkpoint:
            start = self._fit_classes(self._load(self.initial_checkpoint))
            try:
                model.load_state_dict(start.state_dict())
            except RuntimeError as e:
                first = str(e).splitlines()[0]
                raise ValueError(f"--initial-checkpoint {self.initial_checkpoint} does not fit --model {self.name} "
                                 f"({first}); pass the --model it was trained as.") from None
        return model


def model_factory(name: str, num_classes: int, plan: str = "exits", **options: Any) -> ModelFactory:
    """A builder of fresh depth-adaptive nets (:class:`NetFactory`); ``options`` as its arguments.

    Example:
        >>> model_factory("test_resnet", 3)().num_depths
        4
    """
    return NetFactory(name, num_classes, plan, **options)


def count_depths(name: str, plan: str = "exits", model_kwargs: Optional[Mapping[str, Any]] = None) -> int:
    """How many depths the nets of :func:`model_factory` ``(name, ..., plan, model_kwargs=...)`` have.

    The net is built on PyTorch's ``meta`` device: shapes only, no weights allocated,
    no data read, so asking costs a fraction of building one real net.

    Example:
        >>> count_depths("coop_resnet18"), count_depths("coop_resnet18", plan="blocks")
        (4, 2)
        >>> count_depths("resnet18", model_kwargs={"exit_points": "blocks"})
        8
    """
    with torch.device("meta"):
        return model_factory(name, num_classes=1, plan=plan, model_kwargs=model_kwargs)().num_depths


#: ``timm.create_model`` / builder arguments that are not the model class's own
_FACTORY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir", "scriptable",
                   "exportable", "no_jit", "pretrained_strict", "features_only", "out_indices", "feature_cfg")


def model_problems(name: str, plan: str = "exits", model_kwargs: Optional[Mapping[str, Any]] = None) -> List[str]:
    """Why ``--model name`` with ``--model-kwargs`` cannot be built, before anything is: an unknown name,
    plan options their plan's config (:class:`~coopnets.models.plans.ExitsConfig`, ...) refuses, and
    backbone kwargs of the wrong type or unknown to the timm model class (its ``__init__`` signature).

    Example:
        >>> model_problems("test_resnet", model_kwargs={"drop_path_rate": "lots", "head": "linear"})
        ["--model-kwargs drop_path_rate must be a number (got 'lots')"]
        >>> model_problems("test_resnet", model_kwargs={"head": "round"})
        ["--model-kwargs: Invalid head='round' for plan='exits': valid kinds: auto, linear, conv, reduce, mixpool, mlp."]
    """
    kwargs = dict(model_kwargs or {})
    if not (HubLocation.is_location(name) or is_model(name) or timm.is_model(name)):
        return [f"--model {name!r} is not a coopnets zoo model, a timm model or a checkpoint (hf-hub:ORG/NAME, "
                f"local-dir:PATH); zoo models: {', '.join(list_models())} (any of timm.list_models() is wrapped)"]
    if not kwargs:
        return []
    if HubLocation.is_location(name):
        return [f"--model-kwargs {', '.join(kwargs)}: --model {name} is a checkpoint, built as its config.json "
                f"records; drop --model-kwargs (or start a fresh --model with --initial-checkpoint {name})"]
    try:
        plan_options, backbone_kwargs = split_plan_options(plan, kwargs)
        plan_class(plan).config_cls(**plan_options)  # the plan config's __post_init__ validates every option
    except ValueError as e:
        return [f"--model-kwargs: {e}"]
    checked = {k: v for k, v in backbone_kwargs.items() if k not in (*_FACTORY_KWARGS, "pretrained", "num_classes")}
    if not checked:
        return []
    try:
        with torch.device("meta"):
            backbone = NetFactory(name, 1, plan)().backbone
    except (ValueError, TypeError, RuntimeError):
        return []  # the run's own build reports it
    return [f"--model-kwargs {p}" for p in signature_problems(type(backbone).__init__, checked, type(backbone).__name__)]


def optimization_problems(cfg: TrainConfig) -> List[str]:
    """Unknown ``--opt`` / ``--sched`` names (listing timm's), optimizer and scheduler settings timm refuses
    (found by building both for one tiny layer), and the other timm flags timm would refuse: model flags
    the backbone does not take (:func:`model_flag_problems`) and data, augmentation and tracking flags
    (:func:`~coopnets.train.timm_flags.option_problems`).

    Example:
        >>> optimization_problems(TrainConfig(sched="bogus"))[0][:59]
        "--sched 'bogus' is not a timm scheduler: valid are constant"
        >>> optimization_problems(TrainConfig(opt="adamw", sched="step"))
        []
        >>> optimization_problems(TrainConfig(opt="adamw", opt_kwargs={"amsgrad": True, "bogus": 1}))
        ["--opt-kwargs amsgrad=True bogus=1: timm's optimizer adamw refuses it (unexpected keyword argument 'bogus')"]
    """
    from timm.optim import list_optimizers

    problems = model_flag_problems(cfg) + option_problems(cfg)
    given = [n for n in OPTIMIZER_FLAGS if getattr(cfg, n)]
    try:
        kwargs = {k: v for k, v in optimizer_kwargs(cfg).items() if k != "layer_decay"}  # a Linear has no layers
        optimizer = create_optimizer_v2(nn.Linear(2, 2), **kwargs)
    except ValueError as e:
        if "not found" in str(e):
            return problems + [f"--opt {cfg.opt!r} is not a timm optimizer: valid are {', '.join(list_optimizers())} "
                               f"(each also as lookahead_NAME)"]
        return problems + _optimizer_flag_problem(cfg, given, e)  # else a value the range checks report
    except TypeError as e:
        return problems + _optimizer_flag_problem(cfg, given, e)
    except Exception:  # noqa: BLE001 - an optimizer that needs other parameters: the run's own build reports it
        return problems
    try:
        create_scheduler_v2(optimizer, **scheduler_kwargs(cfg, updates_per_epoch=1))
    except ValueError as e:
        if "Unknown scheduler" in str(e):
            return problems + [f"--sched {cfg.sched!r} is not a timm scheduler: valid are {', '.join(scheduler_names())}"]
        return problems + [f"--sched {cfg.sched}: {' '.join(str(e).split())}"]
    except Exception:  # noqa: BLE001 - timm asserts on values the range checks already report (--epochs 0)
        return problems
    return problems


def _optimizer_flag_problem(cfg: TrainConfig, given: List[str], error: Exception) -> List[str]:
    """The optimizer flags given, when timm's optimizer refused them (``[]`` when none was: a range problem)."""
    if not given:
        return []
    values = " ".join(f"{flag(n)} {' '.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
                      for n in given for v in [getattr(cfg, n) if n != "opt_kwargs"
                                               else [f"{k}={x!r}" for k, x in cfg.opt_kwargs.items()]])
    reason = " ".join(str(error).split())
    reason = reason[reason.index("unexpected keyword"):] if "unexpected keyword" in reason else reason
    return [f"{values}: timm's optimizer {cfg.opt} refuses it ({reason})"]


def model_flag_problems(cfg: TrainConfig) -> List[str]:
    """Model flags (``--drop-path``, ``--bn-eps``, ``--gp``...) that ``--model`` cannot take, found by building it
    on the ``meta`` device with them: a kwarg its timm builder does not take, a value it refuses, the same kwarg
    also in ``--model-kwargs``, or a checkpoint ``--model`` (built as its config.json records).

    Example:
        >>> model_flag_problems(TrainConfig(model="test_resnet", bn_eps=1e-3))
        ["--bn-eps 0.001: timm's test_resnet takes no bn_eps (timm's --bn-eps works with the EfficientNet/MobileNet families)"]
    """
    given = flag_kwargs_given(cfg)
    if not given:
        return []
    kwargs = backbone_kwargs(cfg)
    both = [f"{given[k]} and --model-kwargs {k} both set {k}; give one" for k in kwargs if k in cfg.model_kwargs]
    if both:
        return both
    if HubLocation.is_location(cfg.model):
        return [f"{', '.join(given.values())}: --model {cfg.model} is a checkpoint, built as its config.json records; "
                f"start a fresh --model with --initial-checkpoint {cfg.model} to change its structure"]
    if model_problems(cfg.model, cfg.plan, cfg.model_kwargs):
        return []  # reported by model_problems
    try:
        with torch.device("meta"):
            NetFactory(cfg.model, 1, cfg.plan, model_kwargs={**cfg.model_kwargs, **kwargs})()
    except TypeError as e:
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        if unknown is None or unknown.group(1) not in given:
            return []
        name = unknown.group(1)
        hint = " (timm's --bn-eps works with the EfficientNet/MobileNet families)" if name == "bn_eps" else ""
        return [f"{given[name]} {kwargs[name]}: timm's {cfg.model} takes no {name}{hint}"]
    except (ValueError, AssertionError) as e:
        return [f"{', '.join(f'{given[k]} {kwargs[k]}' for k in given)}: {' '.join(str(e).split()) or type(e).__name__}"]
    except Exception:  # noqa: BLE001 - the run's own build reports it
        return []
    return []


def scheduler_names() -> List[str]:
    """The scheduler names timm's ``create_scheduler_v2`` takes (read from its source, so always this timm's).

    Example:
        >>> {"cosine", "step", "none"} <= set(scheduler_names())
        True
    """
    from timm.scheduler import scheduler_factory

    source = inspect.getsource(scheduler_factory.create_scheduler_v2)
    names = set(re.findall(r"sched == '(\w+)'", source))
    for group in re.findall(r"sched in \(([^)]*)\)", source):
        names.update(re.findall(r"'(\w+)'", group))
    return sorted(names | {"none"})


def timm_pretrained_cfg(model: str) -> Dict[str, Any]:
    """timm's pretrained config of ``model`` as a dict (its preprocessing), ``{}`` when it has none."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(model)
    return cfg.to_dict() if cfg is not None else {}


# --- data -----------------------------------------------------------------------------
def make_loader(ds: Dataset, batch_size: int, workers: int, sampler: Optional[DistributedSampler] = None) -> DataLoader:
    """Train loader when ``sampler`` is given (full batches only, order from the sampler), else an eval loader."""
    drop_last = sampler is not None and len(sampler) >= batch_size
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=workers, drop_last=drop_last)


# --- optimisation ---------------------------------------------------------------------
def create_optimization(model: nn.Module, cfg: TrainConfig, world_size: int = 1,
                        updates_per_epoch: int = 0) -> Tuple[torch.optim.Optimizer, Optional[Scheduler], int]:
    """timm's optimizer over the trainable parameters of ``model``, its scheduler and the number of epochs to
    train (``--epochs`` plus timm's cooldown), as ``cfg`` names them (:func:`~coopnets.train.timm_flags.optimizer_kwargs`,
    :func:`~coopnets.train.timm_flags.scheduler_kwargs`; ``updates_per_epoch`` for ``--sched-on-updates``).

    ``--sched none`` gives no scheduler (``None``, as timm's ``create_scheduler_v2``): the lr stays ``--lr``
    (the warmup flags do not apply), as in timm's ``train.py``.
    Frozen parameters (``requires_grad=False``, e.g. a fixed Leader) get no optimizer state.
    ``--layer-decay`` needs ``model.group_matcher`` (timm's layer grouping).
    """
    if cfg.layer_decay is not None and not hasattr(model, "group_matcher"):
        raise ValueError(f"--layer-decay needs a model with timm's group_matcher; {type(model).__name__} has none.")
    try:
        optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg, world_size))
    except NotImplementedError as e:  # a net whose timm backbone has no group_matcher
        raise ValueError(f"--layer-decay: {e} Drop --layer-decay for this model.") from None
    scheduler, num_epochs = create_scheduler_v2(optimizer, **scheduler_kwargs(cfg, updates_per_epoch))
    return optimizer, scheduler, int(num_epochs)
