"""``coopnets demo``: build a zoo model, run it at every depth, print the per-depth profile."""
from __future__ import annotations

import argparse

import torch

from ..inference.profiler import profile
from ..models import create_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="coop_resnet18", help="zoo model name (see coopnets.list_models())")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--input-size", type=int, nargs=3, default=(3, 224, 224), metavar=("C", "H", "W"))
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)


def run(args: argparse.Namespace) -> int:
    model = create_model(args.model, num_classes=args.num_classes).eval()
    x = torch.randn(args.batch_size, *args.input_size)
    print(f"{args.model}: {model.num_depths} depths, plan={model.plan}")
    with torch.inference_mode():
        for depth in range(1, model.num_depths + 1):
            print(f"  depth {depth}: logits {tuple(model.set_depth(depth)(x).shape)}")
    profile(model, input_size=args.input_size, batch_size=args.batch_size, repeats=args.repeats)
    return 0
