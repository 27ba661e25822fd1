"""The ``coopnets`` command line.

Each subcommand is the module of the same name in this package (``coopnets train`` is
:mod:`coopnets.cli.train`), exposing ``add_arguments(parser)`` and ``run(args) -> int``;
this file only dispatches. Modules whose name starts with ``_`` are helpers, not commands.

Every command runs under the one error policy of :mod:`coopnets.cli.errors`: an expected
failure (a bad setting, a missing path, a file that is not a checkpoint, offline without a
cached copy, a missing repo, a refused token, the Hub unreachable) ends it with one line on
stderr, ``coopnets COMMAND: error: ...``, and exit code 2; argparse errors are two lines.

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

from .errors import EXPECTED_ERRORS, one_line, run_entry

__all__ = ["EXPECTED_ERRORS", "SUBCOMMANDS", "build_parser", "command_module", "main", "one_line"]

#: subcommand (= module name in this package) -> one-line help
SUBCOMMANDS = {
    "bench": "load-test a serving endpoint: `coopnets bench serve URL` (open-loop phases, or closed-loop capacity)",
    "demo": "build a zoo model, run every depth and print its per-depth profile",
    "export": "write one depth of a model as a standalone ONNX, TorchScript or safetensors file",
    "push": "publish a finished training run's checkpoint (RUN_DIR/model) to the Hugging Face Hub",
    "serve": "serve a model over HTTP on Ray Serve, each batch's depth chosen to meet a latency SLO",
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
    """Run ``coopnets COMMAND ...``; returns the exit code (2 for an expected failure, reported on stderr).

    Example:
        >>> main(["export", "no_such_model", "--depth", "1", "--out", "x.onnx"])
        2
    """
    prog = ["coopnets"]

    def dispatch() -> int:
        args = build_parser().parse_args(argv)
        prog[0] = f"coopnets {args.command}"
        return int(command_module(args.command).run(args) or 0)

    return run_entry(dispatch, prog="coopnets", name_of=lambda: prog[0])
