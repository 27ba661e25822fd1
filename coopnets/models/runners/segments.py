"""Run any traceable timm backbone segment by segment between its exit points.

:func:`build_segments` traces timm's ``forward_intermediates(x, indices=exit indices,
stop_early=False)`` with ``torch.fx`` and timm's own leaf modules and autowrapped
functions (the ones timm's FX feature extraction uses), then cuts the graph into
``len(indices) + 1`` segments: segment ``k`` holds every node that exit ``k``'s feature
map needs and no earlier exit needed; the last segment holds the rest up to the logits. The feature maps are exactly the NCHW tensors that ``forward_intermediates``
returns (its output formatting, e.g. NHWC -> NCHW or token -> map reshapes, is part of
the graph), so an exit head reads the same tensor as in ``forward_exits``.

:class:`SegmentRunner` is a :class:`~coopnets.models.runners.base.Runner`. Between two
segments it keeps every value that a later segment reads (the running feature map, skip
connections, shape integers, ...). When samples leave, each such value is compacted
with a rule found at build time by running the segments on two batch sizes: tensors are
``index_select``-ed along their batch dimension, integers equal to the batch size become
the new batch size (also inside ``torch.Size``/tuples), and values that do not depend on
the batch pass unchanged. A value that mixes samples (e.g. a batch statistic, or the
batch folded into another dimension) makes the build fail with a sentence saying so.

Example:
    >>> import torch, timm
    >>> backbone = timm.create_model("test_byobnet").eval()
    >>> runner = build_segments(backbone, [1, 2], (3, 64, 64))
    >>> runner.num_exits
    2
    >>> state = runner.start(torch.randn(2, 3, 64, 64))
    >>> state, fmap = runner.advance(state, 0)
    >>> fmap.shape[0], runner.finish(runner.advance(runner.compact(state, torch.tensor([0])), 1)[0]).shape[0]
    (2, 1)
"""
from __future__ import annotations

from typing import Any, ClassVar, Dict, List, Sequence, Set, Tuple

import torch
from torch import fx, nn

from .._utils import eval_mode
from .base import Runner

__all__ = ["SegmentRunner", "build_segments"]

Env = Dict[str, Any]
Rule = Tuple[Any, ...]  # ("keep",) | ("dim", d) | ("n",) | ("seq", type, [rules])
_PROBE_BATCHES = (2, 3)


class _ExitsForward(nn.Module):
    """``forward_intermediates`` + ``forward_head`` as one traceable module: the exit feature maps, then the logits
    (the final features of some backbones are not one tensor, e.g. CrossViT's two branches)."""

    def __init__(self, backbone: nn.Module, indices: Sequence[int]) -> None:
        super().__init__()
        self.backbone = backbone
        self.indices = list(indices)

    def forward(self, x):
        final, feats = self.backbone.forward_intermediates(x, indices=self.indices, stop_early=False)
        return (*feats, self.backbone.forward_head(final))


class _TimmTracer(fx.Tracer):
    """``torch.fx`` tracer with timm's FX leaf modules and autowrapped functions."""

    def __init__(self) -> None:
        from timm.layers import get_notrace_functions, get_notrace_modules

        super().__init__(autowrap_functions=tuple(f for f in get_notrace_functions() if callable(f)))
        self._leaves = tuple(m for m in get_notrace_modules() if isinstance(m, type))

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self._leaves) or super().is_leaf_module(m, qualname)


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return f"{type(err).__name__}: {text[:160]}"


class SegmentRunner(Runner):
    """A backbone cut at its exits into ``num_exits + 1`` ``GraphModule`` s (built by :func:`build_segments`).

    The state between segments is a dict of live values (``env``). :meth:`start` makes
    it from the images, :meth:`advance` runs segment ``k`` (0-based, one per exit head)
    and returns the exit's NCHW feature map, :meth:`finish` runs the last segment and
    returns the backbone's logits, :meth:`compact` keeps only some samples of
    every live value. The segments are traced in eval mode: inference only.

    Attributes:
        segments: one ``GraphModule`` per segment; segment ``k < K`` returns
            ``(feature_k, *values read later)``, the last one ``(logits,)``.
        inputs: names of the values each segment reads.
        outputs: names of the values each segment hands on (after its feature map).
        rules: how each live value is compacted (see the module docstring).
    """

    kind: ClassVar[str] = "segments"

    def __init__(
        self,
        backbone: nn.Module,
        segments: List[fx.GraphModule],
        input_name: str,
        inputs: List[List[str]],
        outputs: List[List[str]],
        live: List[List[str]],
    ) -> None:
        super().__init__(backbone, len(segments) - 1)
        self.segments = segments
        self.input_name = input_name
        self.inputs = inputs
        self.outputs = outputs
        self.live = live
        self.rules: Dict[str, Rule] = {}

    def start(self, x: torch.Tensor) -> Env:
        """The state before segment 0: just the images."""
        return {self.input_name: x}

    def _run(self, env: Env, k: int) -> Tuple[Any, Env]:
        out = self.segments[k](*[env[name] for name in self.inputs[k]])
        values = dict(env)
        values.update(zip(self.outputs[k], out[1:]))
        return out[0], {name: values[name] for name in self.live[k]}

    def advance(self, env: Env, k: int) -> Tuple[Env, torch.Tensor]:
        """Run segment ``k`` (``k < num_exits``): the new state and exit ``k``'s feature map."""
        feature, env = self._run(env, k)
        return env, feature

    def finish(self, env: Env) -> torch.Tensor:
        """Run the last segment: the backbone's logits."""
        return self._run(env, self.num_exits)[0]

    def compact(self, env: Env, keep: torch.Tensor) -> Env:
        """Keep the samples ``keep`` (row indices) of every live value."""
        return {name: _apply(self.rules.get(name, ("keep",)), v, keep) for name, v in env.items()}


# --- compaction rules -----------------------------------------------------------------------
def _rule(name: str, a: Any, b: Any, dependent: bool, where: str) -> Rule:
    """How to compact value ``name``, seen as ``a`` at batch 2 and ``b`` at batch 3."""
    na, nb = _PROBE_BATCHES

    def fail(why: str) -> ValueError:
        return ValueError(f"cannot compact the batch across {where}: value {name!r} {why}.")

    if isinstance(a, torch.Tensor):
        if a.ndim != b.ndim:
            raise fail("changes rank with the batch size")
        dims = [d for d in range(a.ndim) if a.shape[d] != b.shape[d]]
        if not dims:
            if dependent:
                raise fail(f"has no batch dimension but depends on the images (shape {tuple(a.shape)}: it mixes samples)")
            return ("keep",)
        if len(dims) > 1 or (a.shape[dims[0]], b.shape[dims[0]]) != (na, nb):
            raise fail(f"holds the batch folded into another dimension (shapes {tuple(a.shape)} / {tuple(b.shape)})")
        return ("dim", dims[0])
    if isinstance(a, bool) or a is None or isinstance(a, (str, float, torch.dtype, torch.device)):
        if a != b:
            raise fail("is a non-tensor value that depends on the batch")
        return ("keep",)
    if isinstance(a, int):
        if a == b:
            return ("keep",)
        if (a, b) == (na, nb):
            return ("n",)
        raise fail(f"is an integer derived from the batch size ({a} at batch {na}, {b} at batch {nb})")
    if isinstance(a, (tuple, list)) and type(a) is type(b) and len(a) == len(b):
        rules = [_rule(f"{name}[{i}]", x, y, dependent, where) for i, (x, y) in enumerate(zip(a, b))]
        if all(r == ("keep",) for r in rules):
            return ("keep",)
        return ("seq", type(a), rules)
    if dependent:
        raise fail(f"is a {type(a).__name__} that depends on the images")
    return ("keep",)


def _apply(rule: Rule, v: Any, keep: torch.Tensor) -> Any:
    kind = rule[0]
    if kind == "keep":
        return v
    if kind == "dim":
        return v.index_select(rule[1], keep)
    if kind == "n":
        return int(keep.numel())
    items = [_apply(r, x, keep) for r, x in zip(rule[2], v)]
    return torch.Size(items) if rule[1] is torch.Size else rule[1](items)


# --- building -------------------------------------------------------------------------------
def _trace(backbone: nn.Module, indices: Sequence[int], size: Sequence[int], name: str) -> Tuple[fx.GraphModule, bool]:
    """FX-trace the exits forward (shape-agnostic); if python control flow on shapes stops
    that, ``torch.export`` it with a dynamic batch (spatial sizes fixed to ``size``)."""
    root = _ExitsForward(backbone, indices)
    tracer = _TimmTracer()
    with eval_mode(root):
        try:
            graph = tracer.trace(root)
            return fx.GraphModule(tracer.root, graph), False
        except Exception as err:  # torch.fx raises many kinds; all mean "not traceable"
            fx_error = _short(err)
        try:
            x = torch.randn(_PROBE_BATCHES[0], *size, device=next(backbone.parameters()).device)
            batch = torch.export.Dim("batch", min=1, max=1 << 16)
            with torch.no_grad():
                program = torch.export.export(root, (x,), dynamic_shapes={"x": {0: batch}}, strict=False)
            return program.module(), True
        except Exception as err:
            raise ValueError(
                f"{name} cannot run segment by segment: neither torch.fx ({fx_error}) nor "
                f"torch.export with a dynamic batch ({_short(err)}) can trace its forward_intermediates."
            ) from None


def _split(gm: fx.GraphModule, backbone: nn.Module, name: str) -> Tuple[SegmentRunner, Set[str]]:
    graph = gm.graph
    nodes = list(graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    output = next(n for n in nodes if n.op == "output")
    outs = output.args[0]
    if len(placeholders) != 1 or not isinstance(outs, (tuple, list)) or not all(isinstance(o, fx.Node) for o in outs):
        raise ValueError(f"{name} cannot run segment by segment: its traced graph does not return one tensor per exit.")
    x_node = placeholders[0]
    num = len(outs)
    # segment of a node: the first exit (or the logits) that needs it
    seg: Dict[fx.Node, int] = {}
    for k, out in enumerate(outs):
        stack = [out]
        while stack:
            n = stack.pop()
            if n in seg or n.op in ("placeholder", "get_attr"):
                continue
            seg[n] = k
            stack.extend(n.all_input_nodes)
    order = {n: i for i, n in enumerate(nodes)}
    for n in nodes:  # nodes no output needs (asserts, in-place calls): with their latest input
        if n not in seg and n.op not in ("placeholder", "get_attr", "output"):
            seg[n] = max([seg.get(m, 0) for m in n.all_input_nodes] or [0])
    if any(seg[m] > seg[n] for n in seg for m in n.all_input_nodes if m in seg):
        raise ValueError(f"{name} cannot run segment by segment: a node runs before a node it reads.")

    def produced_in(n: fx.Node) -> int:
        return -1 if n is x_node else seg[n]

    # what each segment reads from before it, and the feature it returns
    reads: List[Set[fx.Node]] = [set() for _ in range(num)]
    for n, s in seg.items():
        for m in n.all_input_nodes:
            if m.op != "get_attr" and produced_in(m) < s:
                reads[s].add(m)
    for k, out in enumerate(outs):
        if produced_in(out) < k:
            reads[k].add(out)
    # values alive after segment k: produced at or before k and read after k
    live: List[List[fx.Node]] = []
    for k in range(num):
        alive = {m for s in range(k + 1, num) for m in reads[s] if produced_in(m) <= k}
        live.append(sorted(alive, key=order.__getitem__))

    segments, inputs, outputs = [], [], []
    for k in range(num):
        body = sorted((n for n, s in seg.items() if s == k), key=order.__getitem__)
        g = fx.Graph()
        env: Dict[fx.Node, fx.Node] = {}
        ins = sorted(reads[k], key=order.__getitem__)
        for m in ins:
            env[m] = g.placeholder(m.name)
        for n in body:
            for m in n.all_input_nodes:
                if m.op == "get_attr" and m not in env:
                    env[m] = g.get_attr(m.target)
            env[n] = g.node_copy(n, lambda m: env[m])
        hand_on = [m for m in live[k] if produced_in(m) == k]
        g.output(tuple([env[outs[k]]] + [env[m] for m in hand_on]))
        g.lint()
        segments.append(fx.GraphModule(gm, g))
        inputs.append([m.name for m in ins])
        outputs.append([m.name for m in hand_on])
    return SegmentRunner(backbone, segments, x_node.name, inputs, outputs, [[m.name for m in ls] for ls in live]), _dependent(nodes, x_node)


def _dependent(nodes: List[fx.Node], x_node: fx.Node) -> Set[str]:
    dep: Set[fx.Node] = {x_node}
    for n in nodes:
        if any(m in dep for m in n.all_input_nodes):
            dep.add(n)
    return {n.name for n in dep}


def _probe(runner: SegmentRunner, x: torch.Tensor) -> Tuple[List[Env], List[torch.Tensor]]:
    envs, outs = [], []
    env = runner.start(x)
    for k in range(runner.num_exits):
        envs.append(env)
        env, feature = runner.advance(env, k)
        outs.append(feature)
    envs.append(env)
    outs.append(runner.finish(env))
    return envs, outs


@torch.no_grad()
def build_segments(
    backbone: nn.Module, indices: Sequence[int], image_size: Sequence[int], name: str = "", atol: float = 1e-4
) -> SegmentRunner:
    """Cut ``backbone`` into one segment per exit at its ``feature_info`` entries ``indices``, and the rest.

    The segments are traced in eval mode (``training`` branches are fixed at trace time:
    use the runner for inference). The build checks the result: the segments, run on
    random images of ``image_size`` (C, H, W) at two batch sizes, give the same feature
    maps and logits as the unsplit backbone. ``name`` names the backbone in errors.

    Raises:
        ValueError: one sentence saying why this backbone cannot be split (not
            FX-traceable, a value that mixes samples across a cut, a split that changes
            the result).
    """
    name = name or type(backbone).__name__
    size = tuple(int(s) for s in image_size)
    gm, size_specific = _trace(backbone, indices, size, name)
    runner, dependent = _split(gm, backbone, name)
    runner.size_specific = size_specific
    device = next(backbone.parameters()).device
    with eval_mode(backbone):
        probes = []
        for b in _PROBE_BATCHES:
            x = torch.randn(b, *size, device=device)
            try:
                envs, outs = _probe(runner, x)
                ref = backbone.forward_intermediates(x, indices=list(indices), stop_early=False)
            except Exception as err:
                raise ValueError(f"{name} cannot run segment by segment: its traced segments fail ({_short(err)}).") from None
            ref = list(ref[1]) + [backbone.forward_head(ref[0])]
            for k, (got, want) in enumerate(zip(outs, ref)):
                if got.shape != want.shape or not torch.allclose(got, want, atol=atol, rtol=atol):
                    what = "the logits" if k == len(outs) - 1 else f"exit {k + 1}'s feature map"
                    raise ValueError(
                        f"{name} cannot run segment by segment: the traced segments change {what} "
                        f"(the trace fixed a value that depends on the input)."
                    )
            probes.append(envs)
    for k, (env_a, env_b) in enumerate(zip(*probes)):
        where = "the stem input" if k == 0 else f"exit {k}"
        for key in env_a:
            runner.rules[key] = _rule(key, env_a[key], env_b[key], key in dependent, where)
    return runner
