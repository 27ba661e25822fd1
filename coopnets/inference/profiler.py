"""Per-depth cost of a depth-adaptive model: parameters used, FLOPs, measured latency, and its head's share.

Parameters are counted from the modules a forward pass at that depth actually calls
(forward hooks), so unused stages and exit heads are not counted and the exit head in
use is. FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``. Latency is the
median of ``repeats`` timed passes after ``warmup`` untimed ones, in inference mode; the
depth's head (its exit head, or the backbone's own head at full depth) is timed the same
way alone on the map it reads, and ``head_share`` is its latency over the depth's (the
design rule of ``benchmarks/exit_heads.py``: at most 10 %).

Example:
    >>> import coopnets
    >>> m = coopnets.create_model("coop_resnet18", num_classes=10)
    >>> rows = coopnets.profile(m, input_size=(3, 64, 64), repeats=3, print_table=False)
    >>> [r["depth"] for r in rows]
    [1, 2, 3, 4]
    >>> rows[0]["flops"] < rows[-1]["flops"]
    True
    >>> all(r["head_share"] == r["head_ms"] / r["latency_ms"] > 0 for r in rows)  # each depth's head, timed alone
    True
"""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..models._utils import eval_mode

if TYPE_CHECKING:
    from ..models.depth_adaptive import DepthAdaptiveModel



@contextmanager
def record_calls(model: nn.Module) -> Iterator[Dict[str, int]]:
    """Count how often each named submodule's forward runs inside the block.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
        >>> with record_calls(net) as calls:
        ...     _ = net(torch.randn(1, 2))
        >>> calls["0"], calls["1"]
        (1, 1)
    """
    calls: Dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(_m, _i, _o, name=name):
            calls[name] = calls.get(name, 0) + 1

        handles.append(module.register_forward_hook(hook))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def parameter_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers, each tensor counted once: the weights it keeps in memory.

    Example:
        >>> parameter_bytes(torch.nn.Linear(4, 2))  # 8 weights + 2 biases, float32
        40
    """
    seen: Set[int] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def used_parameters(model: nn.Module, called: Set[str]) -> int:
    """Parameters of ``model`` that belong to called modules.

    A parameter owned directly by a module that was not itself called (a ViT's
    ``pos_embed`` on the root model) counts when any of that module's children ran.
    """
    total = 0
    for name, module in model.named_modules():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        if not own:
            continue
        prefix = name + "." if name else ""
        if name in called or any(c.startswith(prefix) for c in called):
            total += own
    return total


def measure_latency(fn, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def head_call(model: DepthAdaptiveModel, x: torch.Tensor, depth: int) -> Callable[[], torch.Tensor]:
    """Depth ``depth``'s head alone on the map it reads, as a call without arguments (the map is computed
    now): exit head ``depth`` on the map of its exit point, or, at a depth without an exit head (full
    depth; every depth of the ``blocks`` plan), the model's ``forward_head`` on that depth's
    ``forward_features``.

    Example:
        >>> import torch, coopnets
        >>> m = coopnets.create_model("coop_resnet18", num_classes=10).eval()
        >>> [head_call(m, torch.randn(1, 3, 64, 64), d)().shape for d in (1, 4)]
        [torch.Size([1, 10]), torch.Size([1, 10])]
    """
    if depth <= len(model.exits):
        head, fmap = model.exits[depth - 1], model.depth_plan.runner.map_at(x, depth - 1)
        return lambda: head(fmap)
    with model.at_depth(depth):
        feats = model.forward_features(x)

    def run() -> torch.Tensor:
        with model.at_depth(depth):
            return model.forward_head(feats)

    return run


def profile(
    model: DepthAdaptiveModel,
    input_size: Optional[Sequence[int]] = None,
    batch_size: int = 1,
    repeats: int = 20,
    warmup: int = 3,
    device: Optional[torch.device] = None,
    print_table: bool = True,
) -> List[Dict[str, Any]]:
    """Measure every depth of ``model``: params used, FLOPs and median latency.

    Returns one dict per depth (``depth, params, flops, latency_ms, head_ms, head_share, flops_ratio,
    latency_ratio``): ``head_ms`` is the depth's head timed alone on the map it reads (:func:`head_call`),
    ``head_share`` that over ``latency_ms``; ratios are relative to full depth. ``input_size`` (C, H, W) defaults
    to the model's :attr:`~coopnets.DepthAdaptiveModel.default_input_size`. Prints a table
    unless ``print_table=False`` (see :func:`format_table`).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size {batch_size!r}: profile needs at least one image per batch (an int >= 1).")
    device = device or next(model.parameters()).device
    x = torch.randn(batch_size, *(input_size or model.default_input_size), device=device)
    rows = []
    with eval_mode(model), torch.inference_mode():
        for depth in range(1, model.num_depths + 1):
            with model.at_depth(depth):
                with record_calls(model) as calls:
                    model(x)
                with FlopCounterMode(display=False) as counter:
                    model(x)
                latency = measure_latency(lambda: model(x), repeats=repeats, warmup=warmup)
            head_ms = measure_latency(head_call(model, x, depth), repeats=repeats, warmup=warmup)
            rows.append({
                "depth": depth,
                "params": used_parameters(model, set(calls)),
                "flops": int(counter.get_total_flops()),
                "latency_ms": latency,
                "head_ms": head_ms,
                "head_share": head_ms / latency,
            })
    full = rows[-1]
    for r in rows:
        r["flops_ratio"] = r["flops"] / full["flops"] if full["flops"] else float("nan")
        r["latency_ratio"] = r["latency_ms"] / full["latency_ms"]
        r["batch_size"] = batch_size
        r["device"] = str(device)
    if print_table:
        print(format_table(rows))
    return rows


def format_table(rows: Sequence[Dict[str, Any]], extra: Tuple[str, ...] = ()) -> str:
    """A Markdown table of :func:`profile` rows (plus ``extra`` columns such as ``accuracy``); the head's
    latency and share close it when the rows have them (rows of older checkpoints have none).

    Example:
        >>> print(format_table([{"depth": 1, "params": 2e6, "flops": 3e9, "latency_ms": 4.0, "flops_ratio": 0.5,
        ...                      "latency_ratio": 0.4, "head_ms": 0.2, "head_share": 0.05}]))
        | depth | params (M) | GFLOPs | latency (ms) | FLOPs ratio | latency ratio | head (ms) | head share |
        |---|---|---|---|---|---|---|---|
        | 1 | 2.000 | 3.0000 | 4.00 | 0.500 | 0.400 | 0.20 | 5.0 % |
    """
    heads = all("head_ms" in r for r in rows)
    cols = ["depth", *extra, "params (M)", "GFLOPs", "latency (ms)", "FLOPs ratio", "latency ratio",
            *(("head (ms)", "head share") if heads else ())]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        vals = [str(r["depth"])]
        for key in extra:
            v = r.get(key)
            vals.append(f"{v:.4f}" if isinstance(v, float) else str(v))
        vals += [
            f"{r['params'] / 1e6:.3f}",
            f"{r['flops'] / 1e9:.4f}",
            f"{r['latency_ms']:.2f}",
            f"{r['flops_ratio']:.3f}",
            f"{r['latency_ratio']:.3f}",
        ]
        if heads:
            vals += [f"{r['head_ms']:.2f}", f"{100 * r['head_share']:.1f} %"]
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines)
