"""Standalone export of one depth: a plain ``nn.Module`` holding only what that depth runs.

:func:`export_depth` (``model.export(depth=k)``) deep-copies what depth ``k`` needs; how
is the depth plan's job (:meth:`coopnets.models.plans.DepthPlan.export`: a pruned
backbone + exit head for ``exits``, a block-truncated backbone for ``blocks``).

The result has no depth state and no data-dependent control flow, gives the same
outputs as ``model.set_depth(k)``, and traces with ``torch.export.export`` and
``torch.jit.trace``. :func:`save` writes it as ONNX, TorchScript or safetensors (ONNX
needs the optional extra ``pip install coopnets[export]``; the file is checked with
onnxruntime when it is installed).

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
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Union

import torch
from torch import nn

if TYPE_CHECKING:
    from ..models.depth_adaptive import DepthAdaptiveModel


FORMATS = ("onnx", "safetensors", "torchscript")


def export_depth(model: "DepthAdaptiveModel", depth: int) -> nn.Module:
    """A standalone copy of depth ``depth`` of ``model`` (its plan's truncation), in eval mode.

    Raises:
        ValueError: ``depth`` is not one of the model's depths (the message names them).
    """
    return model.export(depth)


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
    ``example`` (:func:`describe_onnx_input` says which). ``metadata`` (model name,
    depth...) goes into the safetensors header and sidecar. Every file written is listed
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
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    if fmt == "safetensors":
        from safetensors.torch import save_model

        save_model(module, str(path), metadata=meta)
        path.with_suffix(".json").write_text(json.dumps({**meta, "input_shape": list(example.shape)}, indent=2))
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
    return path


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

