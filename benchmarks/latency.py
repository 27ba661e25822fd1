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

Every comparison is measured *interleaved* (:func:`harness.time_interleaved`): each repeat
times every variant once, in alternating order; latencies are medians and ratios are
medians of the per-repeat ratios with their distribution-free 95 % intervals, so load from
other processes on a shared machine hits both sides alike. Writes ``latency.md``,
``latency.json`` and ``latency.png`` to ``--out``; ``--from-json`` re-renders the first and
the last from a saved ``latency.json``. A hand-written section already in ``--out``'s
``latency.md`` (a heading that says "(written by hand") is kept on rewrite.

Example (what ``benchmarks/results/latency.md`` was made with is written in it):
    python benchmarks/latency.py --models coop_resnet50 --batch-sizes 1 32 --repeats 5
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Sequence

import timm
import torch

import coopnets
import harness
from coopnets.inference.early_exit import EarlyExit
from coopnets.inference.profiler import profile

NAME = "latency"
TITLE = "Latency benchmark (CPU)"
DEFAULT_MODELS = ("coop_resnet50", "coop_mobilenetv3_large_100", "coop_convnext_tiny", "coop_vit_small_patch16_224")
TARGETS = {"wrapper_overhead": 1.02, "depth_vs_timm": 1.05, "early_exit_vs_flops": 0.8, "early_exit_vs_bound": 0.95}
PHASES = ("backbone", "heads", "decide", "compact")


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
    index, head = model.depth_plan.config.exit_indices[depth - 1], model.exits[depth - 1]

    def run(x: torch.Tensor) -> torch.Tensor:
        feats = plain.forward_intermediates(x, indices=[index], stop_early=True, intermediates_only=True)
        return head(feats[-1])

    return run


def ratio_fields(prefix: str, iv: harness.MedianInterval) -> Dict[str, float]:
    """``{prefix: median, prefix_lo: lo, prefix_hi: hi}`` of a paired ratio."""
    return {prefix: iv["median"], f"{prefix}_lo": iv["lo"], f"{prefix}_hi": iv["hi"]}


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
        t = harness.time_interleaved({"wrapper": lambda: wrapper(x), "timm": lambda: ref(x)}, repeats, warmup)
        rows.append({"depth": depth, "wrapper_ms": 1e3 * t.median("wrapper"), "timm_ms": 1e3 * t.median("timm"),
                     **ratio_fields("vs_timm", t.ratio("wrapper", "timm")), "flops_ratio": flops_ratio[depth - 1]})
    for r in rows:
        r["vs_full"] = r["wrapper_ms"] / rows[-1]["wrapper_ms"]
    return rows


def bench_early_exit(model, x, repeats, warmup) -> dict:
    """Early exit against full depth and every depth alone, all interleaved in one run (the latency bound
    reads depths timed beside the early-exit pass), then where the early-exit pass spends its time."""
    labels = torch.randint(0, model.num_classes, (len(x),))
    costs = EarlyExit(model).depth_flops(x.shape[1:])
    cal = coopnets.calibrate(model, [(x, labels)], target_flops=(costs[0] + costs[-1]) / 2)
    ee = cal.early_exit(model)
    result = ee(x)
    fns = {"full": lambda: model.forward_depth(x, model.num_depths), "early_exit": lambda: ee(x)}
    fns.update({f"depth{d}": (lambda d=d: model.forward_depth(x, d)) for d in range(1, model.num_depths)})
    t = harness.time_interleaved(fns, repeats, warmup)
    speedup = t.ratio("full", "early_exit")
    per_depth = [t.median(f"depth{d}") for d in range(1, model.num_depths)] + [t.median("full")]
    bound = per_depth[-1] / sum(f * ms for f, ms in zip(result.exit_fractions(), per_depth))
    phases: Dict[str, float] = {}
    for _ in range(repeats):
        ee(x, timings=phases)
    return {"exit_fractions": result.exit_fractions(), "flops_saving": result.flops_saving,
            "full_ms": 1e3 * t.median("full"), "early_exit_ms": 1e3 * t.median("early_exit"),
            **ratio_fields("speedup", speedup), "speedup_vs_flops": speedup["median"] / result.flops_saving,
            "latency_bound": bound, "depth_ms": [1e3 * ms for ms in per_depth],
            "phases_ms": {k: 1e3 * v / repeats for k, v in phases.items()}, "thresholds": cal.thresholds}


def verdict(value: float, target: float, higher_is_better: bool = False) -> str:
    ok = value >= target if higher_is_better else value <= target
    return "meets" if ok else "**misses**"


def ratio_cell(row: Mapping[str, Any], key: str, fmt: str, unit: str = "") -> str:
    """A paired ratio with its interval when recorded (older results have the median only)."""
    return harness.format_interval({"median": row[key], "lo": row.get(f"{key}_lo"), "hi": row.get(f"{key}_hi")}, fmt,
                                   unit=unit)


def latency_bound(results: dict, early_exit: dict) -> float:
    """Speed-up of ``early_exit``'s exit fractions if a sample cost its exit depth's measured eager latency
    (timed beside the early-exit pass; older results: from the per-depth table)."""
    if "latency_bound" in early_exit:
        return early_exit["latency_bound"]
    rows = next(b["rows"] for b in results["depths"]
                if (b["model"], b["mode"], b["batch"]) == (early_exit["model"], "eager", early_exit["batch"]))
    expected = sum(f * r["wrapper_ms"] for f, r in zip(early_exit["exit_fractions"], rows))
    return rows[-1]["wrapper_ms"] / expected


def report_of(results: Mapping[str, Any]) -> harness.Report:
    """The whole report, from the results (fresh, or a saved ``latency.json``)."""
    rep = harness.Report.from_meta(NAME, TITLE, results)
    rep.text(f"Input {results['img_size']}x{results['img_size']}, {results['repeats']} interleaved repeats after "
             f"{results['warmup']} warm-up per variant; interleaved repeats and medians absorb some noise, not all. "
             "Random-init weights (latency does not depend on them).")
    rep.heading("Per depth")
    rep.text("`wrapper ms`, `timm ms`: medians. `vs full`: median latency / full-depth median latency (FLOPs ratio "
             "beside it). `vs timm`: median of per-repeat ratios wrapper / the same stages run by plain timm + exit "
             "head alone, interleaved, with its distribution-free 95 % interval where recorded "
             f"(target <= {TARGETS['depth_vs_timm']} at batch 32; at full depth this is the wrapper overhead, "
             f"target <= {TARGETS['wrapper_overhead']}).")
    rep.table(["model", "mode", "batch", "depth", "wrapper ms", "timm ms", "vs timm", "vs full", "FLOPs ratio"],
              [[b["model"], b["mode"], b["batch"], r["depth"], f"{r['wrapper_ms']:.2f}", f"{r['timm_ms']:.2f}",
                ratio_cell(r, "vs_timm", "{:.3f}"), f"{r['vs_full']:.3f}", f"{r['flops_ratio']:.3f}"]
               for b in results["depths"] for r in b["rows"]])
    rep.heading("Early exit with compaction")
    rep.text("Thresholds calibrated (MSDNet geometric) on the measured batch for a FLOPs budget halfway between depth 1 "
             "and full depth. `speed-up / FLOPs saving` target >= "
             f"{TARGETS['early_exit_vs_flops']} (within 20%).",
             "`latency bound`: the speed-up these exit fractions would give if each sample cost exactly the measured "
             "eager latency of its exit depth (every depth timed interleaved with the early-exit pass, same batch) and "
             "compaction, the earlier exit heads and the exit decisions cost nothing; it shows how much of the gap to "
             "the FLOPs saving comes from per-stage latency not tracking FLOPs rather than from the early-exit "
             f"machinery (target: speed-up >= {TARGETS['early_exit_vs_bound']} x the bound).",
             "`phases`: where the early-exit pass spends its time (`EarlyExit(x, timings=...)`, mean ms per call): "
             "the backbone segments, the exit heads of every sample still running, the exit decisions and the "
             "compaction of the live state.")
    rows = []
    for e in results["early_exit"]:
        bound = latency_bound(results, e)
        rows.append([e["model"], e["batch"], " / ".join(f"{f:.2f}" for f in e["exit_fractions"]),
                     f"{e['flops_saving']:.2f}x", f"{bound:.2f}x", f"{e['full_ms']:.1f}", f"{e['early_exit_ms']:.1f}",
                     ratio_cell(e, "speedup", "{:.2f}", "x"), f"{e['speedup_vs_flops']:.2f}",
                     f"{e['speedup'] / bound:.2f}"])
    rep.table(["model", "batch", "exit fractions", "FLOPs saving", "latency bound", "full ms", "early-exit ms",
               "speed-up", "speed-up / FLOPs saving", "speed-up / latency bound"], rows)
    phase_rows = [[e["model"], *(f"{e['phases_ms'].get(k, 0.0):.1f} ({100 * e['phases_ms'].get(k, 0.0) / total:.0f} %)"
                                 for k in PHASES)]
                  for e in results["early_exit"] if e.get("phases_ms") for total in [sum(e["phases_ms"].values())]]
    if phase_rows:
        rep.table(["model", *(f"{k} ms" for k in PHASES)], phase_rows)
    rep.heading("Targets")
    big = max(results["batch_sizes"])
    lines = []
    for b in results["depths"]:
        if b["batch"] != big:
            continue
        full = b["rows"][-1]["vs_timm"]
        worst = max(r["vs_timm"] for r in b["rows"][:-1])
        lines.append(f"{b['model']} ({b['mode']}, batch {big}): wrapper overhead at full depth {full:.3f} "
                     f"({verdict(full, TARGETS['wrapper_overhead'])} <= {TARGETS['wrapper_overhead']}); worst depth vs "
                     f"timm {worst:.3f} ({verdict(worst, TARGETS['depth_vs_timm'])} <= {TARGETS['depth_vs_timm']})")
    for e in results["early_exit"]:
        bound = latency_bound(results, e)
        lines.append(f"{e['model']} early exit (batch {e['batch']}): speed-up {e['speedup']:.2f}x for a "
                     f"{e['flops_saving']:.2f}x FLOPs saving, ratio {e['speedup_vs_flops']:.2f} "
                     f"({verdict(e['speedup_vs_flops'], TARGETS['early_exit_vs_flops'], True)} >= "
                     f"{TARGETS['early_exit_vs_flops']}); {e['speedup'] / bound:.2f} of the latency bound {bound:.2f}x "
                     f"({verdict(e['speedup'] / bound, TARGETS['early_exit_vs_bound'], True)} >= "
                     f"{TARGETS['early_exit_vs_bound']})")
    rep.bullets(lines)
    rep.image(f"{NAME}.png", "latency vs depth")
    return rep


def plot(results: Mapping[str, Any]) -> Any:
    plt = harness.pyplot()
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
    return fig


def main(argv: Sequence[str] | None = None) -> int:
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
    args = p.parse_args(argv)
    if args.from_json:
        results = json.loads(args.from_json.read_text())
        rep = report_of(results)
        rep.keep_handwritten(Path(args.out) / f"{NAME}.md")
        rep.write(args.out, figure=plot(results))
        return 0
    run = harness.Report.start(NAME, TITLE, __file__, argv)
    results: Dict[str, Any] = {"img_size": args.img_size, "repeats": args.repeats, "warmup": args.warmup,
                               "batch_sizes": args.batch_sizes, "depths": [], "early_exit": []}
    size = (3, args.img_size, args.img_size)
    models = harness.progress_bar(args.models, desc="models", unit="model")
    with torch.inference_mode():
        for name in models:
            models.set_description(name)
            model = build(name, args.img_size)
            plain = plain_twin(model)
            flops_ratio = [r["flops_ratio"] for r in profile(model, size, repeats=1, warmup=0, print_table=False)]
            for bs in args.batch_sizes:
                x = torch.randn(bs, *size)
                modes = ["eager"] + (["compile"] if args.compile and bs in (args.compile_batch_sizes or args.batch_sizes) else [])
                for mode in modes:
                    rows = bench_depths(model, plain, flops_ratio, x, mode, args.repeats, args.warmup)
                    results["depths"].append({"model": name, "mode": mode, "batch": bs, "rows": rows})
                    models.write(f"{name} {mode} batch {bs}: " + ", ".join(
                        f"d{r['depth']} {r['wrapper_ms']:.1f}ms vs timm {r['vs_timm']:.3f}" for r in rows))
            if not args.no_early_exit:
                bs = max(args.batch_sizes)
                e = bench_early_exit(model, torch.randn(bs, *size), args.repeats, args.warmup)
                results["early_exit"].append({"model": name, "batch": bs, **e})
                models.write(f"{name} early exit batch {bs}: speed-up {e['speedup']:.2f}x, FLOPs saving "
                             f"{e['flops_saving']:.2f}x, fractions {e['exit_fractions']}")
    models.close()
    results.update(run.finish().meta())
    rep = report_of(results)
    rep.keep_handwritten(Path(args.out) / f"{NAME}.md")  # a rerun into the same folder keeps the analysis
    paths = rep.write(args.out, data=results, figure=plot(results))
    print(f"wrote {paths['md']}, {paths['json'].name} and {paths['png'].name} in {run.elapsed_s / 60:.1f} min")
    return 0


if __name__ == "__main__":  # one error policy for every entry point: one line and exit code 2 for a bad input
    from coopnets.cli.errors import run_entry

    sys.exit(run_entry(main, prog="benchmarks/latency.py"))
