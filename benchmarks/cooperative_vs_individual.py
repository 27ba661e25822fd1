"""Cooperative training vs networks trained individually, on digits.

For each seed this trains, with the same epochs, optimizer and schedule:

* ``cooperative``: Leader + two Teammates + all sub-networks in one run; the deployable
  Teammate is scored at every depth;
* ``individual``: for every depth ``k`` a depth-adaptive net trained with CE on depth ``k``
  only, i.e. the truncated network (stem, stages ``1..k``, exit ``k``) trained alone:
  the ``independent`` recipe, one run per depth. At full depth this is the plain timm
  backbone trained alone (baseline (a)); shallower depths are baseline (b).

It reports per-depth test accuracy (mean and std over seeds) and the training wall time
of the cooperative run against the sum of the individual runs, as a Markdown table and
a PNG in ``benchmarks/results/`` (a hand-written section already there, under a heading
that says "(written by hand", is kept on rewrite).

Usage:
    python benchmarks/cooperative_vs_individual.py --epochs 6 --seeds 0 1 2 --img-size 16
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Mapping, Sequence

import torch

import harness
from coopnets.train import TrainConfig, train

RESULTS = Path(__file__).parent / "results"
NAME = "cooperative_vs_individual"


def run(cfg: TrainConfig, root: Path, tag: str, bar: Any) -> Dict[str, Any]:
    cfg.out = str(root / tag)
    bar.set_description(tag)
    summary = train(cfg, echo=False)
    bar.update(1)
    return summary


def mean_std(values: Sequence[float]) -> str:
    mean, sd = harness.mean_std(values)
    return f"{100 * mean:.2f} ± {100 * sd:.2f}"


def benchmark(args: argparse.Namespace) -> Dict[str, Any]:
    base = dict(model=args.model, img_size=args.img_size, epochs=args.epochs, batch_size=args.batch_size,
                lr=args.lr, progress=False, profile_repeats=args.profile_repeats)
    results: Dict[str, Any] = {"cooperative": [], "individual": [], "flops": None}
    with tempfile.TemporaryDirectory() as tmp, harness.progress_bar(total=2 * len(args.seeds), unit="run") as bar:
        root = Path(tmp)
        for seed in args.seeds:
            coop = run(TrainConfig(method="cooperative", seed=seed, **base), root, f"coop-s{seed}", bar)
            results["flops"] = [r["flops"] for r in coop["per_depth"]]
            results["cooperative"].append({"acc": coop["test_accuracy"], "wall_s": coop["wall_time_s"]})
            # every depth trained alone: the trainer runs one run per depth
            alone = run(TrainConfig(method="independent", seed=seed, **base), root, f"alone-s{seed}", bar)
            results["individual"].append([{"acc": a, "wall_s": w}
                                          for a, w in zip(alone["test_accuracy"], alone["run_wall_time_s"])])
    return results


def render(report: harness.Report, res: Mapping[str, Any], args: argparse.Namespace) -> None:
    coop, indiv, flops = res["cooperative"], res["individual"], res["flops"]
    depths = len(flops)
    rows = []
    for d in range(depths):
        c = [r["acc"][d] for r in coop]
        i = [runs[d]["acc"] for runs in indiv]
        label = f"{d + 1}" + (" (full = plain backbone)" if d == depths - 1 else "")
        diff = 100 * (statistics.mean(c) - statistics.mean(i))
        rows.append([label, f"{flops[d] / 1e9:.4f}", mean_std(c), mean_std(i), f"{diff:+.2f}"])
    coop_wall = [r["wall_s"] for r in coop]
    sum_wall = [sum(r["wall_s"] for r in runs) for runs in indiv]
    wall = {"coop": harness.mean_std(coop_wall), "sum": harness.mean_std(sum_wall)}
    report.text(
        f"Setting: {args.epochs} epochs, batch {args.batch_size}, SGD lr {args.lr} cosine, "
        f"{args.img_size}x{args.img_size} inputs, seeds {list(args.seeds)}; test split of 360 images. "
        "Accuracy in %, mean ± std over seeds. 'Trained alone' at depth k is the truncated net "
        "(stem, stages 1..k, exit k) trained with CE only; at full depth it is the plain backbone.")
    report.table(["depth", "GFLOPs", "cooperative (deployed Teammate)", "trained alone", "difference (points)"], rows)
    report.table(["training wall time (s, per seed)", "mean ± std"], [
        ["cooperative (Leader + 2 Teammates, all depths, one run)", "{:.0f} ± {:.0f}".format(*wall["coop"])],
        [f"sum of the {depths} individual runs", "{:.0f} ± {:.0f}".format(*wall["sum"])],
        ["ratio cooperative / sum", f"{wall['coop'][0] / wall['sum'][0]:.2f}"],
    ])
    report.image(f"{NAME}.png", "accuracy vs FLOPs")


def plot(res: Mapping[str, Any]) -> Any:
    plt = harness.pyplot()
    flops = [f / 1e9 for f in res["flops"]]
    series = {
        "cooperative": [[r["acc"][d] for r in res["cooperative"]] for d in range(len(flops))],
        "trained alone": [[runs[d]["acc"] for runs in res["individual"]] for d in range(len(flops))],
    }
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for (label, per_depth), fmt in zip(series.items(), ("o-", "s--")):
        stats = [harness.mean_std(v) for v in per_depth]
        ax.errorbar(flops, [m for m, _ in stats], yerr=[s for _, s in stats], fmt=fmt, capsize=3, label=label)
    ax.set_xlabel("GFLOPs per image (depth 1..D)")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="coop_resnet18")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--img-size", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--profile-repeats", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = harness.Report.start(NAME, f"Cooperative vs individually trained depths ({args.model}, digits)",
                                  __file__, argv)
    res = benchmark(args)
    report.finish()
    render(report, res, args)
    report.keep_handwritten(args.out / f"{NAME}.md")
    paths = report.write(args.out, data=res, figure=plot(res))
    print(paths["md"].read_text())
    return 0


if __name__ == "__main__":  # one error policy for every entry point: one line and exit code 2 for a bad input
    from coopnets.cli.errors import run_entry

    sys.exit(run_entry(main, prog="benchmarks/cooperative_vs_individual.py"))
