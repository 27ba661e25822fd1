"""Training throughput of every recipe against a plain timm training step (issue 12, item 6).

For each option set (``base`` fp32, ``channels_last``, ``bf16`` autocast, ``compile``
with inductor, optionally ``all`` three at once) and each recipe, one training step
(forward + backward + optimizer step) is timed on a fixed random batch:

* recipe step: ``Trainer(TrainConfig(...)).train_step(x, y)``, the trainer's own step
  (autocast, channels-last nets, ``torch.compile`` of the recipe module whose forward
  returns the loss, timm's optimizer from ``create_optimizer_v2``). The trainer is built
  on a tiny slice of the embedded digits data in a temporary folder; ``fit()`` is never
  called, so nothing is written;
* plain step: the same trainer's step (``Trainer.train_step``) on a plain
  ``timm.create_model(backbone, num_classes=10)`` with cross-entropy
  (:class:`PlainRecipe`, a recipe registered only while this benchmark builds its
  trainers), so every option is applied to it exactly as to the recipes: autocast dtype,
  channels-last, ``torch.compile`` of the module whose forward returns the loss, timm's
  optimizer with the run's opt / lr / weight decay / momentum, clipping; the same batch.

Every variant of an option set is built first, warmed up (``--warmup`` steps each; with
``compile`` this compiles, and the warm-up time beyond the steady step time is reported
as compile time), then timed round-robin with the plain step between every two recipe
steps (:func:`harness.time_interleaved` with the plain step as reference): ``--steps``
rounds of ``plain, r1, plain, r2, ..., rN, plain`` (recipe order alternating between rounds). The ratio of a recipe is the median over its steps of its
step time / the mean of the two plain steps right beside it (with its distribution-free
interval), so a change of load from other processes (frequent on shared cores) hits both
sides of every ratio. Images/s come
from each variant's median step time; the ratio of the medians is kept beside the ratio
as a check. Writes ``train_throughput.md``, ``train_throughput.png`` and
``train_throughput.json`` to ``--out``.

Example (the committed table names its own command)::

    python benchmarks/train_throughput.py
    python benchmarks/train_throughput.py --options base bf16 --recipes multi_exit cooperative_fixed --steps 5
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import timm
import torch
import torch.nn.functional as F
from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

import harness
from coopnets.train import TrainConfig
from coopnets.train.recipe import RECIPES, Recipe, RecipeOutput, register_recipe
from coopnets.train.trainer import Trainer

NAME = "train_throughput"
TITLE = "Training throughput: recipes vs a plain timm step"
PLAIN = "plain"
#: what a compiled variant's first step (inductor compiles forward and backward) counts as in the progress
#: bar, in steps, so its ETA stays honest: about 70 s of compilation / 0.55 s per step for resnet18 here
COMPILE_STEPS = 120
#: option set -> TrainConfig fields (the plain step is trained by a trainer with the same fields)
OPTION_SETS: Dict[str, Dict[str, Any]] = {
    "base": {"amp": False},
    "channels_last": {"amp": False, "channels_last": True},
    "bf16": {"amp": True, "amp_dtype": "bfloat16"},
    "compile": {"amp": False, "torchcompile": "inductor"},
    "all": {"amp": True, "amp_dtype": "bfloat16", "channels_last": True, "torchcompile": "inductor"},
}
DEFAULT_OPTIONS = ("base", "channels_last", "bf16", "compile")
#: label -> (method, recipe options); ``independent``'s depth is filled in from --independent-depth
RECIPE_VARIANTS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "multi_exit": ("multi_exit", {}),
    "byot": ("byot", {}),
    "ekd": ("ekd", {}),
    "mlcsd": ("mlcsd", {}),
    "cooperative": ("cooperative", {}),
    "cooperative_fixed": ("cooperative", {"fixed_leader": True}),
    "independent": ("independent", {}),
}
#: recipe label -> the most its step may cost, in plain steps (issue 12)
TARGETS = {"multi_exit": 1.15, "cooperative_fixed": 2.5}
DESCRIPTIONS = {
    PLAIN: "timm model + cross-entropy",
    "cooperative": "trained Leader",
    "cooperative_fixed": "`fixed_leader=True`",
}


class PlainRecipe(Recipe):
    """The baseline as a recipe: the plain timm model of the run's backbone and its cross-entropy.

    ``timm.create_model(backbone, num_classes=...)`` with the backbone name and keyword
    arguments of the net the run's model factory builds; ``forward`` returns the loss, so
    the trainer's own step (autocast, channels-last, compile, optimizer, clipping) trains it.
    """

    name = PLAIN

    def __init__(self, model_fn: Callable[[], Any], config: Any = None) -> None:
        super().__init__(model_fn, config)
        net = model_fn()
        self.backbone_name, self.num_depths = net.backbone_name, net.num_depths
        self.model = timm.create_model(net.backbone_name, num_classes=net.num_classes, **net.backbone_kwargs)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> RecipeOutput:
        logits = self.model(x)
        return RecipeOutput(F.cross_entropy(logits, y), [logits])

    def eval_models(self) -> Dict[str, Any]:
        return {}  # never validated: the benchmark only steps it


@contextmanager
def plain_recipe_registered() -> Iterator[None]:
    """:class:`PlainRecipe` in the recipe registry while trainers are built, and only then."""
    previous = RECIPES.get(PLAIN)
    register_recipe(PlainRecipe)
    try:
        yield
    finally:
        if previous is None:
            RECIPES.pop(PLAIN, None)
        else:
            RECIPES[PLAIN] = previous


def train_config(args: argparse.Namespace, option_set: str, method: str, recipe_opts: Mapping[str, Any],
                 out: str) -> TrainConfig:
    return TrainConfig(out=out, model=args.model, method=method, img_size=args.img_size, batch_size=args.batch_size,
                       recipe_opts=dict(recipe_opts), limit_train=args.batch_size, limit_eval=args.batch_size,
                       progress=False, device=args.device, profile_repeats=1, **OPTION_SETS[option_set])


def params(module: torch.nn.Module) -> Dict[str, int]:
    return {"params": sum(p.numel() for p in module.parameters()),
            "trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad)}


def build_trainers(args: argparse.Namespace, option_set: str, tmp: str) -> Tuple[Dict[str, Trainer], Dict[str, Any]]:
    """A trainer for the plain step and for every recipe of ``option_set`` (plain first); and facts about the nets.

    ``fit()`` is never called: nothing is written to their (temporary) run folders."""
    trainers: Dict[str, Trainer] = {}
    info: Dict[str, Any] = {}
    with plain_recipe_registered():
        for label in [PLAIN, *args.recipes]:
            method, opts = RECIPE_VARIANTS.get(label, (PLAIN, {}))
            if label == "independent":
                opts = {**opts, "depth": args.independent_depth}
            cfg = train_config(args, option_set, method, opts, os.path.join(tmp, f"{option_set}-{label}"))
            trainer = trainers[label] = Trainer(cfg, echo=False)
            recipe = trainer.recipe
            if label == PLAIN:
                info[PLAIN] = {"backbone": recipe.backbone_name, "num_depths": recipe.num_depths,
                               "num_classes": trainer.num_classes, **params(recipe)}
            else:
                net = next(iter(recipe.eval_models().values()))
                info[label] = {"method": method, "recipe_opts": opts, "num_depths": net.num_depths,
                               "trained_depth": getattr(recipe, "trained_depth", None), **params(recipe)}
    return trainers, info


def measure(trainers: Mapping[str, Trainer], x: torch.Tensor, y: torch.Tensor, warmup: int, rounds: int,
            bar: Any = None, compiled: bool = False) -> harness.Timings:
    """Every trainer's ``train_step(x, y)`` timed round-robin, the plain step between every two recipe steps.

    ``bar`` advances by one per step, and by :data:`COMPILE_STEPS` for a compiled variant's first step."""
    sync = torch.cuda.synchronize if x.device.type == "cuda" else None
    steps = {name: (lambda t=t: t.train_step(x, y)) for name, t in trainers.items()}
    return harness.time_interleaved(steps, rounds, warmup, reference=PLAIN, sync=sync, bar=bar,
                                    first_warmup_units=COMPILE_STEPS if compiled else 1)


def summarise(t: harness.Timings, batch: int) -> Dict[str, Dict[str, Any]]:
    """Per variant: its seconds, median step time, images/s, ratios to plain, warm-up time beyond steady steps.

    ``ratio``: median over the recipe's steps of step time / mean of the plain steps right before and
    after it (``ratio_lo``/``ratio_hi``: its distribution-free 95 % interval). ``ratio_of_medians``: the
    recipe's median step time / the plain step's median (all its steps).
    """
    plain = t.median(PLAIN)
    rows = {}
    for name in t.names:
        med = t.median(name)
        ratio = t.ratio(name)
        neighbours = {} if name == PLAIN else {"plain_before_s": t.before[name], "plain_after_s": t.after[name]}
        rows[name] = {
            "warmup_s": t.warmup[name], "times_s": t.times[name], **neighbours, "median_s": med,
            "images_per_s": batch / med, "ratio": ratio["median"], "ratio_of_medians": med / plain,
            # the plain step against itself is 1 by construction: no interval
            **({} if name == PLAIN else {"ratio_lo": ratio["lo"], "ratio_hi": ratio["hi"], "ratio_level": ratio["level"]}),
            # warm-up time beyond steady steps: compilation (and first-step allocations) for compiled sets
            "first_steps_extra_s": max(0.0, sum(t.warmup[name]) - len(t.warmup[name]) * med),
        }
    return rows


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """The whole measurement; returns the JSON-able results (without the run's record: see :func:`main`)."""
    # every recipe instance and option set shares the nets' code objects: without a higher limit Dynamo
    # would silently fall back to eager after 8 recompilations of one of them
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    results: Dict[str, Any] = {
        "model": args.model, "img_size": args.img_size,
        "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup, "options": args.options,
        "option_sets": {o: OPTION_SETS[o] for o in args.options}, "recipes": args.recipes,
        "independent_depth": args.independent_depth, "targets": TARGETS, "sets": {}, "nets": {},
        "threads": torch.get_num_threads(), "inductor_cache": args.inductor_cache,
        "plain_step": "trainer",  # Trainer.train_step of PlainRecipe (older results: a hand-written copy of it)
    }
    device = torch.device(args.device or "cpu")
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=gen)
    y0 = torch.randint(0, 10, (args.batch_size,), generator=gen)  # digits: 10 classes

    def units(option_set: str) -> int:
        compiled = bool(OPTION_SETS[option_set].get("torchcompile")) and args.warmup > 0
        variants = len(args.recipes) + 1
        return variants * (args.warmup + (COMPILE_STEPS - 1) * compiled) + args.steps * (2 * variants - 1)

    with tempfile.TemporaryDirectory() as tmp, \
            harness.progress_bar(total=sum(map(units, args.options)), unit="step", disable=args.quiet) as bar, \
            (temporary_cache_dir(os.path.join(tmp, "inductor")) if args.inductor_cache == "fresh" else nullcontext()):
        # fresh: an empty inductor cache, so compile times are cold ones, comparable between runs
        for option_set in args.options:
            bar.set_description(option_set)
            torch._dynamo.reset()
            build_start = time.perf_counter()
            trainers, info = build_trainers(args, option_set, tmp)
            build_s = time.perf_counter() - build_start
            y, x = y0.to(device), x0.to(device)
            if OPTION_SETS[option_set].get("channels_last"):
                x = x.contiguous(memory_format=torch.channels_last)  # as the trainer would: not inside the timing
            set_start = time.perf_counter()
            timings = measure(trainers, x, y, args.warmup, args.steps, bar,
                              bool(OPTION_SETS[option_set].get("torchcompile")))
            rows = summarise(timings, args.batch_size)
            results["sets"][option_set] = {"rows": rows, "build_s": build_s,
                                           "measure_s": time.perf_counter() - set_start}
            results["nets"] = info
            bar.write(f"{option_set:14s} " + "  ".join(
                f"{n} {r['images_per_s']:.0f}/s {r['ratio']:.2f}x" for n, r in rows.items()))
            del trainers
            gc.collect()
    return results


# --- report ---------------------------------------------------------------------------
def verdict(value: float, target: float) -> str:
    return "reached" if value <= target else "**not reached**"


def label_of(name: str, results: Mapping[str, Any]) -> str:
    text = f"`{name}`"
    if name == "independent":
        net = results["nets"][name]
        return text + (f" (depth {net['trained_depth']} of {net['num_depths']}: one of the baseline's "
                       f"{net['num_depths']} runs)")
    return text + (f" ({DESCRIPTIONS[name]})" if name in DESCRIPTIONS else "")


def target_lines(results: Mapping[str, Any]) -> List[str]:
    lines = []
    for name, target in TARGETS.items():
        if name not in results["recipes"]:
            continue
        parts = [f"{o} {s['rows'][name]['ratio']:.2f}x ({verdict(s['rows'][name]['ratio'], target)})"
                 for o, s in results["sets"].items()]
        lines.append(f"`{name}` <= {target}x plain: " + "; ".join(parts))
    if "cooperative" in results["recipes"]:
        parts = [f"{o} {s['rows']['cooperative']['ratio']:.2f}x" for o, s in results["sets"].items()]
        lines.append("`cooperative` with a trained Leader (no target, reported beside them): " + "; ".join(parts))
    return lines


def decomposition(results: Mapping[str, Any]) -> List[str]:
    """How the cooperative ratios split into parts, from the measured ratios (in plain steps).

    A cooperative step is two Teammate steps (each a ``multi_exit``-like step: backbone + exit heads + their
    losses) plus the Leader: with a trained Leader a full plain step, with a fixed one a forward only
    (no backward, no optimizer step). So ``cooperative - 2 * multi_exit`` is what the Leader (and the KD
    terms between the nets) costs.
    """
    if "multi_exit" not in results["recipes"] or not {"cooperative", "cooperative_fixed"} & set(results["recipes"]):
        return []
    lines = []
    for o, st in results["sets"].items():
        rows = st["rows"]
        two = 2 * rows["multi_exit"]["ratio"]
        parts = [f"2 x multi_exit = {two:.2f}"]
        if "cooperative" in rows:
            parts.append(f"trained Leader + KD = cooperative - that = {rows['cooperative']['ratio'] - two:.2f}")
        if "cooperative_fixed" in rows:
            parts.append(f"fixed Leader's forward + KD = cooperative_fixed - that = "
                         f"{rows['cooperative_fixed']['ratio'] - two:.2f}")
        lines.append(f"`{o}`: " + "; ".join(parts) + " (plain steps)")
    return lines


def ratio_cell(row: Mapping[str, Any]) -> str:
    """``1.07x [1.03, 1.10]``: the ratio, with its interval where recorded (older results: the ratio only)."""
    return harness.format_interval({"median": row["ratio"], "lo": row.get("ratio_lo"), "hi": row.get("ratio_hi")},
                                   unit="x")


def report_of(results: Mapping[str, Any], notes: str = "") -> harness.Report:
    """The whole report, from the results (fresh, or a saved ``train_throughput.json``), plus ``notes``."""
    rep = harness.Report.from_meta(NAME, TITLE, results)
    sets = list(results["sets"])
    names = [PLAIN] + list(results["recipes"])
    plain = results["nets"][PLAIN]
    cells = lambda fn: [[label_of(n, results)] + fn(n) for n in names]  # noqa: E731
    rep.text(
        "The machine's cores are shared with other jobs; `--threads` (default 1: 2 threads on these shared cores "
        "were up to 250x slower per step while other jobs ran, OpenMP workers waiting for each other).",
        f"Backbone `{plain['backbone']}` (`--model {results['model']}`, {plain['num_depths']} depths), "
        f"{results['img_size']}x{results['img_size']} px, batch {results['batch_size']}, 10 classes, random "
        f"batch; {results['warmup']} warm-up steps per variant, then {results['steps']} timed rounds "
        "`plain, recipe 1, plain, recipe 2, ..., plain` (recipe order alternating)."
        + (" Every step is the trainer's own `Trainer.train_step`; the plain step's trainer trains the plain timm "
           "model with cross-entropy." if results.get("plain_step") == "trainer" else ""),
        "Option sets: " + "; ".join(f"`{o}` = " + (", ".join(f"{k}={v}" for k, v in results['option_sets'][o].items()))
                                    for o in sets) + " (TrainConfig fields; the plain step uses the same).")
    rep.heading("Step time relative to the plain timm step")
    rep.text("Median over the recipe's timed steps of its step time / the mean of the two plain steps timed right "
             "before and after it, same option set (lower is better); in brackets, where recorded, the "
             "distribution-free 95 % interval of that median (with few steps: the range of the ratios).")
    rep.table(["recipe", "target"] + sets, cells(lambda n: [f"<= {TARGETS[n]}x" if n in TARGETS else ""] + [
        ratio_cell(results["sets"][o]["rows"][n]) for o in sets]))
    rep.heading("Images/s (median step time)")
    rep.table(["recipe", "params (trainable)"] + sets, cells(lambda n: [
        f"{results['nets'][n]['params'] / 1e6:.1f}M ({results['nets'][n]['trainable_params'] / 1e6:.1f}M)"] + [
        f"{results['sets'][o]['rows'][n]['images_per_s']:.1f} ({1e3 * results['sets'][o]['rows'][n]['median_s']:.0f} ms)"
        for o in sets]))
    rep.heading("Targets")
    rep.bullets(target_lines(results))
    compile_sets = [o for o in sets if results["option_sets"][o].get("torchcompile")]
    if compile_sets:
        rep.heading("Compile time")
        rep.text("Seconds of the warm-up steps beyond steady step time (inductor compiles forward and backward on the "
                 "first step; recipes with graph breaks compile several graphs). Excluded from the tables above.")
        rep.table(["recipe"] + compile_sets, [[f"`{n}`"] + [
            f"{results['sets'][o]['rows'][n]['first_steps_extra_s']:.0f}" for o in compile_sets] for n in names])
    rep.heading("Check: ratio of medians")
    rep.text("The recipe's median step time / the plain step's median over all its steps in the option set. Close "
             "to the first table while the machine's load is steady; where it differs, the load changed during "
             "the set and the first table (neighbouring steps) is the one to trust.")
    rep.table(["recipe"] + sets, [[f"`{n}`"] + [f"{results['sets'][o]['rows'][n]['ratio_of_medians']:.2f}x"
                                              for o in sets] for n in names[1:]])
    parts = decomposition(results)
    if parts:
        rep.heading("How the cooperative ratios split")
        rep.text("A cooperative step trains two Teammates (each costs about a `multi_exit` step: backbone, exit "
                 "heads, their losses) and runs the Leader: a full training step when the Leader is trained, a "
                 "forward without gradients when it is fixed. From the measured ratios:")
        rep.bullets(parts)
    rep.image(f"{NAME}.png", "ratio to plain step")
    rep.note(notes)
    return rep


def plot(results: Mapping[str, Any]) -> Any:
    plt = harness.pyplot()
    sets = list(results["sets"])
    names = list(results["recipes"])
    width = 0.8 / max(len(sets), 1)
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 3, 4.2))
    for i, o in enumerate(sets):
        xs = [j + (i - (len(sets) - 1) / 2) * width for j in range(len(names))]
        ratios = [results["sets"][o]["rows"][n]["ratio"] for n in names]
        bars = ax.bar(xs, ratios, width, label=o)
        ax.bar_label(bars, labels=[f"{r:.2f}" for r in ratios], fontsize=6, rotation=90, padding=2)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylim(0, 1.15 * max(max(s["rows"][n]["ratio"] for n in names) for s in results["sets"].values()) + 0.1)
    shown = {name: target for name, target in TARGETS.items() if name in names}
    for k, (name, target) in enumerate(shown.items()):
        j = names.index(name)
        ax.hlines(target, j - 0.45, j + 0.45, colors="r", linestyles="--", zorder=0.5, label=None if k else
                  "targets: " + ", ".join(f"{n} <= {t}x" for n, t in shown.items()))
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([n.replace("cooperative_fixed", "cooperative\n(fixed Leader)") for n in names], fontsize=8)
    ax.set_ylabel("step time / plain timm step")
    ax.set_title(f"{results['nets'][PLAIN]['backbone']}, {results['img_size']}px, batch {results['batch_size']}",
                 fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18",
                   help="backbone for the trainer (zoo or timm name); the plain step uses its timm backbone")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=6,
                   help="timed rounds (each: one step of every recipe, the plain step between every two)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (compile: compilation)")
    p.add_argument("--options", nargs="+", default=list(DEFAULT_OPTIONS), choices=list(OPTION_SETS))
    p.add_argument("--recipes", nargs="+", default=list(RECIPE_VARIANTS), choices=list(RECIPE_VARIANTS))
    p.add_argument("--independent-depth", type=int, default=-1,
                   help="the depth the `independent` run trains (-1: full)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads; 0: torch's choice. Default 1: on the 2 shared cores this was "
                        "written on, 2 threads made a step up to 250x slower while other jobs ran (OpenMP waits)")
    p.add_argument("--device", default=None, help="device (default: cpu)")
    p.add_argument("--inductor-cache", choices=("fresh", "shared"), default="fresh",
                   help="fresh: an empty inductor cache folder for this run (cold compile times); shared: the user's")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--notes", type=Path, default=None, help="Markdown file whose text goes into the report's Notes")
    p.add_argument("--from-json", type=Path, default=None, help="only re-render the report from a saved JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    notes = args.notes.read_text() if args.notes else ""
    if args.from_json:
        results = json.loads(args.from_json.read_text())
        report_of(results, notes).write(args.out, data=results, figure=plot(results))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    record = harness.Report.start(NAME, TITLE, __file__, argv)  # after --threads: the machine shows the threads used
    results = run(args)
    results.update(record.finish().meta())
    paths = report_of(results, notes).write(args.out, data=results, figure=plot(results))
    print(paths["md"].read_text())
    return 0


if __name__ == "__main__":  # one error policy for every entry point: one line and exit code 2 for a bad input
    from coopnets.cli.errors import run_entry

    sys.exit(run_entry(main, prog="benchmarks/train_throughput.py"))
