"""Side-by-side comparison of every training method through the shared trainer.

Trains each method (``cooperative`` first, then every other registered recipe) with the
same backbone, depth plan, data, epochs, optimiser and seeds, through the trainer's
public :func:`coopnets.train.train`, and writes to ``--out``:

* ``compare_methods.md`` -- per-depth test accuracy (mean ± std over seeds), the mean
  over depths, and training wall time, absolute and relative to ``cooperative``
  measured in the same invocation, plus the exact command line and the machine;
* ``compare_methods.png`` -- the same numbers as a plot;
* ``compare_methods.json`` -- every run's raw numbers.

A hand-written section already in ``--out``'s Markdown (a heading that says "(written by
hand") is kept on rewrite.

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
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch

import harness
from coopnets.train import TrainConfig, train

NAME = "compare_methods"
REFERENCE = harness.REFERENCE_METHOD


def run_method(method: str, base: TrainConfig, runs_dir: Path) -> Dict[str, Any]:
    """Train ``method`` once (``independent``: the trainer runs one run per depth); per-depth test accuracy and wall time."""
    cfg = dataclasses.replace(base, method=method, out=str(runs_dir / f"{method}-seed{base.seed}"))
    summary = train(cfg, echo=False)
    return {"accuracy": list(summary["test_accuracy"]), "wall_time_s": summary["wall_time_s"]}


def aggregate(results: Dict[str, List[Dict[str, Any]]]) -> Dict[str, Dict[str, Any]]:
    """Per method: per-depth and mean-over-depths accuracy (mean, std over seeds) and mean wall time."""
    ref_time = harness.mean_std([r["wall_time_s"] for r in results[REFERENCE]])[0] if REFERENCE in results else None
    table = {}
    for method, runs in results.items():
        depths = len(runs[0]["accuracy"])
        wall = harness.mean_std([r["wall_time_s"] for r in runs])[0]
        table[method] = {
            "per_depth": [harness.mean_std([r["accuracy"][d] for r in runs]) for d in range(depths)],
            "mean": harness.mean_std([sum(r["accuracy"]) / depths for r in runs]),
            "wall_time_s": wall,
            "relative_time": wall / ref_time if ref_time else float("nan"),
        }
    return table


def render(report: harness.Report, table: Mapping[str, Mapping[str, Any]], settings: Mapping[str, Any]) -> None:
    """The report's text and table, from :func:`aggregate`'s table and the run's settings."""
    depths = len(next(iter(table.values()))["per_depth"])
    pct = lambda ms: f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}"  # noqa: E731
    report.text(
        f"{harness.describe_training(settings)}, seeds {', '.join(map(str, settings['seeds']))}; "
        f"device: {settings['device'] or 'auto'}.",
        "Test accuracy (%) per depth of the deployed net, mean ± std over seeds. `independent` is one run "
        "per depth (each column from the run that trained that depth; its time is the sum of the runs). "
        "Train time: mean over seeds of the trainer's `wall_time_s` (epochs incl. per-epoch validation), "
        f"relative to `{REFERENCE}` measured in the same invocation.")
    report.table(["method"] + [f"depth {d + 1}" for d in range(depths)]
                 + ["mean over depths", "train time (s)", f"time vs {REFERENCE}"],
                 [[f"`{method}`"] + [pct(ms) for ms in row["per_depth"]]
                  + [f"**{pct(row['mean'])}**", f"{row['wall_time_s']:.1f}", f"{row['relative_time']:.2f}x"]
                  for method, row in table.items()])
    report.image(f"{NAME}.png", "accuracy per depth and train time")


def plot(table: Mapping[str, Mapping[str, Any]]) -> Any:
    plt = harness.pyplot()
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
    return fig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=None, help=f"recipes to compare (default: all; {REFERENCE} is always run)")
    harness.add_train_arguments(p)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"), help="folder for the table, plot and JSON")
    p.add_argument("--runs-dir", default=None, help="keep the run folders here (default: a deleted temp folder)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if len(args.seeds) < 3:
        print(f"note: {len(args.seeds)} seed(s); the committed comparison uses at least 3.", file=sys.stderr)
    methods = harness.recipe_methods(args.methods)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = harness.Report.start(NAME, "Training methods side by side", __file__, argv)
    settings = {**harness.train_settings(args), "seeds": args.seeds}
    results: Dict[str, List[Dict[str, Any]]] = {m: [] for m in methods}
    with tempfile.TemporaryDirectory() as tmp, harness.progress_bar(total=len(args.seeds) * len(methods),
                                                                    unit="run") as bar:
        runs_dir = Path(args.runs_dir or tmp)
        for seed in args.seeds:
            base = TrainConfig(**harness.train_settings(args), seed=seed, progress=False, profile_repeats=1)
            for method in methods:
                bar.set_description(f"seed {seed} {method}")
                r = run_method(method, base, runs_dir)
                results[method].append({"seed": seed, **r})
                accs = "/".join(f"{100 * a:.1f}" for a in r["accuracy"])
                bar.write(f"seed {seed} {method:12s} acc {accs}  train {r['wall_time_s']:.1f}s")
                bar.update(1)
    report.finish()
    table = aggregate(results)
    render(report, table, settings)
    report.keep_handwritten(Path(args.out) / f"{NAME}.md")
    paths = report.write(args.out, data={"settings": settings, "runs": results, "table": table}, figure=plot(table))
    print(paths["md"].read_text())
    return 0


if __name__ == "__main__":  # one error policy for every entry point: one line and exit code 2 for a bad input
    from coopnets.cli.errors import run_entry

    sys.exit(run_entry(main, prog="benchmarks/compare_methods.py"))
