"""What the serving engine costs per request: every engine and Ray Serve fast path, side by side.

For each option set (:data:`OPTION_SETS`) ``coopnets serve CHECKPOINT`` is started twice, at
depth 1 and at full depth (``--depth K``: the controller off, so the engine is all that
differs), and measured with ``coopnets.bench`` over HTTP from this machine:

* **capacity**: closed loop, ``--connections`` (16) keep-alive connections each posting the
  next PNG as soon as its answer is back, answers per second over ``--duration`` seconds
  after a 2-s warm-up;
* **light load** (depth-1 server): open-loop Poisson arrivals at ``--light-rate`` requests/s
  for ``--light-s`` seconds, p50 and p99 from each request's scheduled send time, and the
  *front-door gap*: the client's latency minus the server's own ``latency_ms``, i.e. what
  happens before the server stamps the request's arrival and after it answers (the
  stamp's distance from the TCP accept, plus the reply's way back).

**Engine ms per request** = 1000 / (capacity at depth 1) - the model's own time per image
at depth 1 in a batch of 8 on one thread (timed here, interleaved with full depth). The
target is <= 2 ms. Option sets are run one after the other; the model timing is measured in
this process before any server starts.

Example:
    python benchmarks/serving_engine.py
    python benchmarks/serving_engine.py --options local ray --duration 5
"""
from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

import harness

NAME = "serving_engine"
TITLE = "Serving engine cost per request: embedded uvicorn against Ray Serve's request paths"
OUT = harness.REPO / "benchmarks" / "results" / "serving_engine"
CHECKPOINT = harness.REPO / "benchmarks" / "results" / "serving" / "checkpoint"
#: option set -> ``coopnets serve`` arguments
OPTION_SETS: Dict[str, List[str]] = {
    "local": ["--engine", "local"],
    "ray": ["--engine", "ray", "--ray-fast-path", "none"],
    "ray-throughput": ["--engine", "ray", "--ray-fast-path", "throughput"],
    "ray-direct": ["--engine", "ray", "--ray-fast-path", "direct"],
    "ray-haproxy": ["--engine", "ray", "--ray-fast-path", "haproxy"],
}
TARGET_ENGINE_MS = 2.0


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=CHECKPOINT, help="checkpoint folder served (default: the light one)")
    p.add_argument("--options", nargs="+", choices=list(OPTION_SETS), default=list(OPTION_SETS))
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--duration", type=float, default=8.0, help="closed-loop seconds measured per server")
    p.add_argument("--light-rate", type=float, default=20.0, help="requests/s of the light-load probe")
    p.add_argument("--light-s", type=float, default=6.0)
    p.add_argument("--slo-ms", type=float, default=1000.0, help="generous: nothing is shed while capacity is measured")
    p.add_argument("--repeats", type=int, default=30, help="interleaved model timings")
    p.add_argument("--out", type=Path, default=OUT)
    return p.parse_args(argv)


def model_ms_per_image(checkpoint: Path, repeats: int) -> Dict[str, Any]:
    """The model's own ms per image at depth 1 and full depth, batch of 8, one thread (interleaved)."""
    import timm
    import torch

    import coopnets

    torch.set_num_threads(1)
    model = coopnets.create_model(f"local-dir:{checkpoint}", pretrained=True).eval()
    cfg = timm.data.resolve_data_config(model=model)
    x = torch.randn(8, *cfg["input_size"])
    full = model.num_depths

    def at(d: int) -> Any:
        def run() -> None:
            with torch.inference_mode():
                model.forward_depth(x, d)
        return run

    t = harness.time_interleaved({"depth1": at(1), f"depth{full}": at(full)}, repeats=repeats, warmup=3)
    return {"num_depths": full, "depth1_ms": 1e3 * t.median("depth1") / 8, "full_ms": 1e3 * t.median(f"depth{full}") / 8,
            "timings": t.to_dict()}


async def _closed(url: str, pngs: Sequence[bytes], connections: int, duration: float) -> Any:
    from coopnets.bench.client import HttpClient
    from coopnets.bench.openloop import closed_loop

    async with HttpClient(url, max_connections=connections) as client:
        async def submit(i: int, scheduled: float) -> Mapping[str, Any]:
            return await client.predict(pngs[i % len(pngs)])

        return await closed_loop(submit, len(pngs), connections, duration, warm_s=2.0)


async def _light(url: str, pngs: Sequence[bytes], rate: float, seconds: float) -> Dict[str, float]:
    from coopnets.bench.client import HttpClient
    from coopnets.bench.openloop import open_loop
    from coopnets.bench.report import percentile

    rng = np.random.default_rng(0)
    times = np.cumsum(rng.exponential(1.0 / rate, size=int(rate * seconds * 1.5) + 10))
    times = times[times < seconds]
    async with HttpClient(url, max_connections=64) as client:
        async def submit(i: int, scheduled: float) -> Mapping[str, Any]:
            return await client.predict(pngs[i % len(pngs)])

        outcomes, _ = await open_loop(times, submit, drain_s=30.0)
    lat = [1e3 * (o.done - t) for o, t in zip(outcomes, times) if not o.error and math.isfinite(o.done)]
    gap = [1e3 * (o.done - o.sent) - o.server_ms for o in outcomes
           if not o.error and math.isfinite(o.done) and math.isfinite(o.server_ms)]
    return {"requests": len(times), "answered": len(lat), "p50_ms": percentile(lat, 0.5), "p99_ms": percentile(lat, 0.99),
            "gap_p50_ms": statistics.median(gap) if gap else math.nan,
            "gap_p99_ms": percentile(gap, 0.99) if gap else math.nan}


def measure(option: str, args: argparse.Namespace, pngs: Sequence[bytes], full: int, log_dir: Path,
            bar: Any) -> Dict[str, Any]:
    out: Dict[str, Any] = {"args": OPTION_SETS[option]}
    for depth in (1, full):
        log = log_dir / f"{option}-depth{depth}.log"
        with harness.ServeProcess(str(args.checkpoint), [*OPTION_SETS[option], "--depth", str(depth), "--slo-ms",
                                                         f"{args.slo_ms:g}"], log) as server:
            out["startup_s"] = server.startup_s
            closed = asyncio.run(_closed(server.url, pngs, args.connections, args.duration))
            out[f"capacity_d{depth}"] = closed.answers_per_s
            out[f"closed_p50_d{depth}"] = closed.p50_ms
            out[f"errors_d{depth}"] = closed.errors
            if depth == 1:
                out["light"] = asyncio.run(_light(server.url, pngs, args.light_rate, args.light_s))
        bar.update(1)
    return out


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    if not (args.checkpoint / "model.safetensors").exists():
        raise ValueError(f"--checkpoint {args.checkpoint}: no model.safetensors; see benchmarks/results/serving/"
                         f"checkpoint_training_results.md for the command that trains it")
    report = harness.Report.start(NAME, TITLE, __file__, argv)
    from coopnets.bench.images import digits_image_set

    pngs = list(digits_image_set("test").bodies)[:64]
    model = model_ms_per_image(args.checkpoint, args.repeats)
    results: Dict[str, Dict[str, Any]] = {}
    bar = harness.progress_bar(total=2 * len(args.options), desc="servers")
    with tempfile.TemporaryDirectory(prefix="coopnets-serving-engine-") as log_dir:
        for option in args.options:
            try:
                results[option] = measure(option, args, pngs, model["num_depths"], Path(log_dir), bar)
            except RuntimeError as e:  # an option that does not come up on this machine is reported, not fatal
                results[option] = {"args": OPTION_SETS[option], "error": " ".join(str(e).split())[:400]}
    bar.close()
    report.finish()

    rows = []
    for option, r in results.items():
        if "error" in r:
            rows.append([option, " ".join(r["args"]), "failed: " + r["error"][:120], "", "", "", "", "", ""])
            continue
        engine_ms = 1e3 / r["capacity_d1"] - model["depth1_ms"] if r["capacity_d1"] > 0 else math.inf
        r["engine_ms"] = engine_ms
        light = r["light"]
        rows.append([option, " ".join(r["args"]), f"{r['capacity_d1']:.0f}", f"{r['capacity_d' + str(model['num_depths'])]:.0f}",
                     f"{light['p50_ms']:.1f}", f"{light['p99_ms']:.1f}", f"{light['gap_p50_ms']:.2f}",
                     f"{engine_ms:.2f}", "yes" if engine_ms <= TARGET_ENGINE_MS else "no"])
    where = args.checkpoint.resolve()
    where = where.relative_to(harness.REPO) if where.is_relative_to(harness.REPO) else where
    report.text(f"Checkpoint `{where}`. "
                f"Model alone, batch of 8, one thread: depth 1 **{model['depth1_ms']:.3f} ms/image**, full depth "
                f"(depth {model['num_depths']}) {model['full_ms']:.3f} ms/image. Capacity: closed loop, "
                f"{args.connections} keep-alive connections, {args.duration:g} s after a 2-s warm-up. Light load: "
                f"Poisson {args.light_rate:g} req/s for {args.light_s:g} s on the depth-1 server, latency from the "
                f"scheduled send. Gap: client latency minus the server's `latency_ms` (median). Engine ms = "
                f"1000 / capacity at depth 1 - model ms/image at depth 1 (target <= {TARGET_ENGINE_MS:g} ms).")
    report.table(["option set", "arguments", "capacity d1 (req/s)", f"capacity d{model['num_depths']} (req/s)",
                  "light p50 ms", "light p99 ms", "gap p50 ms", "engine ms/request", "<= 2 ms"], rows)
    fig, ax = harness.pyplot().subplots(figsize=(7, 3.5))
    ok = [o for o in results if "error" not in results[o]]
    ax.bar(ok, [results[o]["engine_ms"] for o in ok], color=["tab:green" if results[o]["engine_ms"] <= TARGET_ENGINE_MS
                                                             else "tab:red" for o in ok])
    ax.axhline(TARGET_ENGINE_MS, color="k", ls="--", lw=1, label=f"target {TARGET_ENGINE_MS:g} ms")
    ax.set_ylabel("engine ms per request")
    ax.set_title("Engine cost per request at depth 1 (lower is better)")
    ax.legend()
    fig.tight_layout()
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    report.image(f"{NAME}.png", "engine ms per request by option set")
    report.write(args.out, data={"model": model, "results": results, "settings": settings}, figure=fig)
    print(report.markdown())
    return {"model": model, "results": results}


if __name__ == "__main__":  # one error policy for every entry point: one line and exit code 2 for a bad input
    from coopnets.cli.errors import run_entry

    def run() -> int:
        main()
        return 0

    sys.exit(run_entry(run, prog="benchmarks/serving_engine.py"))
