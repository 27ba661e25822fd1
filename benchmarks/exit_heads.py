"""Exit head cost benchmark: each exit head's latency against its depth's, per zoo entry and head kind.

The design rule (issue 27, "exits that pay"): an exit head costs at most ``--limit`` (10 %) of the
latency of the depth it ends, at batch 1 and 8, 224 px, one thread. For every zoo entry
(untrained, its default ``num_classes``) and every head kind (:data:`coopnets.models.exit_head.EXIT_HEAD_KINDS`),
for each batch size and each exit ``k`` this times, interleaved (:func:`harness.time_interleaved`):

* the trunk of depth ``k``: the stem and the stages up to exit ``k``
  (``model.depth_plan.runner.map_at(x, k - 1)``, what ``forward_depth`` runs before the head);
* each kind's exit head ``k`` alone on that trunk's feature map (a sample runs it as many times
  as :data:`HEAD_TIMING_S` takes and counts the mean: a call of microseconds, timed alone,
  measures the scheduler of a busy machine more than itself).

A head's ``share`` is ``head / (trunk + head)`` per round (the trunk timed in the same round), the
median of those with its distribution-free 95 % interval; depth ``k``'s latency is ``trunk + head``.
A kind *meets* the rule on an entry when its median share is at most ``--limit`` at every exit
and batch size; on a family (the backbone class: ``ResNet``, ``MobileNetV3``...) when it meets it
on every measured entry. The family's default is the first kind of :data:`PREFERENCE` (strongest
first) that *surely* meets it there (the upper end of the interval within the limit, and the FLOPs
share too: :func:`first_meeting`); transformer families keep ``linear`` (their features are
already global) and are checked against the rule; ``other CNNs`` (every CNN entry together) gives
the default of a CNN family not measured. The report sets each choice beside coopnets'
``head="auto"`` (:func:`coopnets.models.exit_head.head_kind_for`).

Writes ``exit_heads.md``, ``exit_heads.json`` and ``exit_heads.png`` to ``--out``; ``--from-json``
re-renders the first and the last from a saved ``exit_heads.json``. A hand-written section
already in ``--out``'s ``exit_heads.md`` (a heading that says "(written by hand") is kept.

Example (``--quick``: one entry per family, 5 repeats, under two minutes on one core; the full run,
every zoo entry and 9 repeats, takes under ten):
    python benchmarks/exit_heads.py --quick --out /tmp/exit_heads
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

import coopnets
import harness
from coopnets.models.exit_head import EXIT_HEAD_KINDS, OTHER_CNN_HEAD, head_kind_for, is_transformer

NAME = "exit_heads"
TITLE = "Exit head cost (CPU, one thread)"
#: head kinds, strongest first (capacity: spatial convolutions, a learned map before pooling, a hidden
#: layer after it, a learned pooling, a linear probe): a family's default is the first that meets the rule
PREFERENCE = ("conv", "reduce", "mlp", "mixpool", "linear")
#: a head's timed sample lasts about this long (seconds): it runs the head as many times as that takes
HEAD_TIMING_S = 0.002
#: ``--quick``'s entries: the smallest zoo entry of each family
QUICK_MODELS = ("coop_convnext_tiny", "coop_efficientnet_b0", "coop_mobilenetv3_large_100", "coop_regnety_016",
                "coop_resnet18", "coop_vit_small_patch16_224")


def build_heads(name: str, kinds: Sequence[str]) -> Tuple[coopnets.DepthAdaptiveModel, Dict[str, torch.nn.ModuleList]]:
    """Zoo entry ``name`` (eval, its default head) and its exit heads of every kind (those
    ``create_model(name, head=kind)`` builds), by kind."""
    model = coopnets.create_model(name).eval()
    return model, {kind: coopnets.create_model(name, head=kind).exits.eval() for kind in kinds}


def share_interval(trunk: Sequence[float], head: Sequence[float]) -> harness.MedianInterval:
    """Median of the per-round shares ``head / (trunk + head)`` with its distribution-free interval.

    Example:
        >>> share_interval([9.0, 9.0, 18.0], [1.0, 1.0, 2.0])["median"]
        0.1
    """
    return harness.median_interval([h / (t + h) for t, h in zip(trunk, head)])


def repeated(fn: Callable[[], Any], target_s: float) -> Tuple[Callable[[], None], int]:
    """``fn`` called ``n`` times in a row (``n`` such that the calls last about ``target_s``, at least once), and
    ``n``: a call of a few microseconds, timed alone, would measure the clock and the scheduler more than itself.

    Example:
        >>> looped, n = repeated(lambda: None, 0.0)
        >>> n
        1
    """
    fn()
    start = time.perf_counter()
    fn()
    n = max(1, math.ceil(target_s / max(time.perf_counter() - start, 1e-9)))

    def run() -> None:
        for _ in range(n):
            fn()

    return run, n


def bench_entry(name: str, kinds: Sequence[str], batch_sizes: Sequence[int], img_size: int, repeats: int,
                warmup: int, bar: Any) -> Dict[str, Any]:
    """One zoo entry: per batch size and exit, the trunk and every kind's head, interleaved."""
    model, heads = build_heads(name, kinds)
    runner = model.depth_plan.runner
    exits = len(model.exits)
    bar.total += len(batch_sizes) * exits * (1 + len(kinds)) * (warmup + repeats)
    bar.refresh()
    flops = head_flops_shares(model, heads, img_size)
    rows = []
    for bs in batch_sizes:
        x = torch.randn(bs, 3, img_size, img_size)
        for k in range(exits):
            fmap = runner.map_at(x, k)
            fns: Dict[str, Callable[[], Any]] = {"trunk": lambda k=k: runner.map_at(x, k)}
            calls = {}
            for kind in kinds:
                fns[kind], calls[kind] = repeated(lambda h=heads[kind][k]: h(fmap), HEAD_TIMING_S)
            t = harness.time_interleaved(fns, repeats, warmup, bar=bar)
            trunk = t.times["trunk"]
            row: Dict[str, Any] = {"batch": bs, "depth": k + 1, "map": list(fmap.shape[1:]),
                                   "trunk_ms": 1e3 * t.median("trunk"), "heads": {}}
            for kind in kinds:
                head = [s / calls[kind] for s in t.times[kind]]
                iv = share_interval(trunk, head)
                row["heads"][kind] = {"head_ms": 1e3 * statistics.median(head), "calls": calls[kind],
                                      "share": iv["median"], "share_lo": iv["lo"], "share_hi": iv["hi"],
                                      "flops_share": flops[kind][k]}
            rows.append(row)
    family = type(model.backbone).__name__
    return {"model": name, "family": family, "transformer": is_transformer(model.backbone), "rows": rows}


def head_flops_shares(model: coopnets.DepthAdaptiveModel, heads: Mapping[str, Any],
                      img_size: int) -> Dict[str, List[float]]:
    """Per kind and exit: the head's FLOPs / (trunk + head) FLOPs, at batch 1 (``torch.utils.flop_counter``)."""
    from torch.utils.flop_counter import FlopCounterMode

    def count(fn) -> int:
        with FlopCounterMode(display=False) as counter:
            fn()
        return int(counter.get_total_flops())

    x = torch.randn(1, 3, img_size, img_size)
    runner = model.depth_plan.runner
    out: Dict[str, List[float]] = {kind: [] for kind in heads}
    with torch.inference_mode():
        for k in range(len(model.exits)):
            fmap = runner.map_at(x, k)
            trunk = count(lambda: runner.map_at(x, k))
            for kind, mods in heads.items():
                head = count(lambda: mods[k](fmap))
                out[kind].append(head / (trunk + head))
    return out


def worst_share(entry: Mapping[str, Any], kind: str, batch: int, key: str = "share") -> float:
    """The largest ``key`` (``share``: the median; ``share_hi``: its interval's upper end; ``flops_share``) of
    ``kind``'s heads over the exits of ``entry`` at ``batch``."""
    return max(r["heads"][kind][key] for r in entry["rows"] if r["batch"] == batch)


def meets(entries: Sequence[Mapping[str, Any]], kind: str, results: Mapping[str, Any], key: str = "share") -> bool:
    """Whether ``kind``'s worst ``key`` (see :func:`worst_share`) is within the limit on every entry and batch size."""
    return all(worst_share(e, kind, b, key) <= results["limit"] for e in entries for b in results["batch_sizes"])


def first_meeting(entries: Sequence[Mapping[str, Any]], results: Mapping[str, Any]) -> Optional[str]:
    """The first kind of :data:`PREFERENCE` measured that *surely* meets the rule on ``entries``: the upper end of
    its share's 95 % interval within the limit (a kind just under it by the median could miss it on a rerun), and
    its FLOPs share too (a head that meets it only by running faster per FLOP than its trunk, a 1x1 convolution
    beside depthwise ones, would hang on this machine's speed)."""
    return next((k for k in PREFERENCE if k in results["kinds"] and meets(entries, k, results, "share_hi")
                 and meets(entries, k, results, "flops_share")), None)


def families(results: Mapping[str, Any]) -> Dict[str, Dict[str, Any]]:
    """Per family (backbone class): its entries, per kind whether it meets the rule on all of them (median),
    the measured default (:func:`first_meeting`; transformers: ``linear``) and coopnets' (``head="auto"``).
    ``"other CNNs"`` closes it when CNN families were measured: the default for a CNN family not measured,
    the first kind that surely meets the rule on every CNN entry, against :data:`OTHER_CNN_HEAD`."""
    out: Dict[str, Dict[str, Any]] = {}
    for entry in results["entries"]:
        fam = out.setdefault(entry["family"], {"entries": [], "transformer": entry["transformer"],
                                               "default": head_kind_for(entry["family"])})
        fam["entries"].append(entry)
    cnns = [e for e in results["entries"] if not e["transformer"]]
    if cnns:
        out["other CNNs"] = {"entries": cnns, "transformer": False, "default": OTHER_CNN_HEAD}
    for fam in out.values():
        fam["meets"] = {kind: meets(fam["entries"], kind, results) for kind in results["kinds"]}
        fam["chosen"] = "linear" if fam["transformer"] else first_meeting(fam["entries"], results)
    return out


def pct(value: float, digits: int = 1) -> str:
    """``value`` (a fraction) as a percentage with ``digits`` decimals."""
    return f"{100 * value:.{digits}f} %"


def report_of(results: Mapping[str, Any]) -> harness.Report:
    """The whole report, from the results (fresh, or a saved ``exit_heads.json``)."""
    rep = harness.Report.from_meta(NAME, TITLE, results)
    limit, kinds, batches = results["limit"], results["kinds"], results["batch_sizes"]
    rep.text(f"Input {results['img_size']}x{results['img_size']}, batch sizes {', '.join(map(str, batches))}, "
             f"{results['threads']} torch thread, {results['repeats']} interleaved repeats after {results['warmup']} "
             "warm-up per variant. Untrained zoo entries at their default `num_classes` (latency does not depend on "
             "the weights). `share`: median over rounds of head / (trunk + head), the trunk (stem to the exit's "
             f"stage, what `forward_depth` runs before the head) timed in the same round. Rule: share <= {pct(limit)} "
             "at every exit and batch size.")
    fams = families(results)
    rep.heading("Per family: worst share over exits and entries, and the default")
    rep.text(f"Worst median share at batch {' / '.join(map(str, batches))}; **x**: misses the rule. Kinds in order of "
             f"preference (strongest first): {', '.join(f'`{k}`' for k in PREFERENCE)}. A CNN family's measured "
             "default is the first whose share surely meets the rule (the upper end of its 95 % interval within the "
             "limit, and its FLOPs share as well) on every entry measured; transformers keep `linear` (their features are already global). "
             "`other CNNs`: all CNN entries together, the default of a CNN family not measured. `coopnets default`: "
             "what `head=\"auto\"` resolves to (`head_kind_for`).")
    rows = []
    for family, fam in fams.items():
        cells = [" / ".join(pct(max(worst_share(e, kind, b) for e in fam["entries"])) for b in batches)
                 + ("" if fam["meets"][kind] else " **x**") for kind in kinds]
        agree = "" if fam["chosen"] == fam["default"] else " **(differs)**"
        rows.append([family, ", ".join(e["model"].replace("coop_", "") for e in fam["entries"]), *cells,
                     f"`{fam['chosen'] or 'none'}`", f"`{fam['default']}`{agree}"])
    rep.table(["family", "entries", *kinds, "measured default", "coopnets default"], rows)
    misses = [f"{e['model']}: default `{kind}` at batch {b}, worst share {pct(worst_share(e, kind, b))}"
              for e in results["entries"] for kind in [head_kind_for(e["family"])] for b in batches
              if kind in kinds and worst_share(e, kind, b) > limit]
    rep.text("Every measured zoo entry's default head meets the rule." if not misses else
             "Default heads that miss the rule:")
    rep.bullets(misses)
    rep.heading("Per entry, batch and exit")
    rep.text("`trunk ms`: median latency of the stem to the exit's stage. Per kind: the head's share of the depth's "
             "latency in % with its 95 % interval; `FLOPs` beside it: the same share in FLOPs (batch 1).")
    rep.table(["entry", "batch", "depth", "map (C, H, W)", "trunk ms", *kinds],
              [[e["model"].replace("coop_", ""), r["batch"], r["depth"], "x".join(map(str, r["map"])),
                f"{r['trunk_ms']:.2f}",
                *(harness.format_interval({"median": r["heads"][k]["share"], "lo": r["heads"][k]["share_lo"],
                                           "hi": r["heads"][k]["share_hi"]}, "{:.1f}", scale=100)
                  + f" (FLOPs {pct(r['heads'][k]['flops_share'], 2)})" for k in kinds)]
               for e in results["entries"] for r in e["rows"]])
    rep.image(f"{NAME}.png", "worst exit head share per entry and kind")
    return rep


def plot(results: Mapping[str, Any]) -> Any:
    """Per batch size: each entry's worst head share per kind (bars), the rule's limit (line)."""
    plt = harness.pyplot()
    batches, kinds, entries = results["batch_sizes"], results["kinds"], results["entries"]
    fig, axes = plt.subplots(len(batches), 1, figsize=(max(6.0, 1.1 * len(entries)), 3.2 * len(batches)),
                             squeeze=False)
    width = 0.8 / len(kinds)
    for ax, b in zip(axes[:, 0], batches):
        for i, kind in enumerate(kinds):
            ax.bar([j + (i - (len(kinds) - 1) / 2) * width for j in range(len(entries))],
                   [100 * worst_share(e, kind, b) for e in entries], width, label=kind)
        ax.axhline(100 * results["limit"], color="k", ls="--", lw=1, label=f"limit {pct(results['limit'])}")
        ax.set_xticks(range(len(entries)))
        ax.set_xticklabels([e["model"].replace("coop_", "") for e in entries], rotation=20, fontsize=7, ha="right")
        ax.set_ylabel(f"worst head share, batch {b} (%)")
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].legend(fontsize=7, ncol=len(kinds) + 1)
    fig.tight_layout()
    return fig


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=None, help="zoo entries (default: all; --quick: one per family)")
    p.add_argument("--kinds", nargs="+", default=list(EXIT_HEAD_KINDS), choices=EXIT_HEAD_KINDS)
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=None, help="interleaved timed repeats per variant (default 9; "
                                                              "--quick: 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per variant first")
    p.add_argument("--limit", type=float, default=0.10, help="the rule: a head's share of its depth's latency")
    p.add_argument("--quick", action="store_true", help=f"{', '.join(QUICK_MODELS)}; 5 repeats")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--from-json", type=Path, default=None, help="only re-render exit_heads.md/png from a saved json")
    args = p.parse_args(argv)
    if args.from_json:
        results = json.loads(args.from_json.read_text())
        rep = report_of(results)
        rep.keep_handwritten(Path(args.out) / f"{NAME}.md")
        rep.write(args.out, figure=plot(results))
        return 0
    models = args.models or list(QUICK_MODELS if args.quick else coopnets.list_models())
    unknown = [m for m in models if m not in coopnets.list_models()]
    if unknown:
        raise ValueError(f"Unknown zoo entries {unknown}; valid: {', '.join(coopnets.list_models())}.")
    if min(args.batch_sizes) < 1 or not 0 < args.limit < 1:
        raise ValueError(f"--batch-sizes must be >= 1 and --limit a fraction in (0, 1); got {args.batch_sizes} "
                         f"and {args.limit}.")
    repeats = args.repeats or (5 if args.quick else 9)
    torch.set_num_threads(1)
    run = harness.Report.start(NAME, TITLE, __file__, argv)
    results: Dict[str, Any] = {"img_size": args.img_size, "batch_sizes": args.batch_sizes, "repeats": repeats,
                               "warmup": args.warmup, "threads": 1, "limit": args.limit, "kinds": args.kinds,
                               "entries": []}
    with torch.inference_mode(), harness.progress_bar(total=0, desc="exit heads", unit="call") as bar:
        for name in models:
            bar.set_description(name)
            entry = bench_entry(name, args.kinds, args.batch_sizes, args.img_size, repeats, args.warmup, bar)
            results["entries"].append(entry)
            bar.write(f"{name}: " + "; ".join(
                f"{k} " + "/".join(pct(worst_share(entry, k, b)) for b in args.batch_sizes) for k in args.kinds))
    results.update(run.finish().meta())
    fams = families(results)
    rep = report_of(results)
    rep.keep_handwritten(Path(args.out) / f"{NAME}.md")
    paths = rep.write(args.out, data=results, figure=plot(results))
    for family, fam in fams.items():
        passing = [k for k in args.kinds if fam["meets"][k]]
        print(f"{family}: meet the {pct(args.limit)} rule: {', '.join(passing) or 'none'}; measured default "
              f"{fam['chosen']}; coopnets default {fam['default']}")
    print(f"wrote {paths['md']}, {paths['json'].name} and {paths['png'].name} in {run.elapsed_s / 60:.1f} min")
    return 0


if __name__ == "__main__":  # one error policy for every entry point: one line and exit code 2 for a bad input
    from coopnets.cli.errors import run_entry

    sys.exit(run_entry(main, prog="benchmarks/exit_heads.py"))
