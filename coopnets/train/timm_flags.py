"""timm ``train.py``'s flags, each handed to timm's own implementation of it.

A :class:`~coopnets.train.TrainConfig` holds the flags under timm's names; the functions here turn
them into the arguments of the timm code that implements them, so a flag means in ``coopnets train``
what it means in timm's ``train.py``:

* ``--drop``, ``--drop-path``, ``--drop-block``, ``--gp``, ``--in-chans``, ``--bn-eps``:
  ``timm.create_model`` kwargs ``drop_rate``, ``drop_path_rate``, ``drop_block_rate``, ``global_pool``,
  ``in_chans``, ``bn_eps`` of every net of the recipe (:func:`backbone_kwargs`; recorded in the
  checkpoint's ``model_args``). ``--bn-eps`` works where timm's does (the EfficientNet / MobileNet
  builders' ``resolve_bn_args``); ``--gp`` also sets the exit heads' pooling.
* ``--bn-momentum`` (the momentum of every BatchNorm layer of the nets; training only),
  ``--grad-checkpointing`` (``set_grad_checkpointing``), ``--head-init-scale`` (every classifier's
  weight and bias scaled, as timm's ``train.py``): :func:`prepare_nets`.
* ``--input-size``, ``--crop-pct``, ``--mean``, ``--std``, ``--interpolation``: ``resolve_data_config``;
  ``--aa``, ``--reprob``/``--remode``/``--recount``, ``--scale``, ``--ratio``, ``--hflip``, ``--vflip``,
  ``--color-jitter``, ``--train-interpolation``, ``--no-aug``: ``create_transform``; ``--train-split``,
  ``--val-split``, ``--class-map``: ``create_dataset`` (:func:`data_options`). ``digits`` keeps its fixed
  pipeline unless one of the augmentation flags is given (:func:`augmentation_asked`).
* ``--aug-repeats``: timm's ``RepeatAugSampler`` (:func:`train_sampler`).
* ``--mixup-prob``, ``--mixup-switch-prob``, ``--mixup-mode``, ``--cutmix-minmax``: ``timm.data.Mixup``
  (:func:`create_mixup`); ``--mixup-off-epoch``: its ``mixup_enabled`` off from that epoch (the trainer).
* ``--opt-eps``, ``--opt-betas``, ``--opt-kwargs``, ``--lr-base``/``--lr-base-size``/``--lr-base-scale``:
  ``create_optimizer_v2`` through timm's own ``optimizer_kwargs`` (:func:`optimizer_kwargs`).
* ``--cooldown-epochs``, ``--sched-on-updates``: ``create_scheduler_v2`` (:func:`scheduler_kwargs`).
* ``--log-wandb``, ``--experiment``: :mod:`coopnets.train.tracking`.

Example:
    >>> cfg = TrainConfig(drop_path=0.1, aa="rand-m9-mstd0.5", opt="adamw", opt_betas=[0.9, 0.99])
    >>> backbone_kwargs(cfg), augmentation_asked(cfg), optimizer_kwargs(cfg)["betas"]
    ({'drop_path_rate': 0.1}, True, (0.9, 0.99))
"""
from __future__ import annotations

import importlib.util
import math
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Optional

from torch import nn
from torch.utils.data import Dataset, Sampler

from .config import TrainConfig
from .data import DataOptions

#: ``timm.create_model`` kwarg of each model flag
MODEL_FLAGS = {"drop": "drop_rate", "drop_path": "drop_path_rate", "drop_block": "drop_block_rate", "gp": "global_pool",
               "in_chans": "in_chans", "bn_eps": "bn_eps"}
#: the augmentation flags: any of them away from its default asks ``digits`` for timm's training transform
AUGMENTATION_FLAGS = ("aa", "reprob", "scale", "ratio", "hflip", "vflip", "color_jitter", "train_interpolation")
#: the optimizer flags (named in the message when timm's optimizer refuses them)
OPTIMIZER_FLAGS = ("opt_eps", "opt_betas", "opt_kwargs")
#: what a resize interpolation may be called (timm's names; training also ``random``)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def input_chans(cfg: TrainConfig) -> Optional[int]:
    """The model's input channels when a flag sets them: ``--in-chans``, else ``--input-size``'s first (timm's rule)."""
    if cfg.in_chans is not None:
        return cfg.in_chans
    return cfg.input_size[0] if cfg.input_size else None


def model_img_size(cfg: TrainConfig) -> Any:
    """The image size a backbone that takes one is built for: ``--input-size``'s ``H`` (or ``(H, W)``), else
    ``--img-size``."""
    if not cfg.input_size:
        return cfg.img_size
    h, w = cfg.input_size[1:]
    return h if h == w else (h, w)


def backbone_kwargs(cfg: TrainConfig) -> Dict[str, Any]:
    """The ``timm.create_model`` kwargs of the model flags that are set (timm drops the ``None`` ones too)."""
    values = {**{name: getattr(cfg, name) for name in MODEL_FLAGS}, "in_chans": input_chans(cfg)}
    return {MODEL_FLAGS[name]: value for name, value in values.items() if value is not None}


def augmentation_asked(cfg: TrainConfig) -> bool:
    """Whether an augmentation flag is away from its default (and ``--no-aug`` is not given)."""
    default = TrainConfig()
    return not cfg.no_aug and any(getattr(cfg, n) != getattr(default, n) for n in AUGMENTATION_FLAGS)


def data_options(cfg: TrainConfig) -> DataOptions:
    """The data flags of ``cfg`` as :class:`~coopnets.train.data.DataOptions` (timm's data and transform arguments)."""
    augment = dict(no_aug=cfg.no_aug, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio), hflip=cfg.hflip, vflip=cfg.vflip,
                   color_jitter=cfg.color_jitter, auto_augment=cfg.aa, re_prob=cfg.reprob, re_mode=cfg.remode,
                   re_count=cfg.recount)
    return DataOptions(
        in_chans=cfg.in_chans, input_size=tuple(cfg.input_size) if cfg.input_size else None, crop_pct=cfg.crop_pct,
        mean=tuple(cfg.mean) if cfg.mean else None, std=tuple(cfg.std) if cfg.std else None,
        interpolation=cfg.interpolation, train_split=cfg.train_split, val_split=cfg.val_split, class_map=cfg.class_map,
        augment=augment, train_interpolation=cfg.train_interpolation, augmented=augmentation_asked(cfg))


def train_sampler(ds: Dataset, cfg: TrainConfig, world_size: int = 1, rank: int = 0) -> Sampler:
    """The train split's sampler: torch's ``DistributedSampler`` (seeded by ``--seed``), or with
    ``--aug-repeats`` timm's ``RepeatAugSampler`` (each image repeated, the repeats spread over the
    processes; timm's ``train.py`` allows it under DDP only, here one process takes it too)."""
    from torch.utils.data.distributed import DistributedSampler

    if cfg.aug_repeats:
        from timm.data.distributed_sampler import RepeatAugSampler

        return RepeatAugSampler(ds, num_replicas=world_size, rank=rank, shuffle=True, num_repeats=cfg.aug_repeats)
    return DistributedSampler(ds, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.seed)


def create_mixup(cfg: TrainConfig, num_classes: int):
    """timm's ``Mixup`` as timm's ``train.py`` makes it (``None`` when neither mixup nor cutmix is on)."""
    from timm.data import Mixup

    if not (cfg.mixup > 0 or cfg.cutmix > 0 or cfg.cutmix_minmax is not None):
        return None
    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, cutmix_minmax=cfg.cutmix_minmax, prob=cfg.mixup_prob,
                 switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode, label_smoothing=cfg.smoothing,
                 num_classes=num_classes)


def resolve_lr(cfg: TrainConfig, world_size: int = 1) -> float:
    """``--lr``, or without one timm's ``--lr-base`` rule: ``lr_base * (global batch / lr_base_size)``, the
    ratio's square root for ``--lr-base-scale sqrt`` (default: sqrt for ada* and lamb optimizers, else linear).

    Example:
        >>> resolve_lr(TrainConfig(lr=None, lr_base=0.1, batch_size=64))
        0.025
        >>> resolve_lr(TrainConfig(lr=None, lr_base=0.1, batch_size=64, opt="adamw"))
        0.05
    """
    if cfg.lr is not None:
        return cfg.lr
    ratio = cfg.batch_size * world_size * cfg.grad_accum_steps / cfg.lr_base_size
    scale = cfg.lr_base_scale or ("sqrt" if any(o in cfg.opt.lower() for o in ("ada", "lamb")) else "linear")
    return cfg.lr_base * (math.sqrt(ratio) if scale == "sqrt" else ratio)


def optimizer_kwargs(cfg: TrainConfig, world_size: int = 1) -> Dict[str, Any]:
    """``create_optimizer_v2``'s kwargs: timm's own ``optimizer_kwargs`` of the flags, then ``--opt-kwargs``
    (as timm's ``train.py``)."""
    from timm.optim import optimizer_kwargs as timm_optimizer_kwargs

    args = SimpleNamespace(opt=cfg.opt, lr=resolve_lr(cfg, world_size), weight_decay=cfg.weight_decay,
                           momentum=cfg.momentum, opt_eps=cfg.opt_eps, layer_decay=cfg.layer_decay,
                           opt_betas=tuple(cfg.opt_betas) if cfg.opt_betas is not None else None)
    return {**timm_optimizer_kwargs(args), **cfg.opt_kwargs}


def scheduler_kwargs(cfg: TrainConfig, updates_per_epoch: int = 0) -> Dict[str, Any]:
    """``create_scheduler_v2``'s kwargs (with ``--sched-on-updates`` the schedule counts optimizer updates)."""
    return dict(sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs, min_lr=cfg.min_lr,
                warmup_lr=cfg.warmup_lr, decay_epochs=cfg.decay_epochs, decay_rate=cfg.decay_rate,
                cooldown_epochs=cfg.cooldown_epochs, step_on_epochs=not cfg.sched_on_updates,
                updates_per_epoch=max(1, updates_per_epoch) if cfg.sched_on_updates else 0)


def _classifiers(net: nn.Module) -> List[nn.Module]:
    """Every classifier of a net: a depth-adaptive net's (backbone's and exits'), else timm's ``get_classifier()``."""
    if hasattr(net, "classifier_names"):
        return [net.get_submodule(name) for name in net.classifier_names()]
    return [net.get_classifier()] if hasattr(net, "get_classifier") else []


def prepare_nets(recipe: nn.Module, cfg: TrainConfig) -> None:
    """The model flags that act on built nets, over every net of the recipe (Leader included), as timm's
    ``train.py`` does after ``create_model``: ``--head-init-scale`` multiplies every classifier's weight and
    bias, ``--grad-checkpointing`` calls ``set_grad_checkpointing()``; ``--bn-momentum`` sets the momentum
    of every BatchNorm layer (what timm's ``bn_momentum`` kwarg does where a builder takes it)."""
    import torch

    nets = [net for _, net in recipe.named_children() if hasattr(net, "get_classifier")]
    if cfg.head_init_scale is not None:
        with torch.no_grad():
            for head in (h for net in nets for h in _classifiers(net)):
                for p in (getattr(head, "weight", None), getattr(head, "bias", None)):
                    if isinstance(p, torch.Tensor):
                        p.mul_(cfg.head_init_scale)
    if cfg.grad_checkpointing:
        for net in nets:
            net.set_grad_checkpointing(True)
    if cfg.bn_momentum is not None:
        for module in recipe.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = cfg.bn_momentum


def option_problems(cfg: TrainConfig) -> List[str]:
    """What timm would refuse among these flags, found before anything is built or written: augmentation
    settings its transform factory refuses, interpolation names, a class map it cannot read, data flags
    without ``--data-dir``, ``--log-wandb`` without wandb.

    Example:
        >>> option_problems(TrainConfig(interpolation="cubic"))
        ["--interpolation must be one of nearest, bilinear, bicubic, box, hamming, lanczos (got 'cubic')"]
        >>> option_problems(TrainConfig(aa="v9"))
        ["--aa v9: timm's create_transform refuses it (AssertionError: Unknown AA policy v9)"]
    """
    problems: List[str] = []
    default = TrainConfig()
    for name, extra in (("interpolation", ()), ("train_interpolation", ("random",))):
        value = getattr(cfg, name)
        if value is not None and value not in (*INTERPOLATIONS, *extra):
            problems.append(f"{flag(name)} must be one of {', '.join((*INTERPOLATIONS, *extra))} (got {value!r})")
    given = [n for n in ("train_split", "val_split", "class_map") if getattr(cfg, n) != getattr(default, n)]
    if cfg.data_dir is None:
        problems += [f"{flag(n)} names ImageFolder data: give --data-dir too" for n in given]
    else:  # a named split folder that is missing (a missing train/ or val/ is the data loader's DataError)
        root = Path(cfg.data_dir).expanduser()
        problems += [f"{flag(n)} {getattr(cfg, n)}: no folder {root / getattr(cfg, n)} (--data-dir's split folders)"
                     for n in given if n != "class_map" and root.is_dir() and not (root / getattr(cfg, n)).is_dir()]
    if cfg.data_dir is not None and cfg.class_map is not None:
        where = (Path(cfg.class_map).expanduser(), Path(cfg.data_dir).expanduser() / cfg.train_split / cfg.class_map)
        found = [p for p in where if p.is_file()]
        if not found:
            problems.append(f"--class-map {cfg.class_map}: no such file (timm also looks in the train split folder)")
        elif found[0].suffix.lower() not in (".txt", ".pkl"):
            problems.append(f"--class-map {cfg.class_map}: timm reads .txt (a class per line) or .pkl class maps")
    if not problems and not cfg.problems():  # (out-of-range values are TrainConfig.problems')
        problems += _transform_problems(cfg)
    if cfg.log_wandb and importlib.util.find_spec("wandb") is None:
        problems.append("--log-wandb needs the wandb package: pip install 'coopnets[wandb]' (or pip install wandb)")
    return problems


def _transform_problems(cfg: TrainConfig) -> List[str]:
    """Build timm's training transform once at 16 px: what its factory refuses is a problem of the flags given."""
    from timm.data import create_transform

    options = data_options(cfg)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            create_transform(16, is_training=True, interpolation=options.train_interpolation or "bilinear",
                             **options.augment)
    except Exception as e:  # noqa: BLE001 - timm asserts and raises many kinds on a bad policy string
        default = TrainConfig()
        given = [n for n in (*AUGMENTATION_FLAGS, "remode", "recount") if getattr(cfg, n) != getattr(default, n)]
        what = " ".join(f"{flag(n)} {getattr(cfg, n)}" for n in given) or "the augmentation flags"
        return [f"{what}: timm's create_transform refuses it ({type(e).__name__}: {' '.join(str(e).split()) or 'invalid'})"]
    return []


def flag_kwargs_given(cfg: TrainConfig) -> Dict[str, str]:
    """``{timm kwarg: the flag that sets it}`` for the model flags that are set.

    Example:
        >>> flag_kwargs_given(TrainConfig(drop_path=0.1, input_size=[1, 16, 16]))
        {'drop_path_rate': '--drop-path', 'in_chans': '--input-size'}
    """
    given = {MODEL_FLAGS[n]: flag(n) for n in MODEL_FLAGS if getattr(cfg, n) is not None}
    if cfg.in_chans is None and cfg.input_size:
        given["in_chans"] = "--input-size"
    return given
