"""The parts a run is built from: nets (from the model factory), data loaders, optimizer and scheduler.

Example:
    >>> build = model_factory("test_resnet", num_classes=3)
    >>> build().num_depths, count_depths("test_resnet")
    (4, 4)
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from ..hub.location import HubLocation
from ..models import DepthAdaptiveModel, create_model, is_model, wrap
from .config import TrainConfig
from .recipe import ModelFactory


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
def create_optimization(model: nn.Module, cfg: TrainConfig) -> Tuple[torch.optim.Optimizer, Scheduler]:
    """timm's optimizer over the trainable parameters of ``model`` and its epoch scheduler, as ``cfg`` names them.

    Frozen parameters (``requires_grad=False``, e.g. a fixed Leader) get no optimizer state.
    ``--layer-decay`` needs ``model.group_matcher`` (timm's layer grouping).
    """
    if cfg.layer_decay is not None and not hasattr(model, "group_matcher"):
        raise ValueError(f"--layer-decay needs a model with timm's group_matcher; {type(model).__name__} has none.")
    try:
        optimizer = create_optimizer_v2(model, cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                        momentum=cfg.momentum, layer_decay=cfg.layer_decay)
    except NotImplementedError as e:  # a net whose timm backbone has no group_matcher
        raise ValueError(f"--layer-decay: {e} Drop --layer-decay for this model.") from None
    scheduler, _ = create_scheduler_v2(optimizer, cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
                                       min_lr=cfg.min_lr, warmup_lr=cfg.warmup_lr, decay_epochs=cfg.decay_epochs,
                                       decay_rate=cfg.decay_rate)
    return optimizer, scheduler
