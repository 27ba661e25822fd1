"""The parts a run is built from: nets (from the model factory), data loaders, optimizer and scheduler.

Example:
    >>> build = model_factory("test_resnet", num_classes=3)
    >>> build().num_depths, count_depths("test_resnet")
    (4, 4)
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from ..models import create_model, is_model, wrap
from .config import TrainConfig
from .recipe import ModelFactory


# --- nets -----------------------------------------------------------------------------
def model_factory(name: str, num_classes: int, plan: str = "exits") -> ModelFactory:
    """A builder of fresh depth-adaptive nets: zoo names via the registry, other timm names wrapped.

    Example:
        >>> model_factory("test_resnet", 3)().num_depths
        4
    """
    if is_model(name):
        return lambda: create_model(name, num_classes=num_classes, plan=plan)
    return lambda: wrap(name, num_classes=num_classes, plan=plan)


def count_depths(name: str, plan: str = "exits") -> int:
    """How many depths the nets of :func:`model_factory` ``(name, ..., plan)`` have.

    The net is built on PyTorch's ``meta`` device: shapes only, no weights allocated,
    no data read, so asking costs a fraction of building one real net.

    Example:
        >>> count_depths("coop_resnet18"), count_depths("coop_resnet18", plan="blocks")
        (4, 2)
    """
    with torch.device("meta"):
        return model_factory(name, num_classes=1, plan=plan)().num_depths


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
    """timm's optimizer over ``model.parameters()`` and its epoch scheduler, as ``cfg`` names them."""
    optimizer = create_optimizer_v2(model, cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler, _ = create_scheduler_v2(optimizer, cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs)
    return optimizer, scheduler
