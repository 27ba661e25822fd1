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
from typing import Any, Dict, List, Optional, Sequence

from ..models import PLANS
from ..train.config import TrainConfig
from ..train.data import DATASETS
from ..train.recipe import RECIPES
from ..train import train

DEFAULTS = TrainConfig()


def parse_recipe_opts(items: Sequence[str]) -> Dict[str, Any]:
    """``["key=value", ...]`` -> dict; values are Python literals when they parse as one, else strings.

    Example:
        >>> parse_recipe_opts(["temperature=3", "leader=resnet50", "exit_weights=[1, 2]"])
        {'temperature': 3, 'leader': 'resnet50', 'exit_weights': [1, 2]}
    """
    opts: Dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"--recipe-opt expects key=value, got {item!r}.")
        try:
            opts[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            opts[key.strip()] = value
    return opts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    parser.add_argument("--model", default=d.model, help="zoo model (coop_resnet18...) or any timm backbone name")
    parser.add_argument("--method", default=d.method, choices=sorted(RECIPES), help="training recipe")
    parser.add_argument("--dataset", default=d.dataset, choices=DATASETS, help="embedded dataset (ignored with --data-dir)")
    parser.add_argument("--data-dir", default=None, help="ImageFolder root with train/ and val/ (optional test/)")
    parser.add_argument("--out", default=d.out, help="run folder (metrics, checkpoint, table, models)")
    parser.add_argument("--epochs", type=int, default=d.epochs)
    parser.add_argument("--img-size", type=int, default=d.img_size, help="input side in pixels")
    parser.add_argument("--plan", default=d.plan, choices=PLANS, help="depth plan of the nets")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="per process")
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--opt", default=d.opt, help="timm optimizer name (sgd, adamw, ...)")
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
    parser.add_argument("--sched", default=d.sched, help="timm scheduler name (cosine, step, ...)")
    parser.add_argument("--warmup-epochs", type=int, default=d.warmup_epochs)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--deterministic", action="store_true", help="deterministic kernels (slower on GPU)")
    parser.add_argument("--no-amp", dest="amp", action="store_false", help="disable mixed precision on CUDA")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--recipe-opt", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of the recipe's config (repeatable)")
    parser.add_argument("--limit-train", type=int, default=None, metavar="N", help="use the first N train samples")
    parser.add_argument("--limit-eval", type=int, default=None, metavar="N", help="use the first N val/test samples")
    parser.add_argument("--workers", type=int, default=d.workers, help="DataLoader workers")
    parser.add_argument("--device", default=None, help="force a device (cpu, cuda, cuda:1)")
    parser.add_argument("--profile-repeats", type=int, default=d.profile_repeats, help="timed passes per depth")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    values["recipe_opts"] = parse_recipe_opts(args.recipe_opt)
    return TrainConfig(**values)


def run(args: argparse.Namespace) -> int:
    try:
        train(config_from_args(args))
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        raise SystemExit(f"coopnets train: error: {e}") from e
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coopnets.train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
