"""``coopnets export``: write one depth of a model as a standalone ONNX, TorchScript or safetensors file.

``RUN_OR_MODEL`` is a zoo model name (``coop_resnet50``, untrained weights) or a folder
written by ``coopnets.save_pretrained`` (``model.safetensors`` + ``config.json``), or a
training run folder holding one in ``model/``; its trained weights are loaded. ONNX files
are checked against PyTorch with onnxruntime when it is installed.

Example:
    coopnets export coop_resnet18 --num-classes 10 --depth 2 --format onnx --out r18_d2.onnx
    coopnets export runs/r18 --depth 3 --format torchscript --out r18_d3.pt
"""
from __future__ import annotations

import argparse
import os
import warnings

from ..inference.export import FORMATS, check_onnx, example_input, save
from ..models import create_model
from ._run_folder import checkpoint_folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="RUN_OR_MODEL", help="zoo model name, or a folder (or run folder with model/) holding model.safetensors + config.json")
    parser.add_argument("--depth", type=int, required=True, help="depth to export, 1..num_depths (-1: full depth)")
    parser.add_argument("--format", choices=FORMATS, default="onnx")
    parser.add_argument("--out", required=True, help="output file")
    parser.add_argument("--num-classes", type=int, default=None, help="classes of a zoo model (default: its config)")
    parser.add_argument("--img-size", type=int, default=None, help="input height/width to trace with (default: the model's)")


def run(args: argparse.Namespace) -> int:
    if os.path.isdir(args.model):
        folder = checkpoint_folder(args.model)
        model = create_model(f"local-dir:{folder}", pretrained=True).eval()
    else:
        model = create_model(args.model, **({} if args.num_classes is None else {"num_classes": args.num_classes})).eval()
    module = model.export(args.depth)
    example = example_input(model, args.img_size)
    meta = {"source": args.model, "depth": args.depth, "num_depths": model.num_depths, "plan": model.plan}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace / save deprecation notices
        path = save(module, args.out, args.format, example, meta)
    n_small = sum(p.numel() for p in module.parameters())
    n_full = sum(p.numel() for p in model.parameters())
    print(f"wrote {path}: {args.model} depth {args.depth}/{model.num_depths} ({args.format}), "
          f"{n_small / 1e6:.3f}M of the model's {n_full / 1e6:.3f}M parameters, input {tuple(example.shape)}")
    if args.format == "onnx":
        diff = check_onnx(path, module, example)
        print("onnxruntime not installed: not checked" if diff is None else f"onnxruntime max |diff| vs PyTorch: {diff:.3g}")
    return 0
