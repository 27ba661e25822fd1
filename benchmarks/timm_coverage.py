"""Which timm modules coopnets covers: wrap, every depth, nested FLOPs, export, real early exit.

For the smallest model (by parameter count, under 100M) of every timm module
(``timm.list_modules()``), built with ``pretrained=False``:

1. ``wrap``: ``coopnets.wrap(name, num_classes=10)``;
2. ``depths``: a forward pass at every depth;
3. ``nested``: FLOPs (``torch.utils.flop_counter``) strictly increasing over depths;
4. ``export``: ``model.export(depth=k)`` equal to ``set_depth(k)`` for every ``k``;
5. ``early exit``: :class:`coopnets.EarlyExit` equal to ``ee.simulate(model.forward_exits(x))``
   (same exit depths, logits within 1e-4), thresholds set so samples leave at several depths.

Writes ``timm_coverage.md`` and ``.json`` to ``--out`` (default ``benchmarks/results/``),
rewritten after every model. Each model runs in a child process with a timeout (skipped
with a reason past it).

    python benchmarks/timm_coverage.py --size 64 --batch 4 --timeout 60
"""
from __future__ import annotations

import argparse
import sys
import json
import multiprocessing as mp
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional

import harness

NAME = "timm_coverage"
FEATURES = ("wrap", "depths", "nested", "export", "early_exit")
MAX_PARAMS = 100e6


def short(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return f"{type(err).__name__}: {text[:150]}"


def param_count(name: str) -> Optional[int]:
    import timm
    import torch

    try:
        with torch.device("meta"):
            m = timm.create_model(name, pretrained=False)
        return sum(p.numel() for p in m.parameters())
    except Exception:
        return None


SMALL_WORDS = ("test_", "atto", "femto", "pico", "nano", "tiny", "xxs", "xs", "small", "mini", "micro", "_t", "_s", "050", "035", "018", "002", "lite")


def candidates(names: List[str], limit: int = 6) -> List[str]:
    """Names worth sizing: the ones that sound small (``tiny``, ``nano``, ``050``...) first, at most ``limit``
    (sizing every variant of large modules on the meta device takes minutes on 2 cores)."""
    small = [n for n in names if any(w in n for w in SMALL_WORDS)]
    return (small or names)[:limit] if len(names) > limit else names


def pick_models(modules: List[str]) -> Dict[str, Any]:
    """The smallest model of every module (by parameter count, built on the meta device) among :func:`candidates`."""
    import timm

    picked: Dict[str, Any] = {}
    for module in harness.progress_bar(modules, desc="sizing", unit="module"):
        best = None
        for name in candidates(timm.list_models(module=module)):
            n = param_count(name)
            if n is not None and n < MAX_PARAMS and (best is None or n < best[1]):
                best = (name, n)
        picked[module] = best
    return picked


def spread(all_logits, criterion="confidence"):
    """Per-exit confidence thresholds at the median score, so the batch splits across depths."""

    from coopnets.inference.early_exit import confidence_score

    out = []
    for logits in all_logits[:-1]:
        s = confidence_score(logits, criterion).sort().values
        i = min(len(s) // 2, len(s) - 2)
        out.append(float((s[i] + s[i + 1]) / 2))
    return out


def check_model(name: str, size: int, batch: int) -> Dict[str, Any]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import coopnets
    from coopnets.inference.early_exit import EarlyExit

    torch.manual_seed(0)
    torch.set_num_threads(1)
    res: Dict[str, Any] = {f: None for f in FEATURES}
    try:
        m = coopnets.wrap(name, num_classes=10).eval()
    except Exception as e:
        res["wrap"] = short(e)
        return res
    res["wrap"] = "ok"
    res["num_depths"] = m.num_depths
    cfg = m.pretrained_cfg
    hw = tuple(cfg["input_size"][-2:]) if cfg.get("fixed_input_size") else (size, size)
    x = torch.randn(batch, m.in_chans, *hw)
    res["input"] = list(x.shape)
    try:
        with torch.inference_mode():
            outs = [m.forward_depth(x, d) for d in range(1, m.num_depths + 1)]
        assert all(o.shape == (batch, 10) for o in outs), "wrong logits shape"
        res["depths"] = "ok"
    except Exception as e:
        res["depths"] = short(e)
        return res
    try:
        flops = []
        for d in range(1, m.num_depths + 1):
            with FlopCounterMode(display=False) as c, torch.inference_mode():
                m.forward_depth(x[:1], d)
            flops.append(int(c.get_total_flops()))
        res["flops_ratio"] = [round(f / flops[-1], 3) for f in flops]
        res["nested"] = "ok" if all(a < b for a, b in zip(flops, flops[1:])) else f"not increasing: {flops}"
    except Exception as e:
        res["nested"] = short(e)
    try:
        bad = []
        for d in range(1, m.num_depths + 1):
            with torch.inference_mode():
                a, b = m.export(depth=d)(x), m.set_depth(d)(x)
            if not torch.allclose(a, b, atol=1e-4, rtol=1e-4):
                bad.append(d)
        m.set_depth(-1)
        res["export"] = "ok" if not bad else f"differs at depths {bad}"
    except Exception as e:
        res["export"] = short(e)
    try:
        with torch.inference_mode():
            all_logits = m.forward_exits(x)
        ee = EarlyExit(m, "confidence", spread(all_logits), image_size=tuple(x.shape[1:]))
        res["ee_path"] = ee.runner(x.shape[1:]).kind
        real, sim = ee(x), ee.simulate(all_logits, x.shape[1:])
        if not torch.equal(real.exit_depths, sim.exit_depths):
            res["early_exit"] = f"exit depths differ: {real.exit_depths.tolist()} vs {sim.exit_depths.tolist()}"
        elif not torch.allclose(real.logits, sim.logits, atol=1e-4, rtol=1e-4):
            res["early_exit"] = f"logits differ by {float((real.logits - sim.logits).abs().max()):.2e}"
        else:
            res["early_exit"] = "ok"
            res["exit_depths"] = real.exit_depths.tolist()
    except Exception as e:
        res["early_exit"] = short(e)
    return res


def _child(name, size, batch, queue):
    try:
        queue.put(check_model(name, size, batch))
    except BaseException as e:  # noqa: BLE001
        queue.put({"wrap": short(e), "trace": traceback.format_exc()[-400:]})


def run_one(name: str, size: int, batch: int, timeout: float) -> Dict[str, Any]:
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(name, size, batch, queue))
    t = time.time()
    proc.start()
    try:
        res = queue.get(timeout=timeout)
    except Exception:
        res = {f: None for f in FEATURES}
        res["timeout"] = f"skipped: took more than {timeout:.0f} s"
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()
    res["seconds"] = round(time.time() - t, 1)
    return res


def cell(v: Optional[str]) -> str:
    if v is None:
        return "-"
    return "ok" if v == "ok" else "FAIL: " + v.replace("|", "/")[:110]


def write(results: Dict[str, Dict[str, Any]], picked: Dict[str, Any], args: argparse.Namespace,
          report: harness.Report) -> Dict[str, int]:
    """Write the table and the JSON so far (``report``: the run's record, its clock still running)."""
    modules = sorted(picked)
    total = len(modules)
    counts = {f: sum(1 for m in modules if results.get(m, {}).get(f) == "ok") for f in FEATURES}
    report.finish()
    report.clear()
    report.text(f"Smallest model (parameters, < 100M, `pretrained=False`) of each of {total} timm modules; "
                f"input {args.size} px (or the model's fixed size), batch {args.batch}, {args.timeout:.0f} s per model.")
    report.table(["feature", "modules"], [[f, f"{counts[f]} of {total}"] for f in FEATURES])
    report.text("`early_exit` = real early exit with compaction equal to `EarlyExit.simulate(model.forward_exits(x))` "
                "(exit depths equal, logits within 1e-4); path = hand-written stage layout or generic traced segments.")
    rows = []
    for m in modules:
        r = results.get(m, {})
        model = (picked[m] or ["(none < 100M)"])[0]
        wrap = cell(r.get("wrap")) if "timeout" not in r else r["timeout"]
        ratio = ", ".join(f"{v:.2f}" for v in r.get("flops_ratio", []))
        rows.append([m, model, wrap, cell(r.get("depths")), cell(r.get("nested")), cell(r.get("export")),
                     cell(r.get("early_exit")), r.get("ee_path", "-"), ratio, r.get("seconds", "-")])
    report.table(["module", "model", "wrap", "depths", "nested", "export", "early exit", "path",
                  "FLOPs ratio per depth", "s"], rows)
    meta = {"modules": total, "totals": counts, "size": args.size, "batch": args.batch, "timeout": args.timeout}
    report.write(args.out, data={"meta": meta, "models": {m: {"model": (picked[m] or [None])[0], **results.get(m, {})}
                                                         for m in modules}})
    return counts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=64, help="input px for models without a fixed input size")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per model before it is skipped")
    p.add_argument("--modules", nargs="*", help="only these timm modules")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results",
                   help="folder for timm_coverage.md and .json")
    args = p.parse_args(argv)
    import timm

    report = harness.Report.start(NAME, "timm coverage", __file__, argv)
    modules = args.modules or timm.list_modules()
    picked = pick_models(modules)
    results: Dict[str, Dict[str, Any]] = {}
    bar = harness.progress_bar(sorted(picked), desc="coverage", unit="model")
    for module in bar:
        if picked[module] is None:
            results[module] = {"wrap": "no model under 100M parameters that builds"}
            continue
        bar.set_postfix_str(picked[module][0])
        results[module] = run_one(picked[module][0], args.size, args.batch, args.timeout)
        write(results, picked, args, report)
    counts = write(results, picked, args, report)
    print(json.dumps(counts), f"of {len(picked)} modules")


if __name__ == "__main__":  # one error policy for every entry point: one line and exit code 2 for a bad input
    from coopnets.cli.errors import run_entry

    sys.exit(run_entry(main, prog="benchmarks/timm_coverage.py"))
