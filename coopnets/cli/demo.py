"""``coopnets demo``: build a zoo model, run it at every depth, print the per-depth profile.

Example:
    coopnets demo --model coop_resnet18 --input-size 3 64 64 --batch-size 4
"""
from __future__ import annotations

import argparse

import torch

from ..inference.profiler import profile
from ..models import create_model
from .errors import bad_value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="coop_resnet18", help="zoo model name (see coopnets.list_models())")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--input-size", type=int, nargs=3, default=(3, 224, 224), metavar=("C", "H", "W"))
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)


def check_args(args: argparse.Namespace) -> None:
    """Refuse (one line naming the flag, the value and what is valid) sizes that cannot be run or profiled."""
    c, h, w = args.input_size
    if min(args.input_size) < 1:
        raise bad_value("--input-size", f"{c} {h} {w}", "C, H and W must each be >= 1 (e.g. --input-size 3 224 224)")
    sizes = (("--batch-size", args.batch_size), ("--repeats", args.repeats), ("--num-classes", args.num_classes))
    for flag, value in sizes:
        if value < 1:
            raise bad_value(flag, value, "must be >= 1" + (" (a batch of 0 images has no latency to report)"
                                                           if flag == "--batch-size" else ""))


def run(args: argparse.Namespace) -> int:
    check_args(args)
    model = create_model(args.model, num_classes=args.num_classes).eval()
    x = torch.randn(args.batch_size, *args.input_size)
    print(f"{args.model}: {model.num_depths} depths, plan={model.plan}")
    with torch.inference_mode():
        for depth in range(1, model.num_depths + 1):
            print(f"  depth {depth}: logits {tuple(model.set_depth(depth)(x).shape)}")
    profile(model, input_size=args.input_size, batch_size=args.batch_size, repeats=args.repeats)
    return 0
