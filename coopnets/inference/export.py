"""Standalone export of one depth: a plain ``nn.Module`` holding only what that depth runs.

:func:`export_depth` (``model.export(depth=k)``) deep-copies what depth ``k`` needs; how
is the depth plan's job (:meth:`coopnets.models.plans.DepthPlan.export`: a pruned
backbone + exit head for ``exits``, a block-truncated backbone for ``blocks``).

The result has no depth state and no data-dependent control flow, gives the same
outputs as ``model.set_depth(k)``, and traces with ``torch.export.export`` and
``torch.jit.trace``. :func:`save` writes it as ONNX, TorchScript or safetensors (ONNX
needs the optional extra ``pip install coopnets[export]``; the file is checked with
onnxruntime when it is installed). :func:`export_metadata` says how to feed the exported
depth (input size, mean, std, interpolation, crop, label names, depth); :func:`save` writes
it into the ONNX ``metadata_props`` (onnxruntime: ``session.get_modelmeta().custom_metadata_map``)
and the safetensors header and sidecar.

Example:
    >>> import torch, coopnets
    >>> m = coopnets.create_model("coop_resnet18", num_classes=10).eval()
    >>> small = m.export(depth=2)
    >>> x = torch.randn(1, 3, 64, 64)
    >>> torch.allclose(small(x), m.set_depth(2)(x), atol=1e-5)
    True
    >>> sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in m.parameters())
    True
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Union

import torch
from torch import nn

if TYPE_CHECKING:
    from ..models.depth_adaptive import DepthAdaptiveModel


FORMATS = ("onnx", "safetensors", "torchscript")
#: the preprocessing fields of :func:`export_metadata` (timm's data config names)
DATA_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def export_depth(model: "DepthAdaptiveModel", depth: int) -> nn.Module:
    """A standalone copy of depth ``depth`` of ``model`` (its plan's truncation), in eval mode.

    Raises:
        ValueError: ``depth`` is not one of the model's depths (the message names them).
    """
    return model.export(depth)


def export_metadata(model: "DepthAdaptiveModel", depth: int) -> Dict[str, Any]:
    """What a consumer of depth ``depth`` exported from ``model`` needs: the architecture, the depth,
    the preprocessing (timm's ``resolve_data_config`` of the model: :data:`DATA_KEYS`) and the
    label names when the model has them (a checkpoint records them: ``pretrained_cfg["label_names"]``).

    Example:
        >>> import coopnets
        >>> m = coopnets.wrap("test_resnet", num_classes=2)
        >>> m.pretrained_cfg = {**m.pretrained_cfg, "input_size": (3, 24, 24), "label_names": ["cat", "dog"]}
        >>> meta = export_metadata(m, -1)
        >>> meta["depth"], meta["num_depths"], meta["input_size"], meta["label_names"]
        (4, 4, (3, 24, 24), ['cat', 'dog'])
    """
    from timm.data import resolve_data_config

    data = resolve_data_config({}, model=model)
    arch = str(model.pretrained_cfg.get("architecture", ""))
    meta: Dict[str, Any] = {
        "architecture": arch if arch.startswith("coop_") else f"coop_{model.backbone_name}",
        "depth": model.resolve_depth(depth), "num_depths": model.num_depths, "plan": model.plan,
        "num_classes": model.num_classes, **{k: data[k] for k in DATA_KEYS if k in data},
    }
    names = model.pretrained_cfg.get("label_names")
    if names and len(names) == model.num_classes:
        meta["label_names"] = list(names)
    return meta


def metadata_strings(metadata: Optional[Dict[str, Any]]) -> Dict[str, str]:
    """``metadata`` as string values (what ONNX ``metadata_props`` and safetensors headers hold): strings as
    they are, everything else as JSON.

    Example:
        >>> metadata_strings({"depth": 2, "mean": (0.5, 0.5), "label_names": ["cat", "dog"], "plan": "exits"})
        {'depth': '2', 'mean': '[0.5, 0.5]', 'label_names': '["cat", "dog"]', 'plan': 'exits'}
    """
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}


def example_input(model: "DepthAdaptiveModel", img_size: Optional[int] = None, batch_size: int = 1) -> torch.Tensor:
    """A random input of the model's :attr:`~coopnets.DepthAdaptiveModel.default_input_size` (or ``img_size`` x ``img_size``).

    Example:
        >>> import coopnets
        >>> m = coopnets.wrap("test_resnet", num_classes=3)
        >>> m.pretrained_cfg = {**m.pretrained_cfg, "input_size": (3, 24, 24)}
        >>> tuple(example_input(m).shape), tuple(example_input(m, img_size=32, batch_size=2).shape)
        ((1, 3, 24, 24), (2, 3, 32, 32))
    """
    c, h, w = model.default_input_size
    if img_size:
        h = w = img_size
    return torch.randn(batch_size, c, h, w)


def save(module: nn.Module, path: Union[str, Path], fmt: str, example: torch.Tensor,
         metadata: Optional[Dict[str, Any]] = None) -> Path:
    """Write an exported module as ``onnx``, ``torchscript`` or ``safetensors`` (weights + a JSON sidecar).

    ``example`` fixes the traced input shape. ONNX gets a dynamic batch dimension and,
    where the model allows it (``torch.export`` dims; e.g. not a ViT with fixed position
    embeddings), a dynamic height and width; else height and width stay those of
    ``example`` (:func:`describe_onnx_input` says which). ``metadata`` (:func:`export_metadata`:
    preprocessing, label names, depth...) goes into the ONNX ``metadata_props`` and the
    safetensors header and sidecar (:func:`metadata_strings`). Every file written is listed
    by :func:`output_files`.

    Example:
        >>> import tempfile, coopnets
        >>> small = coopnets.wrap("test_resnet", num_classes=3).export(2)
        >>> path = save(small, tempfile.mkdtemp() + "/d2.onnx", "onnx", torch.randn(1, 3, 32, 32))  # doctest: +SKIP
        >>> describe_onnx_input(path)  # doctest: +SKIP
        'images: batch x 3 x height x width (dynamic batch, height and width)'
    """
    if fmt not in FORMATS:
        raise ValueError(f"Unknown export format {fmt!r}; valid formats: {', '.join(FORMATS)}.")
    path = Path(path)
    if path.is_dir():  # refused before anything is written (ONNX would leave PATH.data beside the folder)
        raise IsADirectoryError(f"{path} is a folder; give the file to write, e.g. {path / example_name(fmt)}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    meta = metadata_strings(metadata)
    if fmt == "safetensors":
        from safetensors.torch import save_model

        save_model(module, str(path), metadata=meta)
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(path, 0o666 & ~umask)  # safetensors writes through a private temporary file (0600)
        path.with_suffix(".json").write_text(json.dumps({**(metadata or {}), "input_shape": list(example.shape)}, indent=2))
    elif fmt == "torchscript":
        with torch.no_grad():
            torch.jit.save(torch.jit.trace(module, example), str(path))
    else:
        try:
            import onnx  # noqa: F401  (the dynamo exporter needs onnx and onnxscript)
            import onnxscript  # noqa: F401
        except ImportError as e:
            raise ImportError("ONNX export needs the optional extra: pip install 'coopnets[export]'.") from e
        batch = torch.export.Dim("batch", min=1)
        if example.shape[0] == 1:  # torch.export specialises size-1 dims: trace with 2 to keep the batch dynamic
            example = torch.cat([example, example])
        spatial = {2: torch.export.Dim("height", min=8, max=4096), 3: torch.export.Dim("width", min=8, max=4096)}
        for dims in ({0: batch, **spatial}, {0: batch}):
            try:
                with torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    torch.onnx.export(module, (example,), str(path), input_names=["images"], output_names=["logits"],
                                      dynamic_shapes=(dims,), dynamo=True, verbose=False)
                break
            except Exception:  # torch.export refuses dynamic height/width for this model: retry batch-only
                if len(dims) == 1:
                    raise
        if meta:
            _set_onnx_metadata(path, meta)
    return path


def _set_onnx_metadata(path: Path, meta: Dict[str, str]) -> None:
    """Write ``meta`` as the ONNX file's ``metadata_props`` (external weight files are left as they are)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))


def onnx_metadata(path: Union[str, Path]) -> Dict[str, str]:
    """The ``metadata_props`` of an ONNX file, as a dict (values as written: JSON for non-strings)."""
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def example_name(fmt: str, depth: Optional[int] = None) -> str:
    """A file name for format ``fmt`` (what to suggest when a folder is given).

    Example:
        >>> example_name("onnx", 2), example_name("torchscript")
        ('depth2.onnx', 'model.pt')
    """
    suffix = {"onnx": ".onnx", "torchscript": ".pt", "safetensors": ".safetensors"}.get(fmt, "")
    return (f"depth{depth}" if depth is not None else "model") + suffix


def output_files(path: Union[str, Path], fmt: str) -> List[Path]:
    """The files :func:`save` wrote for ``path``: the file itself plus side files
    (``.onnx.data`` external weights, the safetensors ``.json`` sidecar) that exist.

    Example:
        >>> output_files("/nonexistent/d2.onnx", "onnx")
        [PosixPath('/nonexistent/d2.onnx')]
    """
    path = Path(path)
    sides = {"onnx": [path.with_name(path.name + ".data")], "safetensors": [path.with_suffix(".json")]}.get(fmt, [])
    return [path] + [p for p in sides if p.is_file()]


def describe_onnx_input(path: Union[str, Path]) -> str:
    """The ONNX file's input shape in words: which of batch, height and width are dynamic."""
    import onnx

    (inp,) = onnx.load(str(path), load_external_data=False).graph.input[:1]
    dims = [d.dim_param or str(d.dim_value) for d in inp.type.tensor_type.shape.dim]
    dynamic = [name for name, d in zip(("batch", "channels", "height", "width"), inp.type.tensor_type.shape.dim) if d.dim_param]
    fixed = "" if len(dynamic) == 3 else f"; height x width fixed at {dims[2]}x{dims[3]} (the model does not allow other sizes)"
    return f"{inp.name}: {' x '.join(dims)} (dynamic {', '.join(dynamic) or 'nothing'}{fixed})"


def check_onnx(path: Union[str, Path], module: nn.Module, example: torch.Tensor) -> Optional[float]:
    """Max absolute difference between onnxruntime on ``path`` and ``module`` on ``example``; ``None`` without onnxruntime."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: example.numpy()})
    with torch.no_grad():
        want = module(example)
    return float((torch.from_numpy(got) - want).abs().max())

