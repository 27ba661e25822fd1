"""``coopnets train`` / ``python -m coopnets.train``: flags onto :class:`~coopnets.train.TrainConfig`.

Example:
    coopnets train --model coop_resnet18 --dataset digits --method cooperative --epochs 8 --out runs/r18
    coopnets train --method cooperative --recipe-opt leader=resnet50 --recipe-opt temperature=3 --out runs/r18-l50
    torchrun --nproc_per_node=2 -m coopnets.train --epochs 8 --out runs/r18-ddp
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Type

from .. import __version__
from ..models import PLANS
from ..train.best import EVAL_METRICS
from ..train.config import AMP_DTYPES, CLIP_MODES, TrainConfig
from ..train.data import DATASETS
from ..train.recipe import RECIPES
from ..train import train

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
    parser.add_argument("--sched", default=d.sched, help="timm scheduler name (cosine, step, ...)")
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
    return values


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of parsed flags, over the ``-c/--config`` file's values if any."""
    explicit = getattr(args, "_explicit", set())
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    recipe_opt, model_kwargs = list(getattr(args, "recipe_opt", [])), list(getattr(args, "model_kwargs", []))
    if getattr(args, "config", None):
        for key, value in _yaml_settings(args.config).items():
            if key == "recipe_opts" or key == "recipe_opt":
                recipe_opt = [*(f"{k}={v!r}" for k, v in dict(value).items()), *recipe_opt] \
                    if isinstance(value, dict) else [*value, *recipe_opt]
            elif key == "model_kwargs":
                model_kwargs = [*(f"{k}={v!r}" for k, v in dict(value).items()), *model_kwargs]
            elif key not in explicit:
                values[key] = value
    values["recipe_opts"] = parse_recipe_opts(recipe_opt)
    values["model_kwargs"] = parse_recipe_opts(model_kwargs, "--model-kwargs")
    return TrainConfig(**values)


def run(args: argparse.Namespace) -> int:
    """Train; an expected failure is one line on stderr and exit status 2 (as argparse's errors)."""
    try:
        train(config_from_args(args))
    except (ValueError, TypeError, FileExistsError, FileNotFoundError) as e:
        message = " ".join(str(e).split())
        print(f"coopnets train: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coopnets.train", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))
