"""``coopnets train`` / ``python -m coopnets.train``: flags onto :class:`~coopnets.train.TrainConfig`.

Example:
    coopnets train --model coop_resnet18 --dataset digits --method cooperative --epochs 8 --out runs/r18
    coopnets train --method cooperative --recipe-opt leader=resnet50 --recipe-opt temperature=3 --out runs/r18-l50
    torchrun --nproc_per_node=2 -m coopnets.train --epochs 8 --out runs/r18-ddp
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Type

from .. import __version__
from ..models import PLANS
from ..train.best import EVAL_METRICS
from ..train.config import AMP_DTYPES, CLIP_MODES, LR_BASE_SCALES, MIXUP_MODES, RE_MODES, TrainConfig
from ..train.data import DATASETS
from ..train.recipe import RECIPES
from ..train import train
from ..train.checks import check_config
from ..train.fields import field_problems, field_types, fits
from .errors import run_entry

DEFAULTS = TrainConfig()


def parse_recipe_opts(items: Sequence[str], flag: str = "--recipe-opt") -> Dict[str, Any]:
    """``["key=value", ...]`` -> dict; values are Python literals when they parse as one, else strings.

    Example:
        >>> parse_recipe_opts(["temperature=3", "leader=resnet50", "exit_weights=[1, 2]"])
        {'temperature': 3, 'leader': 'resnet50', 'exit_weights': [1, 2]}
    """
    opts: Dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} expects key=value, got {item!r}.")
        try:
            opts[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            opts[key.strip()] = value
    return opts


def _recording(base: Type[argparse.Action]) -> Type[argparse.Action]:
    """``base`` that also notes its ``dest`` in ``namespace._explicit`` (flags given on the command line)."""

    class Recording(base):  # type: ignore[valid-type, misc]
        def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001
            super().__call__(parser, namespace, values, option_string)
            namespace._explicit = getattr(namespace, "_explicit", set()) | {self.dest}

    return Recording


class _Extend(argparse.Action):
    """``key=value ...`` items, collected over repeated flags (timm's ``--model-kwargs``)."""

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest) or []), *values])
        namespace._explicit = getattr(namespace, "_explicit", set()) | {self.dest}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``coopnets train``: names and meanings follow timm's ``train.py``."""
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    for name, base in ((None, argparse._StoreAction), ("store", argparse._StoreAction), ("store_true", argparse._StoreTrueAction),
                       ("store_false", argparse._StoreFalseAction), ("append", argparse._AppendAction)):
        parser.register("action", name, _recording(base))
    d = DEFAULTS
    parser.add_argument("--version", action="version", version=f"coopnets {__version__}")
    parser.add_argument("-c", "--config", default=None, metavar="FILE",
                        help="YAML file of settings (keys as the flags' names); the command line overrides them")
    parser.add_argument("--model", default=d.model,
                        help="zoo model (coop_resnet18...), any timm backbone, or hf-hub:ORG/NAME / local-dir:PATH")
    parser.add_argument("--pretrained", action="store_true", help="start the backbone from timm's pretrained weights")
    parser.add_argument("--initial-checkpoint", default=None, metavar="PATH",
                        help="start from a coopnets checkpoint (local-dir:PATH, hf-hub:ORG/NAME or a folder)")
    parser.add_argument("--num-classes", type=int, default=None, help="classes of the nets (default: the dataset's)")
    parser.add_argument("--model-kwargs", nargs="*", action=_Extend, default=[], metavar="KEY=VALUE",
                        help="extra timm.create_model arguments (drop_path_rate=0.1 ...)")
    parser.add_argument("--method", default=d.method, choices=sorted(RECIPES), help="training recipe")
    parser.add_argument("--dataset", default=d.dataset, choices=DATASETS, help="embedded dataset (ignored with --data-dir)")
    parser.add_argument("--data-dir", default=None, help="ImageFolder root with train/ and val/ (optional test/)")
    parser.add_argument("--out", default=d.out, help="run folder (metrics, checkpoint, table, models)")
    parser.add_argument("--epochs", type=int, default=d.epochs, help="epochs to train")
    parser.add_argument("--img-size", type=int, default=d.img_size, help="input side in pixels")
    parser.add_argument("--plan", default=d.plan, choices=PLANS, help="depth plan of the nets")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="per process")
    parser.add_argument("--grad-accum-steps", type=int, default=d.grad_accum_steps,
                        help="batches whose gradients are accumulated per optimizer step")
    parser.add_argument("--lr", type=float, default=d.lr, help="learning rate")
    parser.add_argument("--opt", default=d.opt, help="timm optimizer name (sgd, adamw, ...)")
    parser.add_argument("--momentum", type=float, default=d.momentum, help="optimizer momentum")
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay, help="weight decay")
    parser.add_argument("--layer-decay", type=float, default=None, help="layer-wise learning-rate decay")
    parser.add_argument("--clip-grad", type=float, default=None, help="clip gradients at this norm/value")
    parser.add_argument("--clip-mode", default=d.clip_mode, choices=CLIP_MODES, help="gradient clipping mode")
    parser.add_argument("--sched", default=d.sched,
                        help="timm scheduler name (cosine, step, ...; none: a constant --lr, as in timm)")
    parser.add_argument("--min-lr", type=float, default=d.min_lr, help="lower lr bound of cyclic schedulers")
    parser.add_argument("--warmup-lr", type=float, default=d.warmup_lr, help="warmup learning rate")
    parser.add_argument("--warmup-epochs", type=int, default=d.warmup_epochs, help="epochs of lr warmup")
    parser.add_argument("--decay-epochs", type=float, default=d.decay_epochs, help="epoch interval of lr decay (step)")
    parser.add_argument("--decay-rate", type=float, default=d.decay_rate, help="lr decay rate")
    parser.add_argument("--smoothing", type=float, default=d.smoothing, help="label smoothing")
    parser.add_argument("--mixup", type=float, default=d.mixup, help="mixup alpha (> 0 enables timm's Mixup)")
    parser.add_argument("--cutmix", type=float, default=d.cutmix, help="cutmix alpha (> 0 enables CutMix)")
    parser.add_argument("--seed", type=int, default=d.seed, help="random seed")
    parser.add_argument("--deterministic", action="store_true", help="deterministic kernels (slower on GPU)")
    parser.add_argument("--amp", dest="amp", action="store_true", default=d.amp,
                        help="mixed precision (timm's flag; on by default where supported: CUDA, or bfloat16 on CPU)")
    parser.add_argument("--no-amp", dest="amp", action="store_false", help="disable mixed precision")
    parser.add_argument("--amp-dtype", default=d.amp_dtype, choices=AMP_DTYPES,
                        help="mixed precision dtype (float16: CUDA only; bfloat16: CUDA and CPU)")
    parser.add_argument("--model-ema", action="store_true",
                        help="keep timm's ModelEmaV3 of the nets, validate it at every depth and deploy it")
    parser.add_argument("--model-ema-decay", type=float, default=d.model_ema_decay, help="EMA decay")
    parser.add_argument("--model-ema-warmup", action="store_true", help="EMA decay warmup (timm's use_warmup)")
    parser.add_argument("--torchcompile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                        help="torch.compile the training step with this backend (flag alone: inductor)")
    parser.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm under DDP (CUDA)")
    parser.add_argument("--checkpoint-hist", type=int, default=d.checkpoint_hist,
                        help="best epochs kept as best-<epoch>.pth; the best is published (0: the last epoch is)")
    parser.add_argument("--eval-metric", default=d.eval_metric, choices=sorted(EVAL_METRICS),
                        help="validation metric that ranks epochs (over the deployable net's depths)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last memory layout")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--recipe-opt", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of the recipe's config (repeatable)")
    parser.add_argument("--train-subset", type=int, default=None, metavar="N",
                        help="train on a stratified random subset of N train images (drawn with --seed), repeated "
                             "to keep the epoch length; val and test stay whole")
    parser.add_argument("--limit-train", type=int, default=None, metavar="N", help="use the first N train samples")
    parser.add_argument("--limit-eval", type=int, default=None, metavar="N", help="use the first N val/test samples")
    parser.add_argument("--workers", type=int, default=d.workers, help="DataLoader workers")
    parser.add_argument("--device", default=None, help="force a device (cpu, cuda, cuda:1)")
    parser.add_argument("--profile-repeats", type=int, default=d.profile_repeats, help="timed passes per depth")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    _add_timm_flags(parser)


def _add_timm_flags(parser: argparse.ArgumentParser) -> None:
    """timm ``train.py``'s flags of regularisation, augmentation, mixup, optimiser, data, model and tracking,
    with timm's names, meanings and (where they keep a run without them as it was) defaults; each reaches
    timm's own implementation (:mod:`coopnets.train.timm_flags`)."""
    d = DEFAULTS
    add = parser.add_argument
    add("--drop", type=float, default=None, metavar="PCT", help="dropout rate (timm's drop_rate; default: the model's)")
    add("--drop-path", type=float, default=None, metavar="PCT", help="drop path rate (timm's drop_path_rate)")
    add("--drop-block", type=float, default=None, metavar="PCT", help="drop block rate (timm's drop_block_rate)")
    add("--bn-momentum", type=float, default=None, help="BatchNorm momentum override")
    add("--bn-eps", type=float, default=None, help="BatchNorm epsilon override (timm's bn_eps: EfficientNet/MobileNet)")
    add("--aa", default=None, metavar="NAME", help="auto-augment policy (rand-m9-mstd0.5, augmix-m5-w4-d2, v0, original)")
    add("--reprob", type=float, default=d.reprob, metavar="PCT", help="random erase probability")
    add("--remode", default=d.remode, choices=RE_MODES, help="random erase mode")
    add("--recount", type=int, default=d.recount, help="random erase count")
    add("--scale", type=float, nargs="+", default=d.scale, metavar="PCT", help="random resize scale")
    add("--ratio", type=float, nargs="+", default=d.ratio, metavar="RATIO", help="random resize aspect ratio")
    add("--hflip", type=float, default=d.hflip, help="horizontal flip probability")
    add("--vflip", type=float, default=d.vflip, help="vertical flip probability")
    add("--color-jitter", type=float, default=d.color_jitter, metavar="PCT", help="color jitter factor")
    add("--train-interpolation", default=None,
        help="training interpolation (random, bilinear, bicubic...; default: the data config's)")
    add("--no-aug", action="store_true", help="disable all training augmentation, overriding the other flags")
    add("--aug-repeats", type=float, default=d.aug_repeats, help="repeated augmentation count (timm's RepeatAugSampler)")
    add("--mixup-prob", type=float, default=d.mixup_prob, help="probability of mixup or cutmix per batch")
    add("--mixup-switch-prob", type=float, default=d.mixup_switch_prob,
        help="probability of cutmix instead of mixup when both are on")
    add("--mixup-mode", default=d.mixup_mode, choices=MIXUP_MODES, help="mixup/cutmix parameters per batch, pair or elem")
    add("--mixup-off-epoch", type=int, default=d.mixup_off_epoch, metavar="N",
        help="turn mixup/cutmix off from this epoch (0: never)")
    add("--cutmix-minmax", type=float, nargs="+", default=None,
        help="cutmix min/max ratio (overrides alpha, enables cutmix)")
    add("--opt-eps", type=float, default=None, metavar="EPSILON", help="optimizer epsilon (default: the optimizer's)")
    add("--opt-betas", type=float, nargs="+", default=None, metavar="BETA",
        help="optimizer betas (default: the optimizer's)")
    add("--opt-kwargs", nargs="*", action=_Extend, default=[], metavar="KEY=VALUE", help="extra optimizer arguments")
    add("--lr-base", type=float, default=d.lr_base, metavar="LR",
        help="base lr, used when --lr is not given: lr = lr_base * global batch / lr_base_size")
    add("--lr-base-size", type=int, default=d.lr_base_size, metavar="DIV", help="batch size of --lr-base")
    add("--lr-base-scale", default=d.lr_base_scale, choices=LR_BASE_SCALES, metavar="SCALE",
        help="linear or sqrt scaling of --lr-base (empty: sqrt for ada*/lamb, else linear)")
    add("--cooldown-epochs", type=int, default=d.cooldown_epochs, metavar="N",
        help="epochs at min_lr after a cyclic schedule ends (trained after --epochs)")
    add("--sched-on-updates", action="store_true", help="step the lr schedule every optimizer update, not every epoch")
    add("--input-size", type=int, nargs=3, default=None, metavar="N", help="C H W of the input (overrides --img-size)")
    add("--crop-pct", type=float, default=None, metavar="N", help="eval center crop fraction")
    add("--mean", type=float, nargs="+", default=None, metavar="MEAN", help="normalisation mean (default: the data's)")
    add("--std", type=float, nargs="+", default=None, metavar="STD", help="normalisation std (default: the data's)")
    add("--interpolation", default=None, metavar="NAME", help="resize interpolation (default: the model's or data's)")
    add("--train-split", default=d.train_split, metavar="NAME", help="train split folder under --data-dir")
    add("--val-split", default=d.val_split, metavar="NAME", help="validation split folder under --data-dir")
    add("--class-map", default=None, metavar="FILENAME", help="class-to-index file (.txt: a class per line; .pkl)")
    add("--in-chans", type=int, default=None, metavar="N", help="image input channels (default: 3)")
    add("--gp", default=None, metavar="POOL", help="global pool type (avg, max, avgmax, fast; default: the model's)")
    add("--grad-checkpointing", action="store_true", help="gradient checkpointing through blocks and stages")
    add("--head-init-scale", type=float, default=None, help="scale of the classifiers' initial weights and biases")
    add("--log-wandb", action="store_true", help="log the run to Weights & Biases (WANDB_MODE=offline works)")
    add("--experiment", default=None, metavar="NAME", help="name of the run (wandb's; default --out: runs/NAME)")
    add("--wandb-project", default=None, help="wandb project (default: wandb's)")
    add("--wandb-tags", nargs="+", default=None, help="wandb tags")


def _yaml_settings(path: str) -> Dict[str, Any]:
    """The settings of a ``-c/--config`` YAML file (keys: flag names, ``-`` or ``_``)."""
    import yaml

    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"--config {path}: cannot read it ({type(e).__name__}).") from None
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a mapping of settings, got {type(values).__name__}.")
    names = {f.name for f in dataclasses.fields(TrainConfig)} | {"recipe_opt", "model_kwargs"}
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"--config {path}: unknown setting(s) {unknown}; valid: {sorted(names)}.")
    types = field_types(TrainConfig)
    for key, value in values.items():  # YAML 1.1 reads 1e-3 as a string: a number setting takes it as the number
        if isinstance(value, str) and key in types and not fits(value, types[key]) and fits(1.0, types[key]):
            with contextlib.suppress(ValueError):
                values[key] = float(value)
    options = ("recipe_opt", "recipe_opts", "model_kwargs", "opt_kwargs")
    problems = field_problems(TrainConfig, {k: v for k, v in values.items() if k not in options})
    for key in options:
        if key in values and not isinstance(values[key], (dict, list) if key not in ("model_kwargs", "opt_kwargs") else dict):
            problems.append(f"{key} must be a mapping of options (got {values[key]!r})")
    if problems:
        raise ValueError(f"--config {path}: {'; '.join(problems)}.")
    return values


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of parsed flags, over the ``-c/--config`` file's values if any."""
    explicit = getattr(args, "_explicit", set())
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    recipe_opt, model_kwargs = list(getattr(args, "recipe_opt", [])), list(getattr(args, "model_kwargs", []))
    opt_kwargs = list(getattr(args, "opt_kwargs", []))
    given = set(explicit)
    if getattr(args, "config", None):
        for key, value in _yaml_settings(args.config).items():
            given.add(key)
            if key == "recipe_opts" or key == "recipe_opt":
                recipe_opt = [*(f"{k}={v!r}" for k, v in dict(value).items()), *recipe_opt] \
                    if isinstance(value, dict) else [*value, *recipe_opt]
            elif key == "model_kwargs":
                model_kwargs = [*(f"{k}={v!r}" for k, v in dict(value).items()), *model_kwargs]
            elif key == "opt_kwargs":
                opt_kwargs = [*(f"{k}={v!r}" for k, v in dict(value).items()), *opt_kwargs]
            elif key not in explicit:
                values[key] = value
    values["recipe_opts"] = parse_recipe_opts(recipe_opt)
    values["model_kwargs"] = parse_recipe_opts(model_kwargs, "--model-kwargs")
    values["opt_kwargs"] = parse_recipe_opts(opt_kwargs, "--opt-kwargs")
    if "lr_base" in given and "lr" not in given:  # timm: --lr overrides --lr-base; without it the lr is scaled
        values["lr"] = None
    if values.get("experiment") and "out" not in given:  # timm: the experiment names the output folder
        values["out"] = str(Path(DEFAULTS.out).parent / values["experiment"])
    return TrainConfig(**values)


def explicit_settings(args: argparse.Namespace) -> set:
    """The settings given on the command line or in the ``-c/--config`` file (not left at their defaults)."""
    given = set(getattr(args, "_explicit", set()))
    if getattr(args, "config", None):
        given |= set(_yaml_settings(args.config))
    return given


#: the schedule settings ``--sched none`` leaves unused (timm's scheduler factory returns no scheduler)
SCHEDULE_SETTINGS = ("warmup_epochs", "warmup_lr", "min_lr", "decay_epochs", "decay_rate", "cooldown_epochs",
                     "sched_on_updates")


def warn_if_misleading(cfg: TrainConfig, given: set) -> None:
    """Warn about asked-for settings this run will not honour (``--amp-dtype float16`` without CUDA, optimizer
    betas/eps the optimizer has none of, schedule settings with ``--sched none``)."""
    import torch

    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.amp and cfg.amp_dtype == "float16" and not device.startswith("cuda") and "amp_dtype" in given:
        warnings.warn(f"--amp-dtype float16 runs on CUDA only: on {device} this run trains in float32 (no mixed "
                      f"precision); use --amp-dtype bfloat16 for mixed precision on a CPU, or --no-amp.", UserWarning)
    unscheduled = [n for n in SCHEDULE_SETTINGS if n in given] if cfg.sched == "none" else []
    if unscheduled:  # timm's create_scheduler_v2 makes no scheduler for 'none' and drops them without a word
        flags, one = ", ".join("--" + n.replace("_", "-") for n in unscheduled), len(unscheduled) == 1
        warnings.warn(f"--sched none keeps the lr constant, so {flags} {'is' if one else 'are'} ignored (as in "
                      f"timm's train.py); pick a --sched (cosine, step, ...) to use {'it' if one else 'them'}.", UserWarning)
    try:
        from timm.optim import get_optimizer_info

        info = get_optimizer_info(cfg.opt)
    except ValueError:  # an unknown --opt: check_config has refused it
        return
    for name, has in (("opt_betas", info.has_betas), ("opt_eps", info.has_eps)):
        if getattr(cfg, name) is not None and not has:  # timm's optimizer factory drops it without a word
            warnings.warn(f"--{name.replace('_', '-')}: timm's {cfg.opt} optimizer takes no {name[4:]}, so it is "
                          f"ignored (as in timm's train.py); pick an optimizer that has one (adamw...).", UserWarning)


def run(args: argparse.Namespace) -> int:
    """Train; failures follow the one error policy (:mod:`coopnets.cli.errors`: one line, exit code 2)."""
    cfg = config_from_args(args)
    check_config(cfg)
    warn_if_misleading(cfg, explicit_settings(args))
    train(cfg)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m coopnets.train``: the same command as ``coopnets train``, under the same error policy."""
    def parse_and_run() -> int:
        parser = argparse.ArgumentParser(prog="python -m coopnets.train", description=__doc__.splitlines()[0],
                                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        add_arguments(parser)
        return run(parser.parse_args(argv))

    return run_entry(parse_and_run, prog="python -m coopnets.train")
