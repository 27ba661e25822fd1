"""Training throughput of every recipe against a plain timm training step (issue 12, item 6).

For each option set (``base`` fp32, ``channels_last``, ``bf16`` autocast, ``compile``
with inductor, optionally ``all`` three at once) and each recipe, one training step
(forward + backward + optimizer step) is timed on a fixed random batch:

* recipe step: ``Trainer(TrainConfig(...)).train_step(x, y)``, the trainer's own step
  (autocast, channels-last nets, ``torch.compile`` of the recipe module whose forward
  returns the loss, timm's optimizer from ``create_optimizer_v2``). The trainer is built
  on a tiny slice of the embedded digits data in a temporary folder; ``fit()`` is never
  called, so nothing is written;
* plain step: ``timm.create_model(backbone, num_classes=10)`` and cross-entropy, the same
  options applied the same way (a small ``nn.Module`` computing the loss is what gets
  compiled, as the trainer compiles the recipe; channels-last model and input; the
  trainer's autocast dtype), the same timm optimizer (``create_optimizer_v2`` with the
  run's opt / lr / weight decay / momentum), the same batch.

Every variant of an option set is built first, warmed up (``--warmup`` steps each; with
``compile`` this compiles, and the warm-up time beyond the steady step time is reported
as compile time), then timed round-robin with the plain step between every two recipe
steps: ``--steps`` rounds of ``plain, r1, plain, r2, ..., rN, plain`` (recipe order
alternating between rounds). The ratio of a recipe is the median over its steps of its
step time / the mean of the two plain steps right beside it, so a change of load from
other processes (frequent on shared cores) hits both sides of every ratio. Images/s come
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
import shlex
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.utils import dispatch_clip_grad
from torch import nn
from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import machine, paired_ratio  # noqa: E402

from coopnets.train import TrainConfig  # noqa: E402
from coopnets.train.trainer import Trainer  # noqa: E402

PLAIN = "plain"
#: what a compiled variant's first step (inductor compiles forward and backward) counts as in the progress
#: bar, in steps, so its ETA stays honest: about 70 s of compilation / 0.55 s per step for resnet18 here
COMPILE_STEPS = 120
#: option set -> TrainConfig fields (the plain step reads the same settings from the built trainer)
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


class PlainLoss(nn.Module):
    """The plain timm model and its cross-entropy: the module whose forward returns the loss (what gets compiled)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.model(x), y)


class PlainStep:
    """A plain timm training step with the settings of ``trainer`` (same options, applied the same way).

    ``timm.create_model(backbone, num_classes=...)`` with the trainer net's backbone name and
    keyword arguments; channels-last module when the run uses it; timm's optimizer from
    ``create_optimizer_v2`` with the run's opt / lr / weight decay / momentum; the trainer's
    autocast dtype when it autocasts; ``torch.compile`` of :class:`PlainLoss` with the run's backend;
    clip-grad as the trainer does it.
    """

    def __init__(self, trainer: Trainer, backbone: str, backbone_kwargs: Mapping[str, Any]) -> None:
        cfg = self.cfg = trainer.cfg
        self.device = trainer.dist.device
        torch.manual_seed(cfg.seed)
        self.model = timm.create_model(backbone, num_classes=trainer.num_classes, **backbone_kwargs).to(self.device)
        self.module = PlainLoss(self.model).train()
        if cfg.channels_last:
            self.module.to(memory_format=torch.channels_last)
        self.optimizer = create_optimizer_v2(self.model, cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                             momentum=cfg.momentum)
        self.use_amp, self.amp_dtype = trainer.use_amp, trainer.amp_dtype
        self.step_fn = torch.compile(self.module, backend=cfg.torchcompile) if cfg.torchcompile else self.module

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        autocast = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.use_amp else nullcontext()
        with autocast:
            loss = self.step_fn(x, y)
        loss.backward()
        if self.cfg.clip_grad is not None:
            dispatch_clip_grad(list(self.model.parameters()), self.cfg.clip_grad, mode=self.cfg.clip_mode)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss


def train_config(args: argparse.Namespace, option_set: str, method: str, recipe_opts: Mapping[str, Any],
                 out: str) -> TrainConfig:
    return TrainConfig(out=out, model=args.model, method=method, img_size=args.img_size, batch_size=args.batch_size,
                       recipe_opts=dict(recipe_opts), limit_train=args.batch_size, limit_eval=args.batch_size,
                       progress=False, device=args.device, profile_repeats=1, **OPTION_SETS[option_set])


def build_variants(args: argparse.Namespace, option_set: str, tmp: str) -> Tuple[Dict[str, Callable], Dict[str, Any]]:
    """Plain step and every recipe's trainer step for ``option_set`` (plain first); and facts about the nets."""
    steps: Dict[str, Callable] = {}
    info: Dict[str, Any] = {}
    plain: Optional[PlainStep] = None
    for label in args.recipes:
        method, opts = RECIPE_VARIANTS[label]
        if label == "independent":
            opts = {**opts, "depth": args.independent_depth}
        trainer = Trainer(train_config(args, option_set, method, opts, os.path.join(tmp, f"{option_set}-{label}")),
                          echo=False)
        trainer.data = trainer.train_loader = trainer.val_loader = None  # the benchmark feeds its own batch
        nets = list(trainer.recipe.eval_models().values())
        info[label] = {"method": method, "recipe_opts": opts, "num_depths": nets[0].num_depths,
                       "trained_depth": getattr(trainer.recipe, "trained_depth", None),
                       "params": sum(p.numel() for p in trainer.recipe.parameters()),
                       "trainable_params": sum(p.numel() for p in trainer.recipe.parameters() if p.requires_grad)}
        if plain is None:
            plain = PlainStep(trainer, nets[0].backbone_name, nets[0].backbone_kwargs)
            info[PLAIN] = {"backbone": nets[0].backbone_name, "num_depths": nets[0].num_depths,
                           "num_classes": trainer.num_classes,
                           "params": sum(p.numel() for p in plain.model.parameters())}
            info[PLAIN]["trainable_params"] = info[PLAIN]["params"]
            steps[PLAIN] = plain.train_step
        steps[label] = trainer.train_step
    return steps, info


def timed(fn: Callable, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> float:
    """Seconds of one call ``fn(x, y)`` (synchronised on accelerators)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    fn(x, y)
    sync()
    return time.perf_counter() - start


def measure(steps: Dict[str, Callable], x: torch.Tensor, y: torch.Tensor, warmup: int, rounds: int,
            bar: Optional[tqdm] = None, compiled: bool = False) -> Dict[str, Dict[str, List[float]]]:
    """Warm-up seconds and timed seconds of every variant, the plain step between every two recipe steps.

    Each of ``rounds`` rounds times ``plain, r1, plain, r2, ..., rN, plain`` (recipe order alternating
    between rounds); every recipe step records the plain steps right before and after it
    (``plain_before_s`` / ``plain_after_s``), so a change of machine load hits both sides of its ratio.
    ``bar`` advances by one per step, and by :data:`COMPILE_STEPS` for a compiled variant's first step.
    """
    names = list(steps)
    recipes = [n for n in names if n != PLAIN]
    out: Dict[str, Dict[str, List[float]]] = {n: {"warmup_s": [], "times_s": []} for n in names}
    for name in recipes:
        out[name].update(plain_before_s=[], plain_after_s=[])
    for name in names:
        for i in range(warmup):
            if bar is not None:
                bar.set_postfix_str(f"{'compile' if compiled and i == 0 else 'warm-up'} {name}")
            out[name]["warmup_s"].append(timed(steps[name], x, y, x.device))
            if bar is not None:
                bar.update(COMPILE_STEPS if compiled and i == 0 else 1)

    def step(name: str) -> float:
        t = timed(steps[name], x, y, x.device)
        out[name]["times_s"].append(t)
        if bar is not None:
            bar.update(1)
        return t

    for r in range(rounds):
        if bar is not None:
            bar.set_postfix_str(f"round {r + 1}/{rounds}")
        before = step(PLAIN)
        for name in recipes if r % 2 == 0 else reversed(recipes):
            step(name)
            after = step(PLAIN)
            out[name]["plain_before_s"].append(before)
            out[name]["plain_after_s"].append(after)
            before = after
    return out


def summarise(raw: Dict[str, Dict[str, List[float]]], batch: int) -> Dict[str, Dict[str, Any]]:
    """Per variant: median step time, images/s, ratios to plain, warm-up time beyond steady steps (compilation).

    ``ratio``: median over the recipe's steps of step time / mean of the plain steps right before and
    after it. ``ratio_of_medians``: the recipe's median step time / the plain step's median (all its steps).
    """
    plain = statistics.median(raw[PLAIN]["times_s"])
    rows = {}
    for name, r in raw.items():
        med = statistics.median(r["times_s"])
        before, after = r.get("plain_before_s", r["times_s"]), r.get("plain_after_s", r["times_s"])  # plain: itself
        neighbours = [(b + a) / 2 for b, a in zip(before, after)]
        rows[name] = {
            **r, "median_s": med, "images_per_s": batch / med,
            "ratio": paired_ratio(r["times_s"], neighbours), "ratio_of_medians": med / plain,
            # warm-up time beyond steady steps: compilation (and first-step allocations) for compiled sets
            "first_steps_extra_s": max(0.0, sum(r["warmup_s"]) - len(r["warmup_s"]) * med),
        }
    return rows


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """The whole measurement; returns the JSON-able results."""
    if args.threads:
        torch.set_num_threads(args.threads)
    # every recipe instance and option set shares the nets' code objects: without a higher limit Dynamo
    # would silently fall back to eager after 8 recompilations of one of them
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    start, load_at_start = time.time(), os.getloadavg()[0]
    results: Dict[str, Any] = {
        "command": args.command, "machine": machine(), "model": args.model, "img_size": args.img_size,
        "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup, "options": args.options,
        "option_sets": {o: OPTION_SETS[o] for o in args.options}, "recipes": args.recipes,
        "independent_depth": args.independent_depth, "targets": TARGETS, "sets": {}, "nets": {},
        "threads": torch.get_num_threads(), "inductor_cache": args.inductor_cache,
    }
    device = torch.device(args.device or "cpu")
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=gen)
    y0 = torch.randint(0, 10, (args.batch_size,), generator=gen)  # digits: 10 classes

    def units(option_set: str) -> int:
        compiled = bool(OPTION_SETS[option_set].get("torchcompile")) and args.warmup > 0
        variants = len(args.recipes) + 1
        return variants * (args.warmup + (COMPILE_STEPS - 1) * compiled) + args.steps * (2 * variants - 1)

    with tempfile.TemporaryDirectory() as tmp, tqdm(total=sum(map(units, args.options)), unit="step",
                                                      disable=args.quiet, dynamic_ncols=True) as bar, \
            (temporary_cache_dir(os.path.join(tmp, "inductor")) if args.inductor_cache == "fresh" else nullcontext()):
        # fresh: an empty inductor cache, so compile times are cold ones, comparable between runs
        for option_set in args.options:
            bar.set_description(option_set)
            torch._dynamo.reset()
            build_start = time.perf_counter()
            steps, info = build_variants(args, option_set, tmp)
            build_s = time.perf_counter() - build_start
            y, x = y0.to(device), x0.to(device)
            if OPTION_SETS[option_set].get("channels_last"):
                x = x.contiguous(memory_format=torch.channels_last)
            set_start = time.perf_counter()
            raw = measure(steps, x, y, args.warmup, args.steps, bar, bool(OPTION_SETS[option_set].get("torchcompile")))
            rows = summarise(raw, args.batch_size)
            results["sets"][option_set] = {"rows": rows, "build_s": build_s,
                                           "measure_s": time.perf_counter() - set_start}
            results["nets"] = info
            bar.write(f"{option_set:14s} " + "  ".join(
                f"{n} {r['images_per_s']:.0f}/s {r['ratio']:.2f}x" for n, r in rows.items()))
            del steps
            gc.collect()
    results["elapsed_min"] = (time.time() - start) / 60
    results["load"] = [load_at_start, os.getloadavg()[0]]
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
        lines.append(f"- `{name}` <= {target}x plain: " + "; ".join(parts))
    if "cooperative" in results["recipes"]:
        parts = [f"{o} {s['rows']['cooperative']['ratio']:.2f}x" for o, s in results["sets"].items()]
        lines.append("- `cooperative` with a trained Leader (no target, reported beside them): " + "; ".join(parts))
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
        lines.append(f"- `{o}`: " + "; ".join(parts) + " (plain steps)")
    return lines


def markdown(results: Mapping[str, Any], notes: str = "") -> str:
    m = results["machine"]
    sets = list(results["sets"])
    names = [PLAIN] + list(results["recipes"])
    plain = results["nets"][PLAIN]
    head = "| recipe | target | " + " | ".join(sets) + " |"
    rule = "|---|---|" + "---|" * len(sets)
    ratio_rows, ips_rows = [head, rule], [head.replace("| target ", "| params (trainable) "), rule]
    for n in names:
        target = f"<= {TARGETS[n]}x" if n in TARGETS else ""
        ratio_rows.append(f"| {label_of(n, results)} | {target} | " + " | ".join(
            f"{results['sets'][o]['rows'][n]['ratio']:.2f}x" for o in sets) + " |")
        net = results["nets"][n]
        cells = [f"{results['sets'][o]['rows'][n]['images_per_s']:.1f} "
                 f"({1e3 * results['sets'][o]['rows'][n]['median_s']:.0f} ms)" for o in sets]
        ips_rows.append(f"| {label_of(n, results)} | {net['params'] / 1e6:.1f}M "
                        f"({net['trainable_params'] / 1e6:.1f}M) | " + " | ".join(cells) + " |")
    check_rows = [head.replace("| target |", "|"), "|---|" + "---|" * len(sets)]
    for n in names[1:]:
        check_rows.append(f"| `{n}` | " + " | ".join(
            f"{results['sets'][o]['rows'][n]['ratio_of_medians']:.2f}x" for o in sets) + " |")
    compile_sets = [o for o in sets if results["option_sets"][o].get("torchcompile")]
    lines = [
        "# Training throughput: recipes vs a plain timm step", "",
        f"Command: `{results['command']}`  ",
        f"Machine: {m['cpu']}, {m['cores']} CPU cores visible, shared with other jobs (load average (1 min) "
        f"{results['load'][0]:.1f} at the start, {results['load'][1]:.1f} at the end, the benchmark's own threads "
        f"included), no GPU; {m['torch_threads']} torch thread(s) (`--threads`; 2 threads on these shared cores "
        "were up to 250x slower per step while other jobs ran: OpenMP workers waiting for each other); "
        f"torch {m['torch']}, timm {m['timm']}, Python {m['python']}.  ",
        f"Backbone `{plain['backbone']}` (`--model {results['model']}`, {plain['num_depths']} depths), "
        f"{results['img_size']}x{results['img_size']} px, batch {results['batch_size']}, 10 classes, random "
        f"batch; {results['warmup']} warm-up steps per variant, then {results['steps']} timed rounds "
        "`plain, recipe 1, plain, recipe 2, ..., plain` (recipe order alternating); "
        f"the whole run took {results['elapsed_min']:.1f} min.", "",
        "Option sets: " + "; ".join(f"`{o}` = " + (", ".join(f"{k}={v}" for k, v in results['option_sets'][o].items()))
                                    for o in sets) + " (TrainConfig fields; the plain step uses the same).", "",
        "## Step time relative to the plain timm step", "",
        "Median over the recipe's timed steps of its step time / the mean of the two plain steps timed right "
        "before and after it, same option set (lower is better).", "",
        *ratio_rows, "",
        "## Images/s (median step time)", "",
        *ips_rows, "",
        "## Targets", "",
        *target_lines(results), "",
    ]
    if compile_sets:
        lines += ["## Compile time", "",
                  "Seconds of the warm-up steps beyond steady step time (inductor compiles forward and backward on the "
                  "first step; recipes with graph breaks compile several graphs). Excluded from the tables above.", "",
                  "| recipe | " + " | ".join(compile_sets) + " |", "|---|" + "---|" * len(compile_sets)]
        for n in names:
            lines.append(f"| `{n}` | " + " | ".join(
                f"{results['sets'][o]['rows'][n]['first_steps_extra_s']:.0f}" for o in compile_sets) + " |")
        lines.append("")
    lines += ["## Check: ratio of medians", "",
              "The recipe's median step time / the plain step's median over all its steps in the option set. Close "
              "to the first table while the machine's load is steady; where it differs, the load changed during "
              "the set and the first table (neighbouring steps) is the one to trust.", "",
              *check_rows, ""]
    parts = decomposition(results)
    if parts:
        lines += ["## How the cooperative ratios split", "",
                  "A cooperative step trains two Teammates (each costs about a `multi_exit` step: backbone, exit "
                  "heads, their losses) and runs the Leader: a full training step when the Leader is trained, a "
                  "forward without gradients when it is fixed. From the measured ratios:", "", *parts, ""]
    if notes:
        lines += ["## Notes", "", notes.strip(), ""]
    lines += ["![ratio to plain step](train_throughput.png)", ""]
    return "\n".join(lines)


def plot(results: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(results: Mapping[str, Any], out: Path, notes: str = "") -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_throughput.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "train_throughput.md").write_text(markdown(results, notes))
    plot(results, out / "train_throughput.png")


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
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    notes = args.notes.read_text() if args.notes else ""
    out = Path(args.out)
    if args.from_json:
        write_outputs(json.loads(args.from_json.read_text()), out, notes)
        return 0
    script = Path(sys.argv[0] if argv == sys.argv[1:] else __file__).resolve()
    try:
        script = script.relative_to(Path.cwd())
    except ValueError:
        pass
    args.command = "python " + " ".join(shlex.quote(a) for a in [str(script), *argv])
    results = run(args)
    write_outputs(results, out, notes)
    print((out / "train_throughput.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
