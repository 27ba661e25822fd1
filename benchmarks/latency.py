"""Latency benchmark of the depth-adaptive zoo on this machine's CPU.

For every model, batch size and mode (eager, and ``torch.compile`` with ``--compile``):

* per depth: median latency of the wrapper (``model.set_depth(k)(x)``), its ratio to
  full depth, the FLOPs ratio beside it, and its ratio to the *same stages run by plain
  timm* (``forward_intermediates(..., stop_early=True, intermediates_only=True)`` on a
  plain timm model with the same weights, then the exit head run alone; at full depth
  the plain timm model's forward);
* early exit with compaction (largest batch size, eager): thresholds calibrated
  (MSDNet geometric, :func:`coopnets.calibrate`) on the measured batch for a FLOPs
  budget halfway between depth 1 and full depth; measured speed-up over full depth vs
  the FLOPs saving the early-exit pass reports.

Every comparison is measured *interleaved*: each repeat times every variant once, in
alternating order; latencies are medians and ratios are medians of the per-repeat
ratios, so load from other processes on a shared machine hits both sides alike. Writes ``latency.md``, ``latency.json`` and
``latency.png`` to ``--out``.

Example (what ``benchmarks/results/latency.md`` was made with is written in it):
    python benchmarks/latency.py --models coop_resnet50 --batch-sizes 1 32 --repeats 5
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import timm
import torch

import coopnets
from coopnets.inference.early_exit import EarlyExit
from coopnets.inference.profiler import measure_latency, profile

DEFAULT_MODELS = ("coop_resnet50", "coop_mobilenetv3_large_100", "coop_convnext_tiny", "coop_vit_small_patch16_224")
TARGETS = {"wrapper_overhead": 1.02, "depth_vs_timm": 1.05, "early_exit_vs_flops": 0.8}


def interleaved(fns: Dict[str, Callable[[], object]], repeats: int, warmup: int) -> Dict[str, List[float]]:
    """ms of every repeat of every function, timed in turns (order alternates every repeat)."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    times: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            times[name].append(measure_latency(fns[name], repeats=1, warmup=0))
    return times


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median of the per-repeat ratios ``a_i / b_i`` (neighbours in time share the machine's load)."""
    return statistics.median(x / y for x, y in zip(a, b))


def build(name: str, img_size: int) -> coopnets.DepthAdaptiveModel:
    """A zoo model for ``img_size`` inputs (transformers get their position embeddings sized for it)."""
    try:
        return coopnets.create_model(name, img_size=img_size).eval()
    except TypeError:  # CNN backbones take any input size and no img_size argument
        return coopnets.create_model(name).eval()


def plain_twin(model: coopnets.DepthAdaptiveModel) -> torch.nn.Module:
    """The plain timm model with the wrapper's backbone weights."""
    plain = timm.create_model(model.backbone_name, num_classes=model.num_classes, **model.backbone_kwargs)
    plain.load_state_dict(model.backbone.state_dict())
    return plain.eval()


def timm_reference(model: coopnets.DepthAdaptiveModel, plain: torch.nn.Module, depth: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Depth ``depth`` computed by plain timm: stages through ``forward_intermediates`` + the exit head alone."""
    if depth == model.num_depths:
        return plain
    index, head = model.exit_indices[depth - 1], model.exits[depth - 1]

    def run(x: torch.Tensor) -> torch.Tensor:
        feats = plain.forward_intermediates(x, indices=[index], stop_early=True, intermediates_only=True)
        return head(feats[-1])

    return run


def bench_depths(model, plain, flops_ratio, x, mode, repeats, warmup) -> List[dict]:
    rows = []
    if mode == "compile":
        # Dynamo caches graphs per code object, shared by every DepthAdaptiveModel (and every reference closure),
        # with a recompile limit of 8: without a reset, later models would fall back to eager frame by frame.
        torch._dynamo.reset()
    wrapper = torch.compile(model) if mode == "compile" else model
    for depth in range(1, model.num_depths + 1):
        ref = timm_reference(model, plain, depth)
        ref = torch.compile(ref) if mode == "compile" else ref
        model.set_depth(depth)
        t = interleaved({"wrapper": lambda: wrapper(x), "timm": lambda: ref(x)}, repeats, warmup)
        rows.append({"depth": depth, "wrapper_ms": statistics.median(t["wrapper"]), "timm_ms": statistics.median(t["timm"]),
                     "vs_timm": paired_ratio(t["wrapper"], t["timm"]), "flops_ratio": flops_ratio[depth - 1]})
    for r in rows:
        r["vs_full"] = r["wrapper_ms"] / rows[-1]["wrapper_ms"]
    return rows


def bench_early_exit(model, x, repeats, warmup) -> dict:
    labels = torch.randint(0, model.num_classes, (len(x),))
    costs = EarlyExit(model).depth_flops(x.shape[1:])
    cal = coopnets.calibrate(model, [(x, labels)], target_flops=(costs[0] + costs[-1]) / 2)
    ee = cal.early_exit(model)
    result = ee(x)
    model.set_depth(-1)
    t = interleaved({"full": lambda: model(x), "early_exit": lambda: ee(x)}, repeats, warmup)
    speedup = paired_ratio(t["full"], t["early_exit"])
    return {"exit_fractions": result.exit_fractions(), "flops_saving": result.flops_saving,
            "full_ms": statistics.median(t["full"]), "early_exit_ms": statistics.median(t["early_exit"]), "speedup": speedup,
            "speedup_vs_flops": speedup / result.flops_saving, "thresholds": cal.thresholds}


def machine() -> Dict[str, str]:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown"
    return {"cpu": cpu, "cores": str(os.cpu_count()), "torch_threads": str(torch.get_num_threads()),
            "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version()}


def verdict(value: float, target: float, higher_is_better: bool = False) -> str:
    ok = value >= target if higher_is_better else value <= target
    return "meets" if ok else "**misses**"


def latency_bound(results: dict, early_exit: dict) -> float:
    """Speed-up of ``early_exit``'s exit fractions if a sample cost its exit depth's measured eager latency."""
    rows = next(b["rows"] for b in results["depths"]
                if (b["model"], b["mode"], b["batch"]) == (early_exit["model"], "eager", early_exit["batch"]))
    expected = sum(f * r["wrapper_ms"] for f, r in zip(early_exit["exit_fractions"], rows))
    return rows[-1]["wrapper_ms"] / expected


def write_report(results: dict, out: Path) -> None:
    m = results["machine"]
    lines = [
        "# Latency benchmark (CPU)", "",
        f"Command: `{results['command']}`  ",
        f"Machine: {m['cpu']}, {m['cores']} cores visible, {m['torch_threads']} torch threads; "
        f"torch {m['torch']}, timm {m['timm']}, Python {m['python']}. "
        + (f"Load average (1 min) {results['load'][0]:.2f} at the start, {results['load'][1]:.2f} at the end (the "
           "benchmark's own threads count too); " if "load" in results else "")
        + "interleaved repeats and medians absorb some noise, not all.  ",
        f"Input {results['img_size']}x{results['img_size']}, {results['repeats']} interleaved repeats after "
        f"{results['warmup']} warm-up per variant; {results['elapsed_min']:.1f} min in all. Random-init weights "
        "(latency does not depend on them).", "",
        "## Per depth", "",
        "`wrapper ms`, `timm ms`: medians. `vs full`: median latency / full-depth median latency (FLOPs ratio "
        "beside it). `vs timm`: median of per-repeat ratios wrapper / the same "
        f"stages run by plain timm + exit head alone, interleaved (target <= {TARGETS['depth_vs_timm']} at batch 32; at full "
        f"depth this is the wrapper overhead, target <= {TARGETS['wrapper_overhead']}).", "",
        "| model | mode | batch | depth | wrapper ms | timm ms | vs timm | vs full | FLOPs ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for b in results["depths"]:
        for r in b["rows"]:
            lines.append(f"| {b['model']} | {b['mode']} | {b['batch']} | {r['depth']} | {r['wrapper_ms']:.2f} | "
                         f"{r['timm_ms']:.2f} | {r['vs_timm']:.3f} | {r['vs_full']:.3f} | {r['flops_ratio']:.3f} |")
    lines += ["", "## Early exit with compaction", "",
              "Thresholds calibrated (MSDNet geometric) on the measured batch for a FLOPs budget halfway between depth 1 "
              "and full depth. `speed-up / FLOPs saving` target >= "
              f"{TARGETS['early_exit_vs_flops']} (within 20%).", "",
              "`latency bound`: the speed-up these exit fractions would give if each sample cost exactly the measured "
              "eager latency of its exit depth (per-depth table above, same batch size) and compaction, the earlier "
              "exit heads and the exit decisions cost nothing; it shows how much of the gap to the FLOPs saving comes "
              "from per-stage latency not tracking FLOPs rather than from the early-exit machinery.", "",
              "| model | batch | exit fractions | FLOPs saving | latency bound | full ms | early-exit ms | speed-up | "
              "speed-up / FLOPs saving | speed-up / latency bound |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for e in results["early_exit"]:
        bound = latency_bound(results, e)
        lines.append(f"| {e['model']} | {e['batch']} | {' / '.join(f'{f:.2f}' for f in e['exit_fractions'])} | "
                     f"{e['flops_saving']:.2f}x | {bound:.2f}x | {e['full_ms']:.1f} | {e['early_exit_ms']:.1f} | "
                     f"{e['speedup']:.2f}x | {e['speedup_vs_flops']:.2f} | {e['speedup'] / bound:.2f} |")
    lines += ["", "## Targets", ""]
    big = max(results["batch_sizes"])
    for b in results["depths"]:
        if b["batch"] != big:
            continue
        full = b["rows"][-1]["vs_timm"]
        worst = max(r["vs_timm"] for r in b["rows"][:-1])
        lines.append(f"- {b['model']} ({b['mode']}, batch {big}): wrapper overhead at full depth {full:.3f} "
                     f"({verdict(full, TARGETS['wrapper_overhead'])} <= {TARGETS['wrapper_overhead']}); worst depth vs "
                     f"timm {worst:.3f} ({verdict(worst, TARGETS['depth_vs_timm'])} <= {TARGETS['depth_vs_timm']})")
    for e in results["early_exit"]:
        bound = latency_bound(results, e)
        lines.append(f"- {e['model']} early exit (batch {e['batch']}): speed-up {e['speedup']:.2f}x for a "
                     f"{e['flops_saving']:.2f}x FLOPs saving, ratio {e['speedup_vs_flops']:.2f} "
                     f"({verdict(e['speedup_vs_flops'], TARGETS['early_exit_vs_flops'], True)} >= "
                     f"{TARGETS['early_exit_vs_flops']}); {e['speedup'] / bound:.2f} of the latency bound {bound:.2f}x")
    lines += ["", "![latency vs depth](latency.png)", ""]
    (out / "latency.md").write_text("\n".join(lines))


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(b["model"] for b in results["depths"]))
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.6), squeeze=False)
    for ax, name in zip(axes[0], models):
        blocks = [b for b in results["depths"] if b["model"] == name]
        depths = [r["depth"] for r in blocks[0]["rows"]]
        ax.plot(depths, [r["flops_ratio"] for r in blocks[0]["rows"]], "k--o", label="FLOPs ratio")
        for b in blocks:
            ax.plot(depths, [r["vs_full"] for r in b["rows"]], "-o", label=f"latency, {b['mode']}, batch {b['batch']}")
        ax.set_title(name.replace("coop_", ""), fontsize=10)
        ax.set_xlabel("depth")
        ax.set_xticks(depths)
        ax.set_ylim(0, 1.1)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("ratio to full depth")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=120)


def main(argv: Sequence[str] = ()) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=5, help="interleaved timed repeats per variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per variant first (compile: includes compilation)")
    p.add_argument("--compile", action="store_true", help="also measure torch.compile'd wrapper and timm reference")
    p.add_argument("--compile-batch-sizes", nargs="+", type=int, default=None,
                   help="batch sizes to measure compiled (default: all of --batch-sizes)")
    p.add_argument("--no-early-exit", action="store_true")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--from-json", type=Path, default=None, help="only re-render latency.md/png from a saved latency.json")
    args = p.parse_args(list(argv) or None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        results = json.loads(args.from_json.read_text())
        write_report(results, out)
        plot(results, out)
        return 0
    start, load_at_start = time.time(), os.getloadavg()[0]
    results: dict = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "machine": machine(),
                     "img_size": args.img_size, "repeats": args.repeats, "warmup": args.warmup,
                     "batch_sizes": args.batch_sizes, "depths": [], "early_exit": []}
    size = (3, args.img_size, args.img_size)
    with torch.inference_mode():
        for name in args.models:
            model = build(name, args.img_size)
            plain = plain_twin(model)
            flops_ratio = [r["flops_ratio"] for r in profile(model, size, repeats=1, warmup=0, print_table=False)]
            for bs in args.batch_sizes:
                x = torch.randn(bs, *size)
                modes = ["eager"] + (["compile"] if args.compile and bs in (args.compile_batch_sizes or args.batch_sizes) else [])
                for mode in modes:
                    rows = bench_depths(model, plain, flops_ratio, x, mode, args.repeats, args.warmup)
                    results["depths"].append({"model": name, "mode": mode, "batch": bs, "rows": rows})
                    print(f"{name} {mode} batch {bs}: " + ", ".join(
                        f"d{r['depth']} {r['wrapper_ms']:.1f}ms vs timm {r['vs_timm']:.3f}" for r in rows), flush=True)
            if not args.no_early_exit:
                bs = max(args.batch_sizes)
                e = bench_early_exit(model, torch.randn(bs, *size), args.repeats, args.warmup)
                results["early_exit"].append({"model": name, "batch": bs, **e})
                print(f"{name} early exit batch {bs}: speed-up {e['speedup']:.2f}x, FLOPs saving "
                      f"{e['flops_saving']:.2f}x, fractions {e['exit_fractions']}", flush=True)
    results["elapsed_min"] = (time.time() - start) / 60
    results["load"] = [load_at_start, os.getloadavg()[0]]
    (out / "latency.json").write_text(json.dumps(results, indent=1))
    write_report(results, out)
    plot(results, out)
    print(f"wrote {out / 'latency.md'} and latency.png in {results['elapsed_min']:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
