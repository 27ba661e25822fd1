"""``coopnets export``: write one depth of a model as a standalone ONNX, TorchScript or safetensors file.

``SOURCE`` is a training run folder (its ``model/`` checkpoint), a checkpoint folder
written by ``coopnets.save_pretrained``, a Hub checkpoint ``hf-hub:ORG/NAME[@REV]`` (or
``local-dir:PATH``), each with its trained weights, or a zoo model name (``coop_resnet50``,
untrained). The example input is the checkpoint's own ``input_size`` unless ``--img-size``
is given. ONNX files get a dynamic batch and, where the model allows, a dynamic height
and width (the output says which); side files (``.onnx.data``) are named. ONNX files are
checked against PyTorch with onnxruntime when it is installed. The file records how to feed
it (:func:`coopnets.inference.export.export_metadata`: input size, mean, std, interpolation,
crop, label names, depth) in its ONNX ``metadata_props`` or safetensors header.

Example:
    coopnets export runs/r18 --depth 3 --format onnx --out r18_d3.onnx
    coopnets export hf-hub:someorg/coop_resnet18.digits --depth 2 --format torchscript --out d2.pt
    coopnets export coop_resnet18 --num-classes 10 --depth 2 --format onnx --out r18_d2.onnx
"""
from __future__ import annotations

import argparse
import os
import warnings

from ..hub import CheckpointError, HubLocation
from ..inference.export import (FORMATS, check_onnx, describe_onnx_input, example_input, example_name, export_metadata,
                                output_files, save)
from ..models import DepthAdaptiveModel, create_model, is_model
from ._run_folder import checkpoint_folder
from .errors import bad_value

SOURCES = "a run folder, a checkpoint folder, hf-hub:ORG/NAME[@REV], local-dir:PATH or a zoo model name"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="SOURCE", help=SOURCES)
    parser.add_argument("--depth", type=int, required=True, help="depth to export, 1..num_depths (-1: full depth)")
    parser.add_argument("--format", choices=FORMATS, default="onnx")
    parser.add_argument("--out", required=True, help="output file")
    parser.add_argument("--num-classes", type=int, default=None, help="classes of a zoo model (default: its config)")
    parser.add_argument("--img-size", type=int, default=None, help="input height/width to trace with (default: the checkpoint's input_size)")


def load_source(source: str, num_classes: "int | None" = None) -> DepthAdaptiveModel:
    """The model ``source`` names (see :data:`SOURCES`), in eval mode, with its trained weights when it has any.

    Example:
        >>> load_source("coop_resnet18", num_classes=3).num_classes
        3
        >>> load_source("runs/does-not-exist")
        Traceback (most recent call last):
        ...
        coopnets.hub.format.CheckpointError: runs/does-not-exist does not exist: give a training run folder (RUN_DIR with model/) or a checkpoint folder.
    """
    if HubLocation.is_location(source):
        model = create_model(source, pretrained=True)
    elif is_model(source):
        model = create_model(source, **({} if num_classes is None else {"num_classes": num_classes}))
    elif os.path.exists(source) or os.sep in source or source.startswith("."):
        model = create_model(f"local-dir:{checkpoint_folder(source)}", pretrained=True)
    else:
        raise CheckpointError(f"unknown model {source!r}: give {SOURCES} (see coopnets.list_models()).")
    return model.eval()


def check_args(args: argparse.Namespace) -> None:
    """Refuse, before the model is loaded or anything written, an ``--out`` that is a folder and sizes < 1."""
    if os.path.isdir(args.out):
        raise bad_value("--out", args.out, f"is a folder; give the file to write, e.g. "
                                           f"{os.path.join(args.out, example_name(args.format, args.depth))}")
    for flag, value in (("--num-classes", args.num_classes), ("--img-size", args.img_size)):
        if value is not None and value < 1:
            raise bad_value(flag, value, "must be >= 1")


def run(args: argparse.Namespace) -> int:
    check_args(args)
    model = load_source(args.model, args.num_classes)
    module = model.export(args.depth)  # a bad depth fails here, before anything is written
    example = example_input(model, args.img_size)
    meta = {"source": args.model, **export_metadata(model, args.depth)}  # preprocessing, labels, depth
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace / save deprecation notices
        path = save(module, args.out, args.format, example, meta)
    n_small = sum(p.numel() for p in module.parameters())
    n_full = sum(p.numel() for p in model.parameters())
    print(f"wrote {', '.join(map(str, output_files(path, args.format)))}: {args.model} depth {args.depth}/{model.num_depths} "
          f"({args.format}), {n_small / 1e6:.3f}M of the model's {n_full / 1e6:.3f}M parameters, input {tuple(example.shape)}")
    if args.format == "onnx":
        print(f"input: {describe_onnx_input(path)}")
        diff = check_onnx(path, module, example)
        print("onnxruntime not installed: not checked" if diff is None else f"onnxruntime max |diff| vs PyTorch: {diff:.3g}")
    return 0
