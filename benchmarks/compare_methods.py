"""Side-by-side comparison of every training method through the shared trainer.

Trains each method (``cooperative`` first, then every other registered recipe) with the
same backbone, depth plan, data, epochs, optimiser and seeds, through the trainer's
public :func:`coopnets.train.train`, and writes to ``--out``:

* ``compare_methods.md`` -- per-depth test accuracy (mean ± std over seeds), the mean
  over depths, and training wall time, absolute and relative to ``cooperative``
  measured in the same invocation, plus the exact command line;
* ``compare_methods.png`` -- the same numbers as a plot;
* ``compare_methods.json`` -- every run's raw numbers.

What is measured:

* accuracy -- the test split, per depth, of the net the recipe deploys
  (``recipe.deployable``; for ``cooperative`` the Teammate with the better mean
  validation accuracy);
* ``independent`` -- one run per depth (:func:`coopnets.train.sweep.train_each_depth`);
  its depth-``d`` accuracy comes from the run that trained depth ``d`` and its wall time
  is the sum over its runs, i.e. the cost of obtaining all depths;
* wall time -- the trainer's ``wall_time_s`` (training epochs including the per-epoch
  validation of the recipe's eval nets; data loading, final test and profiling excluded).
  Seeds are the outer loop so that every method sees the same machine load on average.

Example (the committed table; ~15 min on 2 shared CPU cores)::

    python benchmarks/compare_methods.py --epochs 10 --seeds 0 1 2 --threads 1
    python benchmarks/compare_methods.py --data-dir /data/imagenette --model resnet18 --img-size 128
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from tqdm.auto import tqdm

from coopnets.train.recipe import RECIPES
from coopnets.train import TrainConfig, train

REFERENCE = "cooperative"


def default_methods() -> List[str]:
    """``cooperative`` first, then every other registered recipe, by name."""
    return [REFERENCE] + sorted(m for m in RECIPES if m != REFERENCE)


def run_method(method: str, base: TrainConfig, runs_dir: Path) -> Dict[str, Any]:
    """Train ``method`` once (``independent``: the trainer runs one run per depth); per-depth test accuracy and wall time."""
    cfg = dataclasses.replace(base, method=method, out=str(runs_dir / f"{method}-seed{base.seed}"))
    summary = train(cfg, echo=False)
    return {"accuracy": list(summary["test_accuracy"]), "wall_time_s": summary["wall_time_s"]}


def mean_std(values: Sequence[float]) -> tuple:
    m = sum(values) / len(values)
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, s


def aggregate(results: Dict[str, List[Dict[str, Any]]]) -> Dict[str, Dict[str, Any]]:
    """Per method: per-depth and mean-over-depths accuracy (mean, std over seeds) and mean wall time."""
    ref_time = mean_std([r["wall_time_s"] for r in results[REFERENCE]])[0] if REFERENCE in results else None
    table = {}
    for method, runs in results.items():
        depths = len(runs[0]["accuracy"])
        wall = mean_std([r["wall_time_s"] for r in runs])[0]
        table[method] = {
            "per_depth": [mean_std([r["accuracy"][d] for r in runs]) for d in range(depths)],
            "mean": mean_std([sum(r["accuracy"]) / depths for r in runs]),
            "wall_time_s": wall,
            "relative_time": wall / ref_time if ref_time else float("nan"),
        }
    return table


def markdown(table: Dict[str, Dict[str, Any]], args: argparse.Namespace, command: str, total_s: float) -> str:
    depths = len(next(iter(table.values()))["per_depth"])
    pct = lambda ms: f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}"  # noqa: E731
    head = ["method"] + [f"depth {d + 1}" for d in range(depths)] + ["mean over depths", "train time (s)", f"time vs {REFERENCE}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, row in table.items():
        cells = [f"`{method}`"] + [pct(ms) for ms in row["per_depth"]] + [
            f"**{pct(row['mean'])}**", f"{row['wall_time_s']:.1f}", f"{row['relative_time']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    data = args.data_dir or "digits (embedded, 1,077 train / 360 val / 360 test images)"
    return "\n".join([
        "# Training methods side by side",
        "",
        f"Data: {data}. Backbone `{args.model}`, plan `{args.plan}`, {args.img_size}px inputs, "
        f"{args.epochs} epochs, batch {args.batch_size}, {args.opt} lr {args.lr} ({args.sched}), "
        f"seeds {', '.join(map(str, args.seeds))}; torch threads: {torch.get_num_threads()}, device: {args.device or 'auto'}.",
        "",
        "Test accuracy (%) per depth of the deployed net, mean ± std over seeds. `independent` is one run "
        "per depth (each column from the run that trained that depth; its time is the sum of the runs). "
        f"Train time: mean over seeds of the trainer's `wall_time_s` (epochs incl. per-epoch validation), "
        f"relative to `{REFERENCE}` measured in the same invocation. Whole invocation: {total_s / 60:.1f} min.",
        "",
        *lines,
        "",
        "Command:",
        "",
        "```",
        command,
        "```",
        "",
    ])


def plot(table: Dict[str, Dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 2]})
    for method, row in table.items():
        depths = range(1, len(row["per_depth"]) + 1)
        ax.errorbar(depths, [100 * m for m, _ in row["per_depth"]], yerr=[100 * s for _, s in row["per_depth"]],
                    marker="o", capsize=3, label=method)
    ax.set_xlabel("depth")
    ax.set_ylabel("test accuracy (%)")
    ax.set_xticks(list(depths))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    names = list(table)
    bx.barh(names, [table[m]["relative_time"] for m in names], color="tab:gray")
    bx.axvline(1.0, color="k", lw=0.8)
    bx.set_xlabel(f"train wall time relative to {REFERENCE}")
    bx.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=None, help=f"recipes to compare (default: all; {REFERENCE} is always run)")
    p.add_argument("--data-dir", default=None, help="ImageFolder root (default: the embedded digits set)")
    p.add_argument("--model", default="test_resnet", help="backbone for every method (zoo or timm name)")
    p.add_argument("--plan", default="exits", choices=("exits", "blocks"))
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--opt", default="sgd")
    p.add_argument("--sched", default="cosine")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"), help="folder for the table, plot and JSON")
    p.add_argument("--runs-dir", default=None, help="keep the run folders here (default: a deleted temp folder)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if len(args.seeds) < 3:
        print(f"note: {len(args.seeds)} seed(s); the committed comparison uses at least 3.", file=sys.stderr)
    methods = args.methods or default_methods()
    unknown = sorted(set(methods) - set(RECIPES))
    if unknown:
        raise SystemExit(f"Unknown method(s) {unknown}; valid methods: {', '.join(sorted(RECIPES))}.")
    methods = [REFERENCE] + [m for m in methods if m != REFERENCE]
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0].replace(str(Path.cwd()) + "/", "")] + (argv or sys.argv[1:]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: Dict[str, List[Dict[str, Any]]] = {m: [] for m in methods}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, tqdm(total=len(args.seeds) * len(methods), unit="run") as bar:
        runs_dir = Path(args.runs_dir or tmp)
        for seed in args.seeds:
            base = TrainConfig(
                model=args.model, plan=args.plan, data_dir=args.data_dir, img_size=args.img_size, epochs=args.epochs,
                seed=seed, batch_size=args.batch_size, lr=args.lr, opt=args.opt, sched=args.sched,
                device=args.device, progress=False, profile_repeats=1,
            )
            for method in methods:
                bar.set_description(f"seed {seed} {method}")
                r = run_method(method, base, runs_dir)
                results[method].append({"seed": seed, **r})
                accs = "/".join(f"{100 * a:.1f}" for a in r["accuracy"])
                bar.write(f"seed {seed} {method:12s} acc {accs}  train {r['wall_time_s']:.1f}s")
                bar.update(1)
    total = time.perf_counter() - start
    table = aggregate(results)
    (out / "compare_methods.json").write_text(json.dumps({"command": command, "runs": results, "table": table}, indent=2) + "\n")
    (out / "compare_methods.md").write_text(markdown(table, args, command, total))
    plot(table, out / "compare_methods.png")
    print((out / "compare_methods.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
