"""The benchmark harness: what every script in ``benchmarks/`` shares, and nothing else.

A benchmark is run as ``python benchmarks/NAME.py ...``, so this folder is on ``sys.path``
and it imports this module as ``import harness`` (tests get the same through pytest's
``pythonpath = ["benchmarks"]`` in ``pyproject.toml``). No benchmark imports another one;
what two of them need lives here (measurement and reporting) or in ``coopnets`` (library
concepts such as the recipe registry).

What it provides (every name below is part of the stable API):

* the run's record: :func:`command_line` (``python benchmarks/x.py ARGS``, shell-quoted, as
  run), :func:`machine` (CPU model, cores, torch threads, load average, GPU, Python / torch /
  timm / coopnets versions) and :func:`describe_machine` (that record as one sentence);
* statistics: :func:`median_interval` (distribution-free confidence interval of the median,
  from binomial order statistics), :func:`t_interval` (mean and Student-t interval),
  :func:`paired_difference`, :func:`paired_ratios`, :func:`ratio_interval`, :func:`mean_std`;
* timing: :func:`time_interleaved` runs several callables in turns, the order alternating
  every repeat (or with a reference callable between every two others), and returns
  :class:`Timings` (per-call seconds, medians with intervals, paired per-repeat ratios);
* training benchmarks: :func:`recipe_methods` (``cooperative`` first, then the recipes asked
  for or all registered ones), :func:`add_train_arguments` / :func:`train_settings` /
  :func:`describe_training` (the training settings every method of a comparison shares);
* servers: :class:`ServeProcess` (``coopnets serve`` as a subprocess in its own session on a
  free port of 127.0.0.1, ready once ``/healthz`` answers, stopped by process group, then
  whatever is left of its session), :func:`session_pids` (every process of a session);
* output: :func:`progress_bar` (tqdm on stderr), :func:`markdown_table`,
  :func:`format_interval`, :func:`pyplot` (matplotlib with the ``Agg`` backend),
  :func:`write_json` (strict JSON: NaN as ``null``) and :class:`Report`, which holds the
  command, the machine, the load at start and end, the elapsed time, the text, tables and
  notes, renders them as Markdown and writes ``<name>.md``, ``<name>.json`` and
  ``<name>.png`` into an output folder (:meth:`Report.keep_handwritten` keeps an earlier
  report's hand-written section on rewrite).

A benchmark in a few lines::

    import harness

    def main(argv=None):
        args = parser.parse_args(argv)
        report = harness.Report.start("mybench", "My benchmark", __file__, argv)
        t = harness.time_interleaved({"a": f, "b": g}, repeats=args.repeats, warmup=1)
        report.finish()
        report.table(["variant", "median ms", "vs b"],
                     [[n, f"{1e3 * t.median(n):.2f}", harness.format_interval(t.ratio(n, "b"), unit="x")]
                      for n in t.names])
        fig, ax = harness.pyplot().subplots()
        ax.bar(t.names, [t.median(n) for n in t.names])
        report.write(args.out, data={"times": t.to_dict()}, figure=fig)  # mybench.md, .json, .png

Example:
    >>> iv = median_interval([5.0, 1.0, 4.0, 2.0, 3.0])
    >>> iv["median"], iv["lo"], iv["hi"], iv["level"]
    (3.0, 1.0, 5.0, 0.9375)
    >>> print(markdown_table(["a", "b"], [[1, "x|y"]]))
    | a | b |
    |---|---|
    | 1 | x\\|y |
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import (Any, Callable, Dict, Hashable, Iterable, List, Mapping, MutableMapping, Optional, Sequence, Tuple,
                    TypedDict, Union)

__all__ = [
    "REPO", "HANDWRITTEN_MARK", "Machine", "MeanInterval", "MedianInterval", "PairedDifference", "Timings", "Report",
    "command_line", "machine", "describe_machine", "load_average",
    "mean_std", "t_interval", "median_interval", "paired_difference", "paired_ratios", "ratio_interval",
    "time_interleaved",
    "REFERENCE_METHOD", "recipe_methods", "TRAIN_ARGUMENTS", "add_train_arguments", "train_settings",
    "describe_training",
    "ServeProcess", "free_port", "session_pids",
    "progress_bar", "markdown_table", "format_interval", "strict_json", "write_json", "pyplot",
]

#: the repository root (the folder above ``benchmarks/``); commands are written relative to it
REPO = Path(__file__).resolve().parent.parent
#: what a heading of a report's hand-written part says (:meth:`Report.keep_handwritten`)
HANDWRITTEN_MARK = "(written by hand"


# --- the run's record ---------------------------------------------------------------------
def command_line(script: Union[str, Path], argv: Optional[Sequence[str]] = None) -> str:
    """The command as run: ``python benchmarks/x.py ARGS``, every argument shell-quoted.

    Args:
        script: the benchmark's file (pass ``__file__``); written relative to :data:`REPO`
            when it lies inside it, else as given.
        argv: its arguments (default ``sys.argv[1:]``; pass a ``main(argv)``'s own list so
            that a call from a test records what the test passed).

    Example:
        >>> command_line(REPO / "benchmarks" / "latency.py", ["--models", "a b", "--repeats", "3"])
        "python benchmarks/latency.py --models 'a b' --repeats 3"
    """
    path = Path(script)
    try:
        shown = str(path.resolve().relative_to(REPO))
    except ValueError:
        shown = str(script)
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(shlex.quote(a) for a in ["python", shown, *map(str, args)])


class Machine(TypedDict, total=False):
    """What :func:`machine` records (every value JSON-able; older results may lack some keys)."""

    cpu: str  #: CPU model name (``lscpu``'s "Model name", else ``platform.processor()``)
    cores: int  #: logical CPUs visible to this process
    torch_threads: Union[int, str]  #: ``torch.get_num_threads()`` (a benchmark may write e.g. "1 per run")
    load_avg: List[float]  #: 1, 5 and 15 minute load averages when recorded
    gpu: Optional[str]  #: name of CUDA device 0, or None
    platform: str  #: ``platform.platform()``
    python: str
    torch: str
    timm: str
    coopnets: str


def load_average() -> List[float]:
    """The 1, 5 and 15 minute load averages (NaN where the OS has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return [float("nan")] * 3


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration, subprocess.SubprocessError):
        return platform.processor() or platform.machine() or "unknown CPU"


def _version(module: str) -> str:
    """The installed distribution's version (read from its metadata: nothing is imported)."""
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine() -> Machine:
    """This machine and its libraries, now: see :class:`Machine` for the keys.

    Example:
        >>> m = machine()
        >>> sorted(m) == sorted(Machine.__annotations__) and m["cores"] >= 1 and len(m["load_avg"]) == 3
        True
    """
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return Machine(cpu=_cpu_model(), cores=os.cpu_count() or 1, torch_threads=torch.get_num_threads(),
                   load_avg=load_average(), gpu=gpu, platform=platform.platform(), python=platform.python_version(),
                   torch=torch.__version__, timm=_version("timm"), coopnets=_version("coopnets"))


def describe_machine(m: Union[Mapping[str, Any], str], load: Optional[Sequence[float]] = None) -> str:
    """One sentence for a report: CPU, cores, threads, GPU, versions and the load average.

    ``m`` is a :func:`machine` record (keys it lacks are left out, so older results still
    render) or an already written sentence (returned as it is). ``load``: the 1-minute load
    average at the start and at the end of the run.

    Example:
        >>> describe_machine({"cpu": "Xeon", "cores": 2, "torch_threads": 1, "gpu": None, "torch": "2.5",
        ...                   "timm": "1.0", "python": "3.11", "coopnets": "0.2"}, load=[1.5, 2.25])
        'Xeon, 2 CPU cores visible, 1 torch thread(s), no GPU; torch 2.5, timm 1.0, Python 3.11, coopnets 0.2. Load average (1 min) 1.50 at the start, 2.25 at the end (this benchmark included).'
    """
    if isinstance(m, str):
        return m
    parts = [str(m.get("cpu", "unknown CPU"))]
    if "cores" in m:
        parts.append(f"{m['cores']} CPU cores visible")
    if "torch_threads" in m:
        threads = m["torch_threads"]
        parts.append(f"{threads} torch thread(s)" if str(threads).isdigit() else f"torch threads: {threads}")
    if "gpu" in m:
        parts.append(f"GPU {m['gpu']}" if m["gpu"] else "no GPU")
    libs = [f"{label} {m[key]}" for key, label in (("torch", "torch"), ("timm", "timm"), ("python", "Python"),
                                                    ("coopnets", "coopnets")) if key in m]
    text = ", ".join(parts) + ("; " + ", ".join(libs) if libs else "") + "."
    if load is not None and len(load) >= 2:
        text += (f" Load average (1 min) {load[0]:.2f} at the start, {load[1]:.2f} at the end "
                 "(this benchmark included).")
    return text


# --- statistics ---------------------------------------------------------------------------
class MeanInterval(TypedDict):
    """A mean and its two-sided interval (``lo``/``hi`` NaN when it cannot be computed)."""

    mean: float
    lo: float
    hi: float
    n: int


class MedianInterval(TypedDict):
    """A median and a distribution-free interval; ``level`` is the interval's actual coverage."""

    median: float
    lo: float
    hi: float
    n: int
    level: float


class PairedDifference(MeanInterval):
    """:func:`paired_difference`: the mean difference with its t-interval, the keys paired and the wins."""

    seeds: List[Any]
    wins: int


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value).

    Example:
        >>> mean_std([1.0, 2.0, 3.0]), mean_std([4.0])
        ((2.0, 1.0), (4.0, 0.0))
    """
    values = list(values)
    if not values:
        raise ValueError("mean_std of no values")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def t_interval(values: Sequence[float], level: float = 0.95) -> MeanInterval:
    """Mean and two-sided Student-t interval at ``level`` (``lo``/``hi`` NaN for fewer than 2 values).

    Example:
        >>> r = t_interval([1.0, 2.0, 3.0]); r["mean"], round(r["hi"] - r["mean"], 3), r["n"]
        (2.0, 2.484, 3)
    """
    from scipy import stats

    values = list(values)
    n = len(values)
    mean = sum(values) / n if n else float("nan")
    if n < 2:
        return MeanInterval(mean=mean, lo=float("nan"), hi=float("nan"), n=n)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return MeanInterval(mean=mean, lo=mean - half, hi=mean + half, n=n)


def median_interval(values: Iterable[float], level: float = 0.95) -> MedianInterval:
    """Median and a distribution-free confidence interval for it.

    The interval is ``[x_(k), x_(n+1-k)]`` of the sorted values with the largest ``k`` whose
    coverage ``1 - 2 P(B < k)``, ``B ~ Binomial(n, 1/2)``, is at least ``level``; ``level`` in the
    result is that actual coverage. Too few values for ``level`` (fewer than 6 at 95 %) give the
    full range with its (lower) coverage; one value gives a zero-width interval of coverage 0.

    Example:
        >>> iv = median_interval(range(1, 11)); iv["median"], iv["lo"], iv["hi"], round(iv["level"], 4)
        (5.5, 2, 9, 0.9785)
    """
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        return MedianInterval(median=float("nan"), lo=float("nan"), hi=float("nan"), n=0, level=0.0)
    below = [math.comb(n, i) / 2 ** n for i in range(n + 1)]  # P(B = i)

    def coverage(k: int) -> float:
        return 1.0 - 2.0 * sum(below[:k])

    k = 1
    for cand in range(n // 2, 0, -1):  # largest k (narrowest interval) with enough coverage
        if coverage(cand) >= level:
            k = cand
            break
    return MedianInterval(median=statistics.median(xs), lo=xs[k - 1], hi=xs[n - k], n=n,
                          level=max(coverage(k), 0.0) if n > 1 else 0.0)


def paired_ratios(a: Sequence[float], b: Sequence[float]) -> List[float]:
    """``a_i / b_i`` for every repeat ``i`` (neighbours in time share the machine's load)."""
    if len(a) != len(b):
        raise ValueError(f"paired_ratios needs as many values on both sides ({len(a)} vs {len(b)})")
    return [x / y for x, y in zip(a, b)]


def ratio_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> MedianInterval:
    """Median of the paired per-repeat ratios ``a_i / b_i``, with :func:`median_interval`'s interval.

    Example:
        >>> ratio_interval([2.0, 4.0, 9.0], [1.0, 2.0, 3.0])["median"]
        2.0
    """
    return median_interval(paired_ratios(a, b), level)


def paired_difference(a: Mapping[Hashable, float], b: Mapping[Hashable, float],
                      level: float = 0.95) -> PairedDifference:
    """``a - b`` over the keys (e.g. seeds) both have: mean with t-interval, those keys and how many favour ``a``.

    Example:
        >>> d = paired_difference({0: 0.9, 1: 0.8, 2: 0.85}, {0: 0.88, 1: 0.79, 2: 0.80, 3: 0.1})
        >>> d["seeds"], round(d["mean"], 4), d["wins"]
        ([0, 1, 2], 0.0267, 3)
    """
    keys = sorted(set(a) & set(b))
    diffs = [a[k] - b[k] for k in keys]
    return PairedDifference(**t_interval(diffs, level), seeds=keys, wins=sum(d > 0 for d in diffs))


# --- timing -------------------------------------------------------------------------------
@dataclasses.dataclass
class Timings:
    """What :func:`time_interleaved` measured, in seconds.

    Attributes:
        names: the variants, in the order given (the reference, if any, first).
        times: name -> seconds of every timed call, in call order.
        warmup: name -> seconds of every warm-up call.
        calls: every timed call's name, in the order the calls were made.
        reference: the variant timed between every two others, or None.
        before, after: with a reference: name -> the reference call right before / after each of its calls.
    """

    names: List[str]
    times: Dict[str, List[float]]
    warmup: Dict[str, List[float]]
    calls: List[str]
    reference: Optional[str] = None
    before: Dict[str, List[float]] = dataclasses.field(default_factory=dict)
    after: Dict[str, List[float]] = dataclasses.field(default_factory=dict)

    def median(self, name: str) -> float:
        """Median seconds of ``name``'s timed calls."""
        return statistics.median(self.times[name])

    def interval(self, name: str, level: float = 0.95) -> MedianInterval:
        """Median seconds of ``name`` with its distribution-free interval (:func:`median_interval`)."""
        return median_interval(self.times[name], level)

    def neighbours(self, name: str) -> List[float]:
        """With a reference: the mean of the reference calls right before and after each call of ``name``."""
        if name == self.reference:
            return list(self.times[name])
        return [(b + a) / 2 for b, a in zip(self.before[name], self.after[name])]

    def ratios(self, name: str, other: Optional[str] = None) -> List[float]:
        """Per-repeat ratios ``name / other`` (paired by repeat), or, with ``other`` None, ``name`` / its
        neighbouring reference calls (:meth:`neighbours`)."""
        if other is None:
            if self.reference is None:
                raise ValueError("ratios(name) without `other` needs a reference variant")
            return paired_ratios(self.times[name], self.neighbours(name))
        return paired_ratios(self.times[name], self.times[other])

    def ratio(self, name: str, other: Optional[str] = None, level: float = 0.95) -> MedianInterval:
        """Median of :meth:`ratios` with its distribution-free interval."""
        return median_interval(self.ratios(name, other), level)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able: every field."""
        return dataclasses.asdict(self)


def _noop() -> None:
    return None


def time_interleaved(fns: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 1, *,
                     reference: Optional[str] = None, sync: Optional[Callable[[], Any]] = None,
                     bar: Any = None, first_warmup_units: int = 1,
                     timer: Callable[[], float] = time.perf_counter) -> Timings:
    """Time every callable of ``fns`` in turns, so that a change of machine load hits all of them alike.

    First ``warmup`` untimed calls of each (in the order given; their seconds are kept in
    ``Timings.warmup``). Then ``repeats`` rounds:

    * without ``reference``: every callable once per round, in the given order on even rounds
      and reversed on odd ones (``a b c``, ``c b a``, ``a b c``...), so the calls of one round
      are neighbours in time and :meth:`Timings.ratio` pairs them;
    * with ``reference`` (a key of ``fns``): ``ref, x1, ref, x2, ..., xN, ref``, the others'
      order alternating between rounds; each call of ``xi`` records the reference calls right
      before and after it (:attr:`Timings.before` / :attr:`Timings.after`), and
      ``Timings.ratio(xi)`` is the median of ``xi`` / the mean of those two.

    Args:
        fns: name -> callable without arguments (bind inputs with a lambda).
        repeats: timed rounds.
        warmup: untimed calls of each callable before the first round (compilation goes here).
        reference: the variant to time between every two others, or None.
        sync: called right before starting and right before stopping each clock, e.g.
            ``torch.cuda.synchronize`` for GPU work.
        bar: a progress bar (:func:`progress_bar`) advanced by one per call (the first warm-up
            call of each variant by ``first_warmup_units``, e.g. to weigh a compilation), with
            the current phase as its postfix. Its total is the caller's to set.
        timer: the clock (seconds); tests pass a fake one.

    Example:
        >>> t = time_interleaved({"a": lambda: None, "b": lambda: None}, repeats=3, warmup=0)
        >>> t.calls
        ['a', 'b', 'b', 'a', 'a', 'b']
        >>> t = time_interleaved({"p": lambda: None, "x": lambda: None, "y": lambda: None}, 2, 0, reference="p")
        >>> " ".join(t.calls), len(t.times["p"])
        ('p x p y p p y p x p', 6)
    """
    names = list(fns)
    if reference is not None and reference not in fns:
        raise KeyError(f"reference {reference!r} is not one of {names}")
    if reference is not None:
        names = [reference] + [n for n in names if n != reference]
    others = [n for n in names if n != reference]
    sync = sync or _noop
    res = Timings(names=names, times={n: [] for n in names}, warmup={n: [] for n in names}, calls=[],
                  reference=reference)
    if reference is not None:
        res.before = {n: [] for n in others}
        res.after = {n: [] for n in others}

    def call(name: str) -> float:
        sync()
        start = timer()
        fns[name]()
        sync()
        return timer() - start

    def postfix(text: str) -> None:
        if bar is not None:
            bar.set_postfix_str(text)

    for name in names:
        for i in range(warmup):
            postfix(f"warm-up {name}")
            res.warmup[name].append(call(name))
            if bar is not None:
                bar.update(first_warmup_units if i == 0 else 1)

    def timed(name: str) -> float:
        t = call(name)
        res.times[name].append(t)
        res.calls.append(name)
        if bar is not None:
            bar.update(1)
        return t

    for r in range(repeats):
        postfix(f"round {r + 1}/{repeats}")
        order = others if r % 2 == 0 else others[::-1]
        if reference is None:
            for name in order:
                timed(name)
            continue
        before = timed(reference)
        for name in order:
            timed(name)
            after = timed(reference)
            res.before[name].append(before)
            res.after[name].append(after)
            before = after
    return res


# --- training benchmarks -------------------------------------------------------------------
#: the method every training benchmark compares the others with
REFERENCE_METHOD = "cooperative"


def recipe_methods(requested: Optional[Sequence[str]] = None, reference: str = REFERENCE_METHOD) -> List[str]:
    """The training methods to compare: ``reference`` first, then ``requested`` (default: every
    registered recipe, by name). An unknown name is a ``SystemExit`` that lists the valid ones.

    Example:
        >>> recipe_methods(["multi_exit", "byot"])
        ['cooperative', 'multi_exit', 'byot']
    """
    from coopnets.train.recipe import RECIPES

    methods = list(requested) if requested else sorted(RECIPES)
    unknown = sorted(set(methods) - set(RECIPES))
    if unknown:
        raise SystemExit(f"Unknown method(s) {unknown}; valid methods: {', '.join(sorted(RECIPES))}.")
    return [reference] + [m for m in methods if m != reference]


#: :func:`add_train_arguments`'s options: flag -> (TrainConfig field, type, default, help)
TRAIN_ARGUMENTS: Dict[str, Tuple[str, Any, Any, str]] = {
    "--data-dir": ("data_dir", str, None, "ImageFolder root (default: the embedded digits set)"),
    "--model": ("model", str, "test_resnet", "backbone of every method (zoo or timm name)"),
    "--plan": ("plan", str, "exits", "depth plan: exits or blocks"),
    "--img-size": ("img_size", int, 32, "input px"),
    "--epochs": ("epochs", int, 10, "training epochs of every run"),
    "--batch-size": ("batch_size", int, 64, "batch size"),
    "--lr": ("lr", float, 0.05, "learning rate"),
    "--opt": ("opt", str, "sgd", "timm optimizer name"),
    "--sched": ("sched", str, "cosine", "timm scheduler name"),
    "--device": ("device", str, None, "device (default: the trainer's choice)"),
}


def add_train_arguments(parser: Any, **defaults: Any) -> None:
    """Add the training settings every method of a comparison shares (:data:`TRAIN_ARGUMENTS`) to an
    ``argparse`` parser; ``defaults`` overrides defaults by field name (e.g. ``model="coop_resnet18"``)."""
    for flag, (field, kind, default, text) in TRAIN_ARGUMENTS.items():
        extra = {"choices": ("exits", "blocks")} if field == "plan" else {}
        parser.add_argument(flag, type=kind, default=defaults.get(field, default), help=text, **extra)


def train_settings(args: Any) -> Dict[str, Any]:
    """The :func:`add_train_arguments` values of parsed ``args``, as ``TrainConfig`` fields."""
    return {field: getattr(args, field) for field, *_ in TRAIN_ARGUMENTS.values()}


def describe_training(s: Mapping[str, Any]) -> str:
    """One phrase for a report: data, backbone, plan, size, epochs, batch and optimiser of :func:`train_settings`."""
    data = s.get("data_dir") or "digits (embedded: 1,077 train / 360 val / 360 test images, stratified split)"
    return (f"Data: {data}. Backbone `{s['model']}`, plan `{s['plan']}`, {s['img_size']} px, {s['epochs']} epochs, "
            f"batch {s['batch_size']}, {s['opt']} lr {s['lr']} ({s['sched']})")


# --- output -------------------------------------------------------------------------------
def progress_bar(iterable: Optional[Iterable[Any]] = None, total: Optional[float] = None, desc: Optional[str] = None,
                 unit: str = "it", disable: bool = False, **kwargs: Any) -> Any:
    """A tqdm progress bar on stderr (so stdout keeps only the report), resizing with the terminal.

    Use it as ``with progress_bar(total=n, unit="run") as bar: ... bar.update(1)``; print
    lines with ``bar.write(text)`` so they do not break the bar.
    """
    from tqdm.auto import tqdm

    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("file", sys.stderr)
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, **kwargs)


def _cell(value: Any, escape: bool) -> str:
    text = str(value).replace("\n", " ")
    return text.replace("|", "\\|") if escape else text


def markdown_table(head: Sequence[Any], rows: Iterable[Sequence[Any]], escape: bool = True) -> str:
    """A GitHub Markdown table (no trailing newline); cells are ``str()``-ed, ``|`` in them escaped.

    Rows shorter than ``head`` are padded with empty cells; longer ones are an error.
    """
    width = len(head)
    lines = ["| " + " | ".join(_cell(h, escape) for h in head) + " |", "|" + "---|" * width]
    for row in rows:
        row = list(row)
        if len(row) > width:
            raise ValueError(f"a row has {len(row)} cells for {width} columns: {row}")
        lines.append("| " + " | ".join(_cell(c, escape) for c in row + [""] * (width - len(row))) + " |")
    return "\n".join(lines)


def format_interval(iv: Mapping[str, Any], fmt: str = "{:.2f}", scale: float = 1.0, signed: bool = False,
                    unit: str = "") -> str:
    """``1.02x [0.98, 1.07]``: an interval's centre (``mean`` or ``median``) and bounds, each ``scale``-d and
    formatted with ``fmt`` (``signed``: with a sign), ``unit`` after the centre; NaN or missing
    (None) bounds are left out.

    Example:
        >>> format_interval({"mean": 0.931, "lo": 0.918, "hi": 0.944, "n": 3}, "{:.1f}", scale=100)
        '93.1 [91.8, 94.4]'
        >>> format_interval({"median": 0.02, "lo": float("nan"), "hi": float("nan")}, "{:.1f}", 100, signed=True)
        '+2.0'
        >>> format_interval({"median": 1.5, "lo": 1.2, "hi": None}, unit="x")
        '1.50x'
    """
    f = fmt.replace("{:", "{:+") if signed else fmt
    centre = iv["mean"] if "mean" in iv else iv["median"]
    text = f.format(scale * centre) + unit
    lo, hi = iv.get("lo"), iv.get("hi")
    if lo is not None and hi is not None and not (math.isnan(lo) or math.isnan(hi)):
        text += f" [{f.format(scale * lo)}, {f.format(scale * hi)}]"
    return text


def strict_json(value: Any) -> Any:
    """``value`` as strict JSON data: NaN/inf floats as None, tuples as lists, dataclasses and paths converted."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {str(k) if not isinstance(k, str) else k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: Union[str, Path], data: Any) -> Path:
    """Write ``data`` as strict JSON (:func:`strict_json`, indent 1, final newline), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(strict_json(data), indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


def pyplot() -> Any:
    """``matplotlib.pyplot`` with the non-interactive ``Agg`` backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class Report:
    """A benchmark's report: its command, machine and timing record, and the text, tables and notes.

    Build it at the start of a measurement with :meth:`start` (records command, machine,
    time and load), call :meth:`finish` at the end (elapsed time, load), add content in
    reading order (:meth:`heading`, :meth:`text`, :meth:`table`, :meth:`bullets`,
    :meth:`code`, :meth:`image`; :meth:`note` adds to a closing "Notes" section), then
    :meth:`write`. To re-render saved results, rebuild it with :meth:`from_meta` from the
    :meth:`meta` the JSON holds.

    Markdown layout::

        # TITLE

        Command:

        ```
        python benchmarks/NAME.py ARGS
        ```

        Machine: ... Load average (1 min) ... at the start, ... at the end. Ran N min.

        (content, in the order added)

        ## Notes

        (notes)

        (the kept hand-written end of an earlier report, :meth:`keep_from`)

    Example:
        >>> r = Report("demo", "Demo", command="python benchmarks/demo.py", machine="A test machine.")
        >>> r.table(["x", "y"], [[1, 2]]); r.note("Hand-written.")
        >>> print(r.markdown())
        # Demo
        <BLANKLINE>
        Command:
        <BLANKLINE>
        ```
        python benchmarks/demo.py
        ```
        <BLANKLINE>
        Machine: A test machine.
        <BLANKLINE>
        | x | y |
        |---|---|
        | 1 | 2 |
        <BLANKLINE>
        ## Notes
        <BLANKLINE>
        Hand-written.
        <BLANKLINE>
    """

    def __init__(self, name: str, title: str, command: str, machine: Union[Mapping[str, Any], str], *,
                 load: Optional[Sequence[float]] = None, elapsed_s: Optional[float] = None,
                 started: Optional[str] = None) -> None:
        self.name, self.title, self.command = name, title, command
        self.machine: Union[Dict[str, Any], str] = machine if isinstance(machine, str) else dict(machine)
        #: 1-minute load average at the start and (after :meth:`finish`) at the end
        self.load: List[float] = list(load or [])
        self.elapsed_s = elapsed_s
        self.started = started
        self.blocks: List[str] = []
        self.notes: List[str] = []
        #: rendered last: the hand-written end of an earlier report (:meth:`keep_from`)
        self.tail: str = ""
        self._t0: Optional[float] = None

    # --- the record -------------------------------------------------------------------
    @classmethod
    def start(cls, name: str, title: str, script: Union[str, Path], argv: Optional[Sequence[str]] = None,
              **machine_overrides: Any) -> "Report":
        """A report whose clock starts now: :func:`command_line` of ``script``/``argv``, :func:`machine`
        (with ``machine_overrides``, e.g. ``torch_threads="1 per run"``) and the load average."""
        m = {**machine(), **machine_overrides}
        r = cls(name, title, command_line(script, argv), m, load=[m["load_avg"][0]],
                started=time.strftime("%Y-%m-%d %H:%M"))
        r._t0 = time.perf_counter()
        return r

    def finish(self) -> "Report":
        """Stop the clock: record the elapsed seconds and the load average at the end."""
        if self._t0 is not None:
            self.elapsed_s = time.perf_counter() - self._t0
        self.load = self.load[:1] + [load_average()[0]]
        return self

    def meta(self) -> Dict[str, Any]:
        """The record, JSON-able: ``command``, ``machine``, ``load`` ([start, end]), ``elapsed_s``, ``started``."""
        return {"command": self.command, "machine": self.machine, "load": self.load, "elapsed_s": self.elapsed_s,
                "started": self.started}

    @classmethod
    def from_meta(cls, name: str, title: str, meta: Mapping[str, Any]) -> "Report":
        """Rebuild a report's record from :meth:`meta` (or an older result's ``command``/``machine``/``load``;
        an ``elapsed_min`` is read as minutes)."""
        elapsed = meta.get("elapsed_s")
        if elapsed is None and meta.get("elapsed_min") is not None:
            elapsed = 60 * meta["elapsed_min"]
        return cls(name, title, meta.get("command", "(not recorded)"), meta.get("machine", "not recorded"),
                   load=meta.get("load"), elapsed_s=elapsed, started=meta.get("started"))

    # --- content ----------------------------------------------------------------------
    def clear(self) -> None:
        """Drop the content (text, tables, notes), keeping the record: for a report rewritten as results come in."""
        self.blocks.clear()
        self.notes.clear()

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append("#" * level + " " + text)

    def text(self, *paragraphs: str) -> None:
        """Paragraphs (each a string of Markdown)."""
        self.blocks.extend(p.strip("\n") for p in paragraphs if p)

    def table(self, head: Sequence[Any], rows: Iterable[Sequence[Any]], escape: bool = True) -> None:
        """A :func:`markdown_table`."""
        self.blocks.append(markdown_table(head, rows, escape))

    def bullets(self, items: Iterable[str]) -> None:
        items = list(items)
        if items:
            self.blocks.append("\n".join(f"- {i}" for i in items))

    def code(self, text: str) -> None:
        self.blocks.append(f"```\n{text.rstrip()}\n```")

    def image(self, path: str, alt: str = "") -> None:
        """An image, by a path relative to the Markdown file (e.g. ``NAME.png``)."""
        self.blocks.append(f"![{alt}]({path})")

    def note(self, text: str) -> None:
        """A paragraph of the closing "Notes" section (e.g. hand-written observations)."""
        if text and text.strip():
            self.notes.append(text.strip())

    def keep_from(self, path: Union[str, Path], heading: str, default: str = "") -> bool:
        """Keep the hand-written end of an earlier report: the text of the Markdown file ``path`` from
        its first line that starts with ``heading`` to its end goes after everything else
        (``default`` where there is none). Returns whether text was kept."""
        path = Path(path)
        lines = path.read_text().splitlines(keepends=True) if path.is_file() else []
        at = next((i for i, line in enumerate(lines) if line.startswith(heading)), None)
        self.tail = ("".join(lines[at:]) if at is not None else default).strip()
        return at is not None

    def keep_handwritten(self, path: Union[str, Path]) -> bool:
        """:meth:`keep_from` the first heading of ``path`` that says :data:`HANDWRITTEN_MARK`, e.g.
        ``## Analysis (written by hand after this run)``: a rerun into the same folder keeps it."""
        path = Path(path)
        lines = path.read_text().splitlines() if path.is_file() else []
        heading = next((line for line in lines if line.startswith("#") and HANDWRITTEN_MARK in line), None)
        return heading is not None and self.keep_from(path, heading)

    # --- rendering --------------------------------------------------------------------
    def header(self) -> str:
        """Title, command and machine (with load and elapsed time when recorded)."""
        machine_line = "Machine: " + describe_machine(self.machine, self.load if len(self.load) >= 2 else None)
        if self.elapsed_s is not None:
            machine_line += f" Ran {self.elapsed_s / 60:.1f} min."
        return f"# {self.title}\n\nCommand:\n\n```\n{self.command}\n```\n\n{machine_line}"

    def markdown(self) -> str:
        """The whole report (ends with one newline)."""
        parts = [self.header(), *self.blocks]
        if self.notes:
            parts += ["## Notes", *self.notes]
        if self.tail:
            parts.append(self.tail)
        return "\n\n".join(parts) + "\n"

    def write(self, out: Union[str, Path], data: Optional[Mapping[str, Any]] = None, figure: Any = None,
              dpi: int = 120) -> Dict[str, Path]:
        """Write ``out/<name>.md`` (:meth:`markdown`), ``out/<name>.json`` (``data`` with :meth:`meta`'s keys
        added where ``data`` lacks them) and, given a matplotlib ``figure``, ``out/<name>.png`` (the
        figure is closed). Returns the paths by suffix (``"md"``, ``"json"``, ``"png"``)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        paths: Dict[str, Path] = {}
        if data is not None:
            merged: MutableMapping[str, Any] = {**self.meta(), **data}
            paths["json"] = write_json(out / f"{self.name}.json", merged)
        paths["md"] = out / f"{self.name}.md"
        paths["md"].write_text(self.markdown())
        if figure is not None:
            paths["png"] = out / f"{self.name}.png"
            figure.savefig(paths["png"], dpi=dpi)
            pyplot().close(figure)
        return paths


# --- servers ------------------------------------------------------------------------------
def session_pids(sid: int) -> List[int]:
    """Pids of the live (not zombie) processes of session ``sid``, from ``/proc`` (Linux; empty elsewhere).

    A process started with ``start_new_session=True`` leads a session whose id is its pid, and
    everything it starts stays in that session unless it calls ``setsid`` itself, even in
    process groups of its own (Ray's workers do that): the way to find all of a server.
    """
    out = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    for name in names:
        if not name.isdigit():
            continue
        try:
            fields = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 3 and fields[0] != "Z" and int(fields[3]) == sid:
            out.append(int(name))
    return sorted(out)


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """``coopnets serve MODEL ARGS`` on a free port of 127.0.0.1, in its own session (so every process
    it starts, Ray's included, is stopped with it); ready once ``/healthz`` answers 200.

    Args:
        model: the ``coopnets serve`` MODEL argument.
        args: more arguments (``--depth 1``, ``--engine ray``...).
        log: where its output goes.
        env: extra environment variables.
        timeout_s: how long to wait for ``/healthz``.
    """

    def __init__(self, model: str, args: Sequence[str], log: Path, env: Optional[Mapping[str, str]] = None,
                 timeout_s: float = 300.0) -> None:
        import urllib.error
        import urllib.request

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = ["coopnets", "serve", model, "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.log_path = Path(log)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        full_env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1", **(env or {})}
        full_env.pop("RAY_ADDRESS", None)
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "coopnets.cli", *self.command[1:]], stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                         env=full_env)
        started = time.perf_counter()
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"`{' '.join(self.command)}` exited ({self.proc.returncode}) before it served:\n"
                                       f"{self.tail()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"`{' '.join(self.command)}` did not answer /healthz within {timeout_s:.0f} s "
                                       f"(last: {last}):\n{self.tail()}")
                try:
                    with urllib.request.urlopen(self.url + "/healthz", timeout=10) as r:
                        if r.status == 200:
                            break
                except urllib.error.HTTPError as e:
                    last = f"HTTP {e.code}"
                except OSError as e:
                    last = str(e)
                time.sleep(0.5)
        except BaseException:
            self.close()
            raise
        self.startup_s = time.perf_counter() - started

    def tail(self, n: int = 25) -> str:
        """The last ``n`` lines of its output."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stats(self) -> Dict[str, Any]:
        """Its ``GET /stats``."""
        import urllib.request

        with urllib.request.urlopen(self.url + "/stats", timeout=30) as r:
            return json.loads(r.read())

    def session_pids(self) -> List[int]:
        """Live processes of its session: the server and everything it started, Ray's actors (each in a
        process group of its own) and HAProxy included; zombies left out."""
        return session_pids(self.proc.pid)

    def close(self) -> None:
        """SIGTERM to the server (it stops what it started); after 60 s, SIGKILL to every process of its session."""
        import signal

        for sig, wait_s in ((signal.SIGTERM, 60.0), (signal.SIGKILL, 10.0)):
            for pid in [self.proc.pid] if sig == signal.SIGTERM else self.session_pids():
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and self.session_pids():
                self.proc.poll()  # reap the server itself
                time.sleep(0.2)
            if not self.session_pids():
                break
        self.proc.poll()

    def __enter__(self) -> "ServeProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
