"""Latency benchmark of the depth-adaptive zoo on this machine's CPU.

For every model, batch size and mode (eager, and ``torch.compile`` with ``--compile``):

* per depth: median latency of the wrapper (``model.set_depth(k)(x)``), its ratio to
  full depth, the FLOPs ratio beside it, and its ratio to the *same stages run by plain
  timm* (``forward_intermediates(..., stop_early=True, intermediates_only=True)`` on a
  plain timm model with the same weights, then the exit head run alone; at full depth
  the plain timm model's forward);
* early exit with compaction (largest batch size, eager): thresholds calibrated
  (MSDNet geometric, :func:`coopnets.calibrate`'s fit) on the measured batch for a FLOPs
  budget halfway between depth 1 and full depth, and for a milliseconds budget halfway
  between depth 1's and full depth's measured latency (``target_ms``); measured speed-up
  over full depth vs the FLOPs saving the early-exit pass reports and vs the *fair bound*:
  each sample charged what a batch that all leaves at its exit costs
  (:meth:`EarlyExit.leave_at`: the backbone to the exit and every exit head on the way, timed
  beside the early-exit pass), nothing for the exit decisions or the compaction.

``--zoo`` measures instead the zoo's latency table (``latency_zoo.md``/``.json``/``.png``): for
every zoo CNN, each depth's latency share (its latency / full depth's) against its FLOPs share,
at batch 1 and 8, 224 px, with 1 and 2 torch threads, with the target that a depth ``k < D``
costs at most its FLOPs share + 0.15 of the full latency (depth ``D - 1`` at most 0.9); where a
model misses it, per-step figures (bytes moved, FLOPs per byte and achieved GFLOP/s of every
stage and exit head) show why; then early exit at batch 32, 128 px, one torch thread, for
ResNet-50, MobileNetV3-L and EfficientNet-B0. ``--quick`` is a shorter zoo run for development
(two models, fewer repeats: a few minutes).

Every comparison is measured *interleaved* (:func:`harness.time_interleaved`): each repeat
times every variant once, in alternating order; latencies are medians and ratios are
medians of the per-repeat ratios with their distribution-free 95 % intervals, so load from
other processes on a shared machine hits both sides alike. Writes ``latency.md``,
``latency.json`` and ``latency.png`` to ``--out``; ``--from-json`` re-renders the first and
the last from a saved ``latency.json``. A hand-written section already in ``--out``'s
``latency.md`` (a heading that says "(written by hand") is kept on rewrite.

Example (what ``benchmarks/results/latency.md`` and ``latency_zoo.md`` were made with is written in them):
    python benchmarks/latency.py --models coop_resnet50 --batch-sizes 1 32 --repeats 5
    python benchmarks/latency.py --zoo
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple

import timm
import torch

import coopnets
import harness
from coopnets.inference.budget import collect_exit_logits, fit_thresholds
from coopnets.inference.early_exit import EarlyExit
from coopnets.inference.profiler import profile

NAME = "latency"
TITLE = "Latency benchmark (CPU)"
ZOO_NAME = "latency_zoo"
ZOO_TITLE = "Latency share vs FLOPs share per depth, and early exit, for the zoo's CNNs (CPU)"
DEFAULT_MODELS = ("coop_resnet50", "coop_mobilenetv3_large_100", "coop_convnext_tiny", "coop_vit_small_patch16_224")
#: the zoo families whose latency table ``--zoo`` measures (not the transformers)
CNN_FAMILIES = ("resnet", "mobilenetv3", "efficientnet", "regnet", "convnext")
#: ``--zoo``'s early-exit models, batch and image size (and, by default, one torch thread)
EARLY_EXIT_MODELS = ("coop_resnet50", "coop_mobilenetv3_large_100", "coop_efficientnet_b0")
EARLY_EXIT_BATCH, EARLY_EXIT_IMG_SIZE = 32, 128
#: ``--quick``'s models (zoo table, early exit)
QUICK_MODELS = ("coop_resnet18", "coop_mobilenetv3_large_100")
QUICK_EARLY_EXIT_MODELS = ("coop_mobilenetv3_large_100",)
TARGETS = {"wrapper_overhead": 1.02, "depth_vs_timm": 1.05, "early_exit_vs_flops": 0.8, "early_exit_vs_bound": 0.95,
           "early_exit_speedup": 1.25, "share_over_flops": 0.15, "share_last_exit": 0.9}
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
    """Early exit at a FLOPs and at a milliseconds budget, each halfway between depth 1 and full depth,
    against full depth and against every "everyone leaves at depth d" pass (the fair bound), all timed
    interleaved in one run; then where the FLOPs-budget pass spends its time."""
    size = tuple(x.shape[1:])
    probe = EarlyExit(model, image_size=size)
    # what calibrate does (one pass of every exit's logits, the costs, the fit), with one latency measurement
    # for both the budget's place and the fit (a second one would move the range the budget must lie in)
    all_logits, labels, _ = collect_exit_logits(model, [(x, torch.randint(0, model.num_classes, (len(x),)))])
    flops = probe.depth_flops(size)
    ms = probe.depth_latency(size, batch_size=len(x), repeats=repeats, warmup=warmup)
    cal = fit_thresholds(all_logits, labels, flops, (flops[0] + flops[-1]) / 2)
    cal_ms = fit_thresholds(all_logits, labels, flops, (ms[0] + ms[-1]) / 2, depth_ms=ms, batch_size=len(x))
    ee, ee_ms = cal.early_exit(model), cal_ms.early_exit(model)
    result, result_ms = ee(x), ee_ms(x)
    fns = {"full": lambda: model.forward_depth(x, model.num_depths), "early_exit": lambda: ee(x),
           "early_exit_ms": lambda: ee_ms(x)}
    fns.update({f"leave{d}": (lambda d=d: probe.leave_at(x, d)) for d in range(1, model.num_depths + 1)})
    t = harness.time_interleaved(fns, repeats, warmup)

    def fair_bound(fractions: Sequence[float], variant: str) -> Dict[str, float]:
        """The fair bound of ``fractions`` and ``variant``'s speed-up over it (``vs_bound``), each the median of
        its per-round values (every round's calls are neighbours in time) with its interval."""
        expected = [sum(f * t.times[f"leave{d}"][r] for d, f in enumerate(fractions, 1)) for r in range(repeats)]
        return {**ratio_fields("fair_bound", harness.median_interval(
                    [full / e for full, e in zip(t.times["full"], expected)])),
                **ratio_fields("vs_bound", harness.median_interval(
                    [e / ran for e, ran in zip(expected, t.times[variant])]))}

    speedup, speedup_ms = t.ratio("full", "early_exit"), t.ratio("full", "early_exit_ms")
    phases: Dict[str, float] = {}
    for _ in range(repeats):
        ee(x, timings=phases)
    return {"img_size": size[-1], "exit_fractions": result.exit_fractions(), "flops_saving": result.flops_saving,
            "full_ms": 1e3 * t.median("full"), "early_exit_ms": 1e3 * t.median("early_exit"),
            **ratio_fields("speedup", speedup), "speedup_vs_flops": speedup["median"] / result.flops_saving,
            **fair_bound(result.exit_fractions(), "early_exit"),
            "leave_ms": [1e3 * t.median(f"leave{d}") for d in range(1, model.num_depths + 1)],
            "phases_ms": {k: 1e3 * v / repeats for k, v in phases.items()}, "thresholds": cal.thresholds,
            "ms_budget": {"target_ms": cal_ms.target, "expected_ms": cal_ms.expected_cost,
                          "depth_costs_ms": cal_ms.depth_costs, "exit_fractions": result_ms.exit_fractions(),
                          "early_exit_ms": 1e3 * t.median("early_exit_ms"), **ratio_fields("speedup", speedup_ms),
                          **fair_bound(result_ms.exit_fractions(), "early_exit_ms"),
                          "flops_saving": result_ms.flops_saving,
                          "thresholds": cal_ms.thresholds}}


# --- the zoo's latency table ---------------------------------------------------------------
def zoo_cnns() -> List[str]:
    """The zoo's CNNs (:data:`CNN_FAMILIES`), in ``coopnets.list_models()`` order."""
    return [m for m in coopnets.list_models() if m.removeprefix("coop_").startswith(CNN_FAMILIES)]


def share_limits(flops_share: Sequence[float]) -> List[float]:
    """The target's most latency share per depth ``k < D``: its FLOPs share + 0.15, and at most 0.9 at ``D - 1``."""
    limits = [f + TARGETS["share_over_flops"] for f in flops_share[:-1]]
    limits[-1] = min(limits[-1], TARGETS["share_last_exit"])
    return limits


def bench_shares(model, flops_share, size, batch_sizes, threads, repeats, warmup) -> List[dict]:
    """Latency share of every depth (``forward_depth``) per batch size and thread count, depths interleaved."""
    runs, before, full = [], torch.get_num_threads(), model.num_depths
    try:
        for bs in batch_sizes:
            x = torch.randn(bs, *size)
            for n in threads:
                torch.set_num_threads(n)
                t = harness.time_interleaved({f"depth{d}": (lambda d=d: model.forward_depth(x, d))
                                              for d in range(1, full + 1)}, repeats, warmup)
                shares = [t.ratio(f"depth{d}", f"depth{full}") for d in range(1, full)]
                runs.append({"batch": bs, "threads": n,
                             "depth_ms": [1e3 * t.median(f"depth{d}") for d in range(1, full + 1)],
                             "share": [iv["median"] for iv in shares], "share_lo": [iv["lo"] for iv in shares],
                             "share_hi": [iv["hi"] for iv in shares]})
    finally:
        torch.set_num_threads(before)
    limits = share_limits(flops_share)
    for r in runs:
        r["missed"] = [d + 1 for d, (s, lim) in enumerate(zip(r["share"], limits)) if s > lim]
    return runs


def _tensors(value: Any) -> List[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def step_traffic(model, runner, size) -> Dict[str, List[int]]:
    """Bytes per step of one image (the steps of :meth:`EarlyExit.step_flops`): ``activation_bytes``, what
    the step's leaf modules write (each is read back at least once), and ``weight_bytes``, the parameters
    and buffers of the modules it calls (each tensor once)."""
    acts: List[int] = []
    weights: List[int] = []
    seen: set = set()

    def hook(module, _inputs, output):
        if next(module.children(), None) is None:
            acts[-1] += sum(t.numel() * t.element_size() for t in _tensors(output))
        for w in itertools.chain(module.parameters(recurse=False), module.buffers(recurse=False)):
            if id(w) not in seen:
                seen.add(id(w))
                weights[-1] += w.numel() * w.element_size()

    def step(fn, *args):
        acts.append(0)
        weights.append(0)
        seen.clear()
        return fn(*args)

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.inference_mode():
            state = step(runner.start, torch.zeros(1, *size))
            for k in range(runner.num_exits):
                state, fmap = step(runner.advance, state, k)
                step(model.exits[k], fmap)
            step(runner.finish, state)
    finally:
        for h in handles:
            h.remove()
    return {"activation_bytes": acts, "weight_bytes": weights}


def step_names(num_exits: int) -> List[str]:
    """Readable names of the steps ``[start, advance 0, head 0, ..., finish]``."""
    return ["stem"] + [n for k in range(num_exits) for n in (f"to exit {k + 1}", f"exit head {k + 1}")] + \
        ["rest + final head"]


def bench_stages(model, size, configs, repeats, warmup) -> dict:
    """Per-step FLOPs, bytes and measured latency (:meth:`EarlyExit.step_latency`) at each ``(batch size, torch
    threads)`` of ``configs``: why a depth costs more of the latency than of the FLOPs."""
    ee = EarlyExit(model, image_size=size)
    out = {"steps": step_names(model.num_depths - 1), "flops": ee.step_flops(size),
           **step_traffic(model, ee.runner(size), size), "runs": []}
    before = torch.get_num_threads()
    try:
        for bs, n in configs:
            torch.set_num_threads(n)
            out["runs"].append({"batch": bs, "threads": n,
                                "step_ms": ee.step_latency(size, bs, repeats=repeats, warmup=warmup)})
    finally:
        torch.set_num_threads(before)
    return out


def verdict(value: float, target: float, higher_is_better: bool = False) -> str:
    ok = value >= target if higher_is_better else value <= target
    return "meets" if ok else "**misses**"


def ratio_cell(row: Mapping[str, Any], key: str, fmt: str, unit: str = "") -> str:
    """A paired ratio with its interval when recorded (older results have the median only)."""
    return harness.format_interval({"median": row[key], "lo": row.get(f"{key}_lo"), "hi": row.get(f"{key}_hi")}, fmt,
                                   unit=unit)


def latency_bound(results: Mapping[str, Any], early_exit: Mapping[str, Any]) -> Tuple[str, str, float]:
    """``(bound cell, speed-up / bound cell, speed-up / bound)`` of an early-exit entry: the fair bound (each sample
    charged what a batch that all leaves at its exit costs; runs since issue 27: medians of per-round values with
    their intervals), or, for older results, the speed-up with each sample charged its exit depth's plain forward
    latency, the exit heads before it free (timed beside the early-exit pass, else read from the per-depth table)."""
    if "vs_bound" in early_exit:
        return (ratio_cell(early_exit, "fair_bound", "{:.2f}", "x"), ratio_cell(early_exit, "vs_bound", "{:.2f}"),
                early_exit["vs_bound"])
    if "latency_bound" in early_exit:
        bound = early_exit["latency_bound"]
    else:
        rows = next(b["rows"] for b in results["depths"]
                    if (b["model"], b["mode"], b["batch"]) == (early_exit["model"], "eager", early_exit["batch"]))
        bound = rows[-1]["wrapper_ms"] / sum(f * r["wrapper_ms"] for f, r in zip(early_exit["exit_fractions"], rows))
    return f"{bound:.2f}x (heads free)", f"{early_exit['speedup'] / bound:.2f}", early_exit["speedup"] / bound


def fractions_cell(fractions: Sequence[float]) -> str:
    return " / ".join(f"{f:.2f}" for f in fractions)


def early_exit_section(rep: harness.Report, results: Mapping[str, Any]) -> List[str]:
    """The early-exit tables of ``results["early_exit"]`` (FLOPs budget, ms budget, phases); returns the target
    lines."""
    rows, ms_rows, lines = [], [], []
    speed_target, bound_target = TARGETS["early_exit_speedup"], TARGETS["early_exit_vs_bound"]
    for e in results["early_exit"]:
        bound, vs_bound, ratio = latency_bound(results, e)
        rows.append([e["model"], e["batch"], fractions_cell(e["exit_fractions"]), f"{e['flops_saving']:.2f}x", bound,
                     f"{e['full_ms']:.1f}", f"{e['early_exit_ms']:.1f}", ratio_cell(e, "speedup", "{:.2f}", "x"),
                     f"{e['speedup_vs_flops']:.2f}", vs_bound])
        lines.append(f"{e['model']} early exit, FLOPs budget (batch {e['batch']}): speed-up {e['speedup']:.3f}x "
                     f"({verdict(e['speedup'], speed_target, True)} >= {speed_target}) for a "
                     f"{e['flops_saving']:.2f}x FLOPs saving, ratio {e['speedup_vs_flops']:.2f} "
                     f"({verdict(e['speedup_vs_flops'], TARGETS['early_exit_vs_flops'], True)} >= "
                     f"{TARGETS['early_exit_vs_flops']}); {ratio:.3f} of the bound {bound} "
                     f"({verdict(ratio, bound_target, True)} >= {bound_target})")
        m = e.get("ms_budget")
        if m:
            ms_rows.append([e["model"], e["batch"], f"{m['target_ms']:.1f}", f"{m['expected_ms']:.1f}",
                            f"{m['early_exit_ms']:.1f}", fractions_cell(m["exit_fractions"]),
                            f"{m['flops_saving']:.2f}x", ratio_cell(m, "fair_bound", "{:.2f}", "x"),
                            ratio_cell(m, "speedup", "{:.2f}", "x"), ratio_cell(m, "vs_bound", "{:.2f}")])
            lines.append(f"{e['model']} early exit, ms budget {m['target_ms']:.1f} ms (batch {e['batch']}): speed-up "
                         f"{m['speedup']:.3f}x ({verdict(m['speedup'], speed_target, True)} >= {speed_target}); "
                         f"{m['vs_bound']:.3f} of the fair bound {m['fair_bound']:.2f}x "
                         f"({verdict(m['vs_bound'], bound_target, True)} >= {bound_target})")
    rep.text("**FLOPs budget.** Thresholds calibrated (MSDNet geometric, what `coopnets.calibrate(target_flops=...)` "
             "does) on the measured batch for a FLOPs budget halfway between depth 1 and full depth (exit heads on the "
             f"way counted). Targets: speed-up over full depth >= {speed_target}x; `speed-up / FLOPs saving` >= "
             f"{TARGETS['early_exit_vs_flops']}.",
             "`fair bound`: the speed-up these exit fractions would give if each sample cost what a batch that all "
             "leaves at its exit costs (`EarlyExit.leave_at`: the backbone to the exit and every exit head on the way, "
             "each depth timed interleaved with the early-exit pass on the same batch), with the exit decisions and "
             "the compaction free: what early exit could at best give on this machine with these heads (target: "
             f"speed-up >= {bound_target} x the bound). The bound and `speed-up / fair bound` are medians of their "
             "per-round values (a round times every variant once, neighbours in time), with their intervals. Runs "
             "before issue 27 recorded a bound that also left the "
             "earlier exit heads free, marked `(heads free)`.")
    rep.table(["model", "batch", "exit fractions", "FLOPs saving", "fair bound", "full ms", "early-exit ms",
               "speed-up", "speed-up / FLOPs saving", "speed-up / fair bound"], rows)
    if ms_rows:
        rep.text("**Milliseconds budget.** Thresholds calibrated as `coopnets.calibrate(target_ms=..., "
                 "batch_size=...)` does, for a budget halfway between depth 1's and full depth's latency measured here "
                 "(a batch that all leaves at one depth, `EarlyExit.depth_latency`, measured once for the budget and "
                 "the fit); `expected ms`: what the thresholds spend on those costs (decisions and compaction not "
                 "included); `early-exit ms`: the measured pass, interleaved with the rest (the load may have "
                 "moved in between).")
        rep.table(["model", "batch", "budget ms", "expected ms", "early-exit ms", "exit fractions", "FLOPs saving",
                   "fair bound", "speed-up", "speed-up / fair bound"], ms_rows)
    phase_rows = [[e["model"], *(f"{e['phases_ms'].get(k, 0.0):.1f} ({100 * e['phases_ms'].get(k, 0.0) / total:.0f} %)"
                                 for k in PHASES)]
                  for e in results["early_exit"] if e.get("phases_ms") for total in [sum(e["phases_ms"].values())]]
    if phase_rows:
        rep.text("`phases`: where the FLOPs-budget early-exit pass spends its time (`EarlyExit(x, timings=...)`, "
                 "mean ms per call): the backbone segments, the exit heads of every sample still running, the exit "
                 "decisions and the compaction of the live state.")
        rep.table(["model", *(f"{k} ms" for k in PHASES)], phase_rows)
    return lines


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
    early_exit_lines = early_exit_section(rep, results)
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
    rep.bullets(lines + early_exit_lines)
    rep.image(f"{NAME}.png", "latency vs depth")
    return rep


def config_label(run: Mapping[str, Any]) -> str:
    return f"b{run['batch']} t{run['threads']}"


def beyond_noise(run: Mapping[str, Any], depth: int, limits: Sequence[float]) -> bool:
    """Whether ``run`` misses at ``depth`` with its whole interval above the limit (not only its median)."""
    return run["share_lo"][depth - 1] > limits[depth - 1]


def share_cell(run: Mapping[str, Any], depth: int, limits: Sequence[float]) -> str:
    """Median latency share with its interval; over the limit: bold, and whether beyond the noise."""
    share, lo, hi = (run[k][depth - 1] for k in ("share", "share_lo", "share_hi"))
    if depth not in run["missed"]:
        return f"{share:.2f} [{lo:.2f}, {hi:.2f}]"
    return f"**{share:.2f}** [{lo:.2f}, {hi:.2f}] " + ("missed" if beyond_noise(run, depth, limits) else "over?")


def why_missed(entry: Mapping[str, Any]) -> List[str]:
    """One sentence per miss beyond the noise (:func:`beyond_noise`) of a zoo entry, from its per-step figures:
    how fast the part of the network up to that exit runs against the rest, and how much of it the exit head
    takes."""
    st = entry.get("stages")
    if not st:
        return []
    limits = share_limits(entry["flops_share"])
    out = []
    timings = {(r["batch"], r["threads"]): r["step_ms"] for r in st["runs"]}  # every run with misses has one

    def rate(steps: Sequence[int], ms: Sequence[float], bs: int) -> Tuple[float, float]:
        """Achieved GFLOP/s and FLOPs per byte moved of ``steps`` at batch ``bs``."""
        flops = sum(st["flops"][i] for i in steps) * bs
        moved = sum(2 * st["activation_bytes"][i] * bs + st["weight_bytes"][i] for i in steps)
        return flops / sum(ms[i] for i in steps) / 1e6, flops / moved

    for run in entry["runs"]:
        for depth in (d for d in run["missed"] if beyond_noise(run, d, limits)):
            ms, bs = timings[run["batch"], run["threads"]], run["batch"]
            mine = [0, *range(1, 2 * depth, 2), 2 * depth]  # the stem, the advances to exit `depth`, its head
            rest = range(2 * depth + 1, len(ms), 2)  # the later advances and the finish (the last step)
            (g_mine, i_mine), (g_rest, i_rest) = rate(mine, ms, bs), rate(rest, ms, bs)
            head_ms, head_flops = ms[2 * depth], st["flops"][2 * depth]
            depth_ms, depth_flops = sum(ms[i] for i in mine), sum(st["flops"][i] for i in mine)
            out.append(f"{entry['model']} depth {depth} ({config_label(run)}): latency share "
                       f"{run['share'][depth - 1]:.2f} > {limits[depth - 1]:.2f}. Up to exit {depth} it runs at "
                       f"{g_mine:.1f} GFLOP/s ({i_mine:.1f} FLOPs/byte moved), the rest of the backbone at "
                       f"{g_rest:.1f} GFLOP/s ({i_rest:.1f} FLOPs/byte); exit head {depth} takes "
                       f"{100 * head_ms / depth_ms:.1f} % of depth {depth}'s time for "
                       f"{100 * head_flops / depth_flops:.1f} % of its FLOPs.")
    return out


def zoo_report_of(results: Mapping[str, Any]) -> harness.Report:
    """The zoo report, from the results (fresh, or a saved ``latency_zoo.json``)."""
    rep = harness.Report.from_meta(ZOO_NAME, ZOO_TITLE, results)
    zoo, ee = results["zoo"], results["early_exit_settings"]
    configs = [config_label(r) for r in zoo["models"][0]["runs"]] if zoo["models"] else []
    rep.text(f"Zoo table: input {zoo['img_size']}x{zoo['img_size']}, batch sizes {zoo['batch_sizes']}, torch threads "
             f"{zoo['threads']}, {zoo['repeats']} interleaved repeats after {zoo['warmup']} warm-up per depth. Early "
             f"exit: input {ee['img_size']}x{ee['img_size']}, batch {ee['batch']}, {ee['threads']} torch thread(s), "
             f"{ee['repeats']} interleaved repeats. Random-init weights (latency does not depend on them).")
    rep.heading("Latency share vs FLOPs share per depth")
    rep.text("`FLOPs share`: FLOPs of a forward at depth k (the backbone to exit k and exit head k) / full depth's. "
             "`bN tM`: latency share at batch N with M torch threads: median of the per-repeat ratios latency of "
             "depth k / latency of full depth, every depth timed interleaved, with its distribution-free 95 % "
             "interval (with 5 repeats: their range). Target: every depth k < D costs at most its FLOPs share + "
             f"{TARGETS['share_over_flops']} of the full latency, depth D-1 at most {TARGETS['share_last_exit']} "
             "(`limit`); a median over its limit is **bold**: `missed` when the whole interval is over the limit too, "
             "`over?` when the interval reaches below it (a miss within the noise of this run).")
    rows = []
    for e in zoo["models"]:
        limits = share_limits(e["flops_share"])
        for d in range(1, e["num_depths"]):
            cells = [share_cell(r, d, limits) for r in e["runs"]]
            outcome = ("**missed**" if any(beyond_noise(r, d, limits) for r in e["runs"] if d in r["missed"])
                        else "missed within noise" if any(d in r["missed"] for r in e["runs"]) else "met")
            rows.append([e["model"], d, f"{e['flops_share'][d - 1]:.2f}", f"{limits[d - 1]:.2f}", *cells, outcome])
    rep.table(["model", "depth", "FLOPs share", "limit", *configs, "target"], rows)
    rep.text("Full-depth latency (ms, median):")
    rep.table(["model", *configs], [[e["model"], *(f"{r['depth_ms'][-1]:.1f}" for r in e["runs"])]
                                    for e in zoo["models"]])
    staged = [e for e in zoo["models"] if e.get("stages")]
    if staged:
        rep.heading("Why: per-step figures of the models that miss")
        rep.text("Steps as the early-exit runner takes them (`EarlyExit.step_flops` / `step_latency`: every step timed "
                 "inside one full pass, medians). `MFLOPs`: per image. `act MB`: what the step's leaf modules write "
                 "per image (each is read back at least once); `weights MB`: parameters and buffers it reads. "
                 "`FLOPs/B (bN)`: FLOPs per byte moved at batch N, bytes moved = 2 x activations x N + weights. "
                 "`bN tM`: the step's measured ms and the GFLOP/s it achieved. Low FLOPs per byte and low GFLOP/s "
                 "mark a memory-bound step.")
        for e in staged:
            st = e["stages"]
            batches = sorted({r["batch"] for r in st["runs"]})
            rep.text(f"**{e['model']}**")
            step_rows = []
            for i, name in enumerate(st["steps"]):
                f, a, w = st["flops"][i], st["activation_bytes"][i], st["weight_bytes"][i]
                step_rows.append([name, f"{f / 1e6:.1f}", f"{a / 1e6:.2f}", f"{w / 1e6:.2f}",
                                  *(f"{f * b / max(2 * a * b + w, 1):.1f}" for b in batches),
                                  *(f"{r['step_ms'][i]:.2f} ({f * r['batch'] / r['step_ms'][i] / 1e6:.1f})"
                                    if r["step_ms"][i] > 0 else "-" for r in st["runs"])])
            rep.table(["step", "MFLOPs", "act MB", "weights MB", *(f"FLOPs/B (b{b})" for b in batches),
                       *(config_label(r) for r in st["runs"])], step_rows)
        rep.text("Why, for every miss beyond the noise (the median of the per-step times of that configuration):")
        rep.bullets(line for e in staged for line in why_missed(e))
    rep.heading("Early exit with compaction")
    early_exit_lines = early_exit_section(rep, results)
    rep.heading("Targets")
    lines = [f"Latency share <= FLOPs share + {TARGETS['share_over_flops']} (depth D-1 <= "
             f"{TARGETS['share_last_exit']}) met at every depth and configuration by: "
             f"{', '.join(e['model'] for e in zoo['models'] if not any(r['missed'] for r in e['runs'])) or 'none'}."]
    for e in zoo["models"]:
        limits = share_limits(e["flops_share"])
        for d in range(1, e["num_depths"]):
            over = [r for r in e["runs"] if d in r["missed"]]
            if over:
                lines.append(f"{e['model']} depth {d}: " + ", ".join(
                    config_label(r) + (" **missed**" if beyond_noise(r, d, limits) else " over within noise")
                    for r in over))
    rep.bullets(lines + early_exit_lines)
    rep.image(f"{ZOO_NAME}.png", "latency share vs FLOPs share per depth")
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


def plot_zoo(results: Mapping[str, Any]) -> Any:
    """Latency share per depth (one line per configuration) against FLOPs share and the target's limit, one panel
    per model."""
    plt = harness.pyplot()
    entries = results["zoo"]["models"]
    cols = min(4, max(len(entries), 1))
    rows = max(1, math.ceil(len(entries) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.2 * rows), squeeze=False)
    for ax, e in itertools.zip_longest(axes.flat, entries):
        if e is None:
            ax.axis("off")
            continue
        depths = list(range(1, e["num_depths"] + 1))
        ax.plot(depths, e["flops_share"], "k--o", label="FLOPs share")
        ax.plot(depths[:-1], share_limits(e["flops_share"]), "v", color="grey", label="target limit")
        for r in e["runs"]:
            ax.plot(depths, r["share"] + [1.0], "-o", ms=3, label=f"latency, {config_label(r)}")
        ax.set_title(e["model"].replace("coop_", ""), fontsize=9)
        ax.set_xticks(depths)
        ax.set_ylim(0, max([1.1] + [v + 0.05 for r in e["runs"] for v in r["share"]]))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("share of full depth")
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    return fig


def run_zoo(args: argparse.Namespace) -> Dict[str, Any]:
    """The ``--zoo`` measurements: the latency-share table (per-step figures where a model misses), then early exit."""
    quick = args.quick
    models = args.models or list(QUICK_MODELS if quick else zoo_cnns())
    ee_models = args.early_exit_models or list(QUICK_EARLY_EXIT_MODELS if quick else EARLY_EXIT_MODELS)
    batch_sizes, threads = args.batch_sizes or [1, 8], args.threads or [1, 2]
    repeats, warmup = args.repeats or (3 if quick else 5), args.warmup
    size = (3, args.img_size, args.img_size)
    ee_threads, ee_repeats = args.early_exit_threads, repeats if quick else args.early_exit_repeats
    results: Dict[str, Any] = {
        "zoo": {"img_size": args.img_size, "batch_sizes": batch_sizes, "threads": threads, "repeats": repeats,
                "warmup": warmup, "models": []},
        "early_exit_settings": {"img_size": args.early_exit_img_size, "batch": args.early_exit_batch,
                                "threads": ee_threads, "repeats": ee_repeats, "warmup": warmup},
        "early_exit": []}
    bar = harness.progress_bar(total=len(models) + len(ee_models), desc="zoo", unit="model")
    with torch.inference_mode():
        for name in models:
            bar.set_description(name)
            model = build(name, args.img_size)
            flops_share = [r["flops_ratio"] for r in profile(model, size, repeats=1, warmup=0, print_table=False)]
            entry = {"model": name, "num_depths": model.num_depths, "flops_share": flops_share,
                     "runs": bench_shares(model, flops_share, size, batch_sizes, threads, repeats, warmup)}
            missed = [(r["batch"], r["threads"]) for r in entry["runs"] if r["missed"]]
            if missed:
                entry["stages"] = bench_stages(model, size, missed, repeats, warmup)
            results["zoo"]["models"].append(entry)
            bar.write(f"{name}: " + "; ".join(f"{config_label(r)} shares " + " ".join(f"{v:.2f}" for v in r["share"])
                                              + (f" missed {r['missed']}" if r["missed"] else "")
                                              for r in entry["runs"]))
            bar.update(1)
        ee_size = (3, args.early_exit_img_size, args.early_exit_img_size)
        before = torch.get_num_threads()
        torch.set_num_threads(ee_threads)
        try:
            for name in ee_models:
                bar.set_description(f"{name} early exit")
                x = torch.randn(args.early_exit_batch, *ee_size)
                e = bench_early_exit(build(name, args.early_exit_img_size), x, ee_repeats, warmup)
                results["early_exit"].append({"model": name, "batch": args.early_exit_batch, **e})
                bar.write(f"{name} early exit: speed-up {e['speedup']:.2f}x, fair bound {e['fair_bound']:.2f}x, "
                          f"ms budget speed-up {e['ms_budget']['speedup']:.2f}x")
                bar.update(1)
        finally:
            torch.set_num_threads(before)
    bar.close()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=None,
                   help=f"default: {' '.join(DEFAULT_MODELS)}; with --zoo every zoo CNN "
                        f"(--quick: {' '.join(QUICK_MODELS)})")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=None, help="default 1 32 (--zoo: 1 8)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=None,
                   help="interleaved timed repeats per variant (default 5; --quick 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per variant first (compile: includes compilation)")
    p.add_argument("--compile", action="store_true", help="also measure torch.compile'd wrapper and timm reference")
    p.add_argument("--compile-batch-sizes", nargs="+", type=int, default=None,
                   help="batch sizes to measure compiled (default: all of --batch-sizes)")
    p.add_argument("--no-early-exit", action="store_true")
    p.add_argument("--zoo", action="store_true",
                   help=f"the zoo's latency-share table and early exit instead: writes {ZOO_NAME}.md/.json/.png")
    p.add_argument("--quick", action="store_true",
                   help="--zoo in a few minutes (two models, 3 repeats) for development")
    p.add_argument("--threads", nargs="+", type=int, default=None, help="--zoo: torch thread counts (default 1 2)")
    p.add_argument("--early-exit-models", nargs="+", default=None,
                   help=f"--zoo: early-exit models (default {' '.join(EARLY_EXIT_MODELS)})")
    p.add_argument("--early-exit-batch", type=int, default=EARLY_EXIT_BATCH, help="--zoo: early-exit batch size")
    p.add_argument("--early-exit-img-size", type=int, default=EARLY_EXIT_IMG_SIZE, help="--zoo: early-exit input size")
    p.add_argument("--early-exit-repeats", type=int, default=10,
                   help="--zoo: interleaved repeats of the early-exit run (default 10; --quick: --repeats)")
    p.add_argument("--early-exit-threads", type=int, default=1,
                   help="--zoo: torch threads for early exit (default 1: a second thread on a shared 2-core machine "
                        "spins against other processes, see the table's t2 columns)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--from-json", type=Path, default=None,
                   help="only re-render the report and figure from a saved latency.json or latency_zoo.json")
    args = p.parse_args(argv)
    if args.from_json:
        results = json.loads(args.from_json.read_text())
        zoo = "zoo" in results
        rep = zoo_report_of(results) if zoo else report_of(results)
        rep.keep_handwritten(Path(args.out) / f"{rep.name}.md")
        rep.write(args.out, figure=plot_zoo(results) if zoo else plot(results))
        return 0
    if args.zoo or args.quick:
        run = harness.Report.start(ZOO_NAME, ZOO_TITLE, __file__, argv, torch_threads="per table column")
        results = run_zoo(args)
        results.update(run.finish().meta())
        rep = zoo_report_of(results)
        rep.keep_handwritten(Path(args.out) / f"{ZOO_NAME}.md")
        paths = rep.write(args.out, data=results, figure=plot_zoo(results))
        print(f"wrote {paths['md']}, {paths['json'].name} and {paths['png'].name} in {run.elapsed_s / 60:.1f} min")
        return 0
    args.models = args.models or list(DEFAULT_MODELS)
    args.batch_sizes = args.batch_sizes or [1, 32]
    args.repeats = args.repeats or 5
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
                             f"{e['flops_saving']:.2f}x, fair bound {e['fair_bound']:.2f}x, fractions "
                             f"{e['exit_fractions']}")
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
