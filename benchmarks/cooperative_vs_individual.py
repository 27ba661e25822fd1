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
a PNG in ``benchmarks/results/``.

Usage:
    python benchmarks/cooperative_vs_individual.py --epochs 6 --seeds 0 1 2 --img-size 16
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Sequence

import torch
from tqdm.auto import tqdm

from coopnets.train import TrainConfig, train

RESULTS = Path(__file__).parent / "results"
NAME = "cooperative_vs_individual"


def run(cfg: TrainConfig, root: Path, tag: str, bar: tqdm) -> Dict[str, Any]:
    cfg.out = str(root / tag)
    bar.set_description(tag)
    summary = train(cfg, echo=False)
    bar.update(1)
    return summary


def mean_std(values: Sequence[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * sd:.2f}"


def benchmark(args: argparse.Namespace) -> Dict[str, Any]:
    base = dict(model=args.model, img_size=args.img_size, epochs=args.epochs, batch_size=args.batch_size,
                lr=args.lr, progress=False, profile_repeats=args.profile_repeats)
    results: Dict[str, Any] = {"cooperative": [], "individual": [], "flops": None}
    with tempfile.TemporaryDirectory() as tmp, tqdm(total=2 * len(args.seeds), unit="run") as bar:
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


def to_markdown(res: Dict[str, Any], args: argparse.Namespace, command: str) -> str:
    coop, indiv, flops = res["cooperative"], res["individual"], res["flops"]
    depths = len(flops)
    lines = [
        "| depth | GFLOPs | cooperative (deployed Teammate) | trained alone | difference (points) |",
        "|---|---|---|---|---|",
    ]
    for d in range(depths):
        c = [r["acc"][d] for r in coop]
        i = [runs[d]["acc"] for runs in indiv]
        label = f"{d + 1}" + (" (full = plain backbone)" if d == depths - 1 else "")
        diff = 100 * (statistics.mean(c) - statistics.mean(i))
        lines.append(f"| {label} | {flops[d] / 1e9:.4f} | {mean_std(c)} | {mean_std(i)} | {diff:+.2f} |")
    coop_wall = [r["wall_s"] for r in coop]
    sum_wall = [sum(r["wall_s"] for r in runs) for runs in indiv]
    ratio = statistics.mean(coop_wall) / statistics.mean(sum_wall)
    return "\n".join([
        f"# Cooperative vs individually trained depths ({args.model}, digits)",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.platform()}, {torch.get_num_threads()} torch thread(s), CPU only, "
        f"load average (1 min) {res['load'][0]:.2f} at the start and {res['load'][1]:.2f} at the end (this "
        f"benchmark's own thread included). torch {torch.__version__}.",
        "",
        f"Setting: {args.epochs} epochs, batch {args.batch_size}, SGD lr {args.lr} cosine, "
        f"{args.img_size}x{args.img_size} inputs, seeds {list(args.seeds)}; test split of 360 images. "
        "Accuracy in %, mean ± std over seeds. 'Trained alone' at depth k is the truncated net "
        "(stem, stages 1..k, exit k) trained with CE only; at full depth it is the plain backbone.",
        "",
        *lines,
        "",
        "| training wall time (s, per seed) | mean ± std |",
        "|---|---|",
        f"| cooperative (Leader + 2 Teammates, all depths, one run) | {statistics.mean(coop_wall):.0f} ± {statistics.pstdev(coop_wall):.0f} |",
        f"| sum of the {depths} individual runs | {statistics.mean(sum_wall):.0f} ± {statistics.pstdev(sum_wall):.0f} |",
        f"| ratio cooperative / sum | {ratio:.2f} |",
        "",
    ])


def plot(res: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flops = [f / 1e9 for f in res["flops"]]
    series = {
        "cooperative": [[r["acc"][d] for r in res["cooperative"]] for d in range(len(flops))],
        "trained alone": [[runs[d]["acc"] for runs in res["individual"]] for d in range(len(flops))],
    }
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for (label, per_depth), fmt in zip(series.items(), ("o-", "s--")):
        means = [statistics.mean(v) for v in per_depth]
        sds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in per_depth]
        ax.errorbar(flops, means, yerr=sds, fmt=fmt, capsize=3, label=label)
    ax.set_xlabel("GFLOPs per image (depth 1..D)")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    command = "python benchmarks/cooperative_vs_individual.py " + " ".join(sys.argv[1:] if argv is None else argv)
    load_at_start = os.getloadavg()[0]
    res = benchmark(args)
    res["load"] = [load_at_start, os.getloadavg()[0]]
    md = to_markdown(res, args, command)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{NAME}.md").write_text(md)
    (args.out / f"{NAME}.json").write_text(json.dumps(res, indent=1))
    plot(res, args.out / f"{NAME}.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
