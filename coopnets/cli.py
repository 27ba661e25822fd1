"""The ``coopnets`` command line.

Subcommands live in their own modules, each exposing ``add_arguments(parser)`` and
``run(args) -> int``; this file only dispatches.

Example:
    coopnets demo --model coop_resnet18
    coopnets train --model coop_resnet18 --dataset digits --epochs 5 --out runs/r18
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

SUBCOMMANDS = {
    "demo": ("coopnets.demo", "build a zoo model, run every depth and print its per-depth profile"),
    "export": ("coopnets.export_cli", "write one depth of a model as a standalone ONNX, TorchScript or safetensors file"),
    "push": ("coopnets.hub_cli", "publish a finished training run's checkpoint (RUN_DIR/model) to the Hugging Face Hub"),
    "train": ("coopnets.train.cli", "train a depth-adaptive model (cooperative learning by default) and report every depth"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coopnets", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
