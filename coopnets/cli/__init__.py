"""The ``coopnets`` command line.

Each subcommand is the module of the same name in this package (``coopnets train`` is
:mod:`coopnets.cli.train`), exposing ``add_arguments(parser)`` and ``run(args) -> int``;
this file only dispatches. Modules whose name starts with ``_`` are helpers, not commands.

Example:
    coopnets demo --model coop_resnet18
    coopnets train --model coop_resnet18 --dataset digits --epochs 5 --out runs/r18
    python -m coopnets.cli export runs/r18 --depth 2 --format onnx --out r18_d2.onnx
"""
from __future__ import annotations

import argparse
import importlib
from types import ModuleType
from typing import List, Optional

#: subcommand (= module name in this package) -> one-line help
SUBCOMMANDS = {
    "demo": "build a zoo model, run every depth and print its per-depth profile",
    "export": "write one depth of a model as a standalone ONNX, TorchScript or safetensors file",
    "push": "publish a finished training run's checkpoint (RUN_DIR/model) to the Hugging Face Hub",
    "train": "train a depth-adaptive model (cooperative learning by default) and report every depth",
}


def command_module(name: str) -> ModuleType:
    """The module implementing subcommand ``name`` (imported on demand)."""
    return importlib.import_module(f"{__name__}.{name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coopnets", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, help_text in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        command_module(name).add_arguments(p)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(command_module(args.command).run(args) or 0)
