"""``coopnets bench serve URL``: load-test a prediction server, open loop, phase by phase (or its capacity).

Works against any server with ``coopnets serve``'s contract: ``POST URL/predict`` (body: one
PNG or JPEG image) answers 200 ``{"label", "index", "score", "depth", "latency_ms"}``, or an
error status with ``{"error": ...}``; overload is answered 503 or 429 (shed), a request whose
deadline passed while queued 504 (expired). ``GET URL/stats`` is read before and after the
run when the server has it (kept in the JSON; optional).

Open loop (default): requests arrive at seeded times, phase after phase
(``--phase NAME:RATE:SECONDS[:contention]``, repeatable; a warm-up of ``--warmup-s`` at the
first phase's rate comes first and is not scored), Poisson or, with ``--burstiness B``, gamma
inter-arrivals (shape B, scale 1/(rate*B): below 1 burstier than Poisson). Each request is
sent at its time whether or not earlier ones were answered, over up to ``--connections``
keep-alive connections, and its latency is counted from its *scheduled* time (queueing and a
late client count: no coordinated omission). Phases marked ``contention`` run a CPU-bound
child process pinned to one core while they last. ``--timeout-header S`` sends every request
with ``x-request-timeout-seconds: S``, its deadline at the server.

Per phase the report gives requests, answered, SLO attainment (share of all requests
answered 200 within ``--slo-ms``), attainment of the admitted requests (shed ones left out),
goodput (on-time answers/s), p50/p90/p99 from the scheduled time (a request not answered 200
counts as infinitely late), effective accuracy (correct and on time, over all requests; with
labelled images), the depth histogram, shed (503/429), expired (504), other errors by status,
unanswered, and the recovery time after each load step (seconds until the 1-s-window p99 is
back under the SLO for good; "never" when it is not by the end of the phase).

Closed loop (``--closed-loop N --duration S``): N requests always outstanding over N
keep-alive connections, for S seconds after the warm-up: the answers/s (the server's
capacity at that concurrency), p50 and p99.

Images: ``--images DIR`` (its PNG/JPEG files; class folders make it labelled, ImageFolder
style: an answer is correct when its ``label`` is the folder name, or, when the server's
labels are not the folder names, its ``index`` is the class's position in the naturally
sorted folder names; ``--label-match`` forces one) or ``--dataset digits`` (default: the
digits test split as PNGs, labelled).

Writes ``bench_serve.md``, ``bench_serve.json`` and (open loop) ``bench_serve.png`` (latency
and depth over time) into ``--out`` (default: a new ``bench_serve_<date>-<time>`` folder here)
and prints the Markdown. Refuses, before anything is sent or written: a URL that is not
``http://HOST[:PORT]``, a server that cannot be reached or has no ``/predict``, a bad phase, a
folder without images, an ``--out`` that is a file or a non-empty folder of something else.

Example:
    coopnets bench serve http://127.0.0.1:8000 --slo-ms 100 --phase quiet:20:12 --phase burst:60:12 \\
        --phase contention:20:12:contention --phase recovery:20:12
    coopnets bench serve http://127.0.0.1:8000 --images val/ --phase steady:50:30 --burstiness 0.5
    coopnets bench serve http://127.0.0.1:8000 --closed-loop 16 --duration 10
"""
from __future__ import annotations

import argparse
import asyncio
import math
import shlex
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from .errors import bad_value

#: sub-command -> one-line help
SUBCOMMANDS = {"serve": "load-test a POST /predict server: open-loop phases (or closed-loop capacity), "
                        "latency from the schedule, SLO attainment, goodput, shedding, recovery"}
EXAMPLES = """examples:
  coopnets bench serve http://127.0.0.1:8000 --slo-ms 100 --phase quiet:20:12 --phase burst:60:12 \\
      --phase contention:20:12:contention --phase recovery:20:12
  coopnets bench serve http://127.0.0.1:8000 --images val/ --phase steady:50:30 --burstiness 0.5
  coopnets bench serve http://127.0.0.1:8000 --closed-loop 16 --duration 10"""
#: the files a run writes into --out
FILES = ("bench_serve.md", "bench_serve.json", "bench_serve.png")
DEFAULT_PHASES = ("steady:10:10",)
#: longest wait for the first answer (the reachability probe)
PROBE_TIMEOUT_S = 60.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, help_text in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=EXAMPLES,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_serve_arguments(p)


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", metavar="URL", help="the server, http://HOST[:PORT] (requests go to URL/predict)")
    p.add_argument("--slo-ms", type=float, default=100.0, help="latency objective per request, ms (default 100)")
    p.add_argument("--phase", action="append", default=None, metavar="NAME:RATE:SECONDS[:contention]",
                   help="a phase of the load, repeatable, run in order (default " + " ".join(DEFAULT_PHASES) + ")")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--images", default=None, metavar="DIR",
                     help="folder of PNG/JPEG images, or of class folders of them (labelled)")
    src.add_argument("--dataset", choices=("digits",), default=None,
                     help="embedded images: the digits test split as PNGs (the default)")
    p.add_argument("--max-images", type=int, default=2000, help="read at most this many images of --images "
                                                              "(a seeded sample; default 2000)")
    p.add_argument("--label-match", choices=("auto", "label", "index"), default="auto",
                   help="score answers by label (= class folder name) or index (= natural-sorted class position); "
                        "default auto: label when any answered label is a class name")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the inter-arrival times (1: Poisson, default; below 1: burstier)")
    p.add_argument("--seed", type=int, default=0, help="seed of the arrival times and the images (default 0)")
    p.add_argument("--warmup-s", type=float, default=2.0, help="warm-up before the phases, not scored (default 2)")
    p.add_argument("--timeout-header", type=float, default=None, metavar="S",
                   help="send x-request-timeout-seconds: S with every request (its deadline at the server)")
    p.add_argument("--connections", type=int, default=256,
                   help="most keep-alive connections at once in the open loop; a request finding all busy "
                        "waits, in its latency (default 256)")
    p.add_argument("--drain-s", type=float, default=10.0,
                   help="after the last arrival, wait at most this long for answers (default 10)")
    p.add_argument("--closed-loop", type=int, default=None, metavar="N",
                   help="measure capacity instead: N requests always outstanding over N connections")
    p.add_argument("--duration", type=float, default=10.0, help="--closed-loop: measured seconds (default 10)")
    p.add_argument("--out", default=None, help="folder for bench_serve.md/.json/.png (default: a new "
                                               "bench_serve_<date>-<time> folder here)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


# --- checks -----------------------------------------------------------------------------------
def check_args(args: argparse.Namespace) -> List[Any]:
    """Refuse bad settings (one line naming the flag, the value and what is valid); the parsed phases."""
    from ..bench.client import split_url
    from ..bench.schedule import parse_phases

    split_url(args.url)
    positive = [("--slo-ms", args.slo_ms), ("--burstiness", args.burstiness), ("--duration", args.duration)]
    if args.timeout_header is not None:
        positive.append(("--timeout-header", args.timeout_header))
    for flag, value in positive:
        if not (math.isfinite(value) and value > 0):
            raise bad_value(flag, value, "must be a number > 0")
    for flag, value in (("--warmup-s", args.warmup_s), ("--drain-s", args.drain_s)):
        if not (math.isfinite(value) and value >= 0):
            raise bad_value(flag, value, "must be a number >= 0 (seconds)")
    for flag, value in (("--connections", args.connections), ("--max-images", args.max_images),
                        ("--closed-loop", args.closed_loop)):
        if value is not None and value < 1:
            raise bad_value(flag, value, "must be >= 1")
    if args.closed_loop is not None:
        if args.phase:
            raise bad_value("--phase", args.phase[0], "is for the open loop; --closed-loop runs no phases "
                                                      "(run the command twice to do both)")
        return []
    return parse_phases(args.phase or list(DEFAULT_PHASES), args.warmup_s)


def default_out(now: Optional[datetime] = None) -> Path:
    """A new folder name under the current one: ``bench_serve_<YYYYmmdd-HHMMSS>`` (``-2``, ``-3``... if taken)."""
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    path = Path.cwd() / f"bench_serve_{stamp}"
    k = 2
    while path.exists():
        path = Path.cwd() / f"bench_serve_{stamp}-{k}"
        k += 1
    return path


def check_out(out: Optional[str]) -> Path:
    """The folder to write into: new, empty, or holding an earlier run (its ``bench_serve.json``); else refused.

    Example:
        >>> import tempfile, os
        >>> d = tempfile.mkdtemp(); _ = open(os.path.join(d, "notes.txt"), "w").write("mine")
        >>> check_out(d)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: --out ...: holds other files and no earlier bench_serve.json; give a new or empty folder (nothing is overwritten)
    """
    if out is None:
        return default_out()
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise bad_value("--out", out, "is a file; give a folder (new, empty, or of an earlier bench serve run)")
    if path.is_dir() and any(path.iterdir()) and not (path / "bench_serve.json").is_file():
        raise bad_value("--out", out, "holds other files and no earlier bench_serve.json; give a new or empty folder "
                                      "(nothing is overwritten)")
    return path


def load_images(args: argparse.Namespace) -> Any:
    from ..bench.images import digits_image_set, load_folder

    if args.images is not None:
        return load_folder(args.images, max_images=args.max_images, seed=args.seed)
    return digits_image_set("test")


# --- the run ----------------------------------------------------------------------------------
async def _probe(client: Any, images: Any, url: str) -> Dict[str, Any]:
    """One request, to refuse a server that cannot be reached or has no ``/predict``; its result."""
    try:
        result = await asyncio.wait_for(client.predict(images.bodies[0], images.content_types[0]), PROBE_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise bad_value("URL", url, f"no answer to POST {client.prefix}/predict within {PROBE_TIMEOUT_S:g} s") from None
    if result.get("status") == 0:  # it accepted a connection (check_reachable) but did not answer
        why = str(result.get("error", "")).replace("connection failed: ", "")
        raise bad_value("URL", url, f"POST {client.prefix or ''}/predict got no HTTP answer ({why}): is it a "
                                    "prediction server?")
    if result.get("status") in (404, 405):
        raise bad_value("URL", url, f"POST {client.prefix or ''}/predict answered HTTP {result['status']}: no "
                                    "prediction endpoint there (give the server's base address)")
    return result


async def _stats(client: Any) -> Optional[Any]:
    try:
        return await asyncio.wait_for(client.get_json("/stats"), 5.0)
    except Exception as e:  # noqa: BLE001 - /stats is optional
        return {"error": f"{type(e).__name__}: {e}"}


def _progress(args: argparse.Namespace, total: float, unit: str, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, desc=desc, disable=args.no_progress, dynamic_ncols=True, file=sys.stderr,
                leave=False)


async def _open_loop_run(args: argparse.Namespace, phases: List[Any], images: Any) -> Dict[str, Any]:
    from ..bench.client import HttpClient
    from ..bench.contention import Contention
    from ..bench.openloop import open_loop
    from ..bench.schedule import arrival_schedule

    schedule = arrival_schedule(phases, len(images), args.seed, args.burstiness)
    contention = Contention()
    async with HttpClient(args.url, max_connections=args.connections, timeout_header=args.timeout_header) as client:
        probe = await _probe(client, images, args.url)
        before = await _stats(client)
        bar = _progress(args, len(schedule), "req", "bench serve")
        events: List[Tuple[float, Callable[[], Any]]] = []
        for ph in phases:
            events.append((ph.start, lambda name=ph.name: bar.set_postfix_str(name, refresh=False)))
            if ph.contention:
                events += [(ph.start, lambda name=ph.name: contention.start(name)), (ph.end, contention.stop)]

        async def submit(i: int, scheduled: float) -> Any:
            k = int(schedule.item[i])
            return await client.predict(images.bodies[k], images.content_types[k])

        try:
            outcomes, _ = await open_loop(schedule.times, submit, events=events, drain_s=args.drain_s, bar=bar)
        finally:
            contention.stop()
            bar.close()
        after = await _stats(client)
        opened = client.opened
    return {"schedule": schedule, "outcomes": outcomes, "probe": probe, "stats_before": before, "stats_after": after,
            "contention": contention.record, "connections_opened": opened}


async def _closed_loop_run(args: argparse.Namespace, images: Any) -> Dict[str, Any]:
    from ..bench.client import HttpClient
    from ..bench.openloop import closed_loop

    async with HttpClient(args.url, max_connections=args.closed_loop, timeout_header=args.timeout_header) as client:
        probe = await _probe(client, images, args.url)
        before = await _stats(client)
        bar = _progress(args, round(args.warmup_s + args.duration, 1), "s", f"closed loop x{args.closed_loop}")

        async def submit(i: int, scheduled: float) -> Any:
            return await client.predict(images.bodies[i], images.content_types[i])

        async def tick() -> None:
            t0 = time.perf_counter()
            while True:
                await asyncio.sleep(0.25)
                bar.n = round(min(bar.total, time.perf_counter() - t0), 1)
                bar.refresh()

        ticker = asyncio.get_running_loop().create_task(tick())
        try:
            result = await closed_loop(submit, len(images), args.closed_loop, args.duration, args.warmup_s,
                                       drain_s=args.drain_s)
        finally:
            ticker.cancel()
            bar.close()
        after = await _stats(client)
    return {"closed_loop": result, "probe": probe, "stats_before": before, "stats_after": after}


# --- the report -------------------------------------------------------------------------------
def command_line(args: argparse.Namespace) -> str:
    """The command that repeats this run (every setting spelled out, defaults included; not ``--out``).

    Example:
        >>> p = argparse.ArgumentParser(); add_serve_arguments(p)
        >>> command_line(p.parse_args(["http://h:1", "--phase", "a:5:2", "--seed", "3"]))
        'coopnets bench serve http://h:1 --slo-ms 100 --phase a:5:2 --dataset digits --burstiness 1 --seed 3 --warmup-s 2 --drain-s 10 --connections 256'
    """
    words = ["coopnets", "bench", "serve", args.url, "--slo-ms", f"{args.slo_ms:g}"]
    if args.closed_loop is not None:
        words += ["--closed-loop", str(args.closed_loop), "--duration", f"{args.duration:g}"]
    else:
        for spec in args.phase or DEFAULT_PHASES:
            words += ["--phase", spec]
    if args.images is not None:
        words += ["--images", args.images, "--max-images", str(args.max_images), "--label-match", args.label_match]
    else:
        words += ["--dataset", "digits"]
    if args.closed_loop is None:
        words += ["--burstiness", f"{args.burstiness:g}", "--seed", str(args.seed)]
    words += ["--warmup-s", f"{args.warmup_s:g}", "--drain-s", f"{args.drain_s:g}"]
    if args.timeout_header is not None:
        words += ["--timeout-header", f"{args.timeout_header:g}"]
    if args.closed_loop is None:
        words += ["--connections", str(args.connections)]
    return " ".join(shlex.quote(w) for w in words)


def _fmt(v: Optional[float], spec: str = ".1f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else ("inf" if math.isinf(v) else format(v, spec))


def _settings(args: argparse.Namespace) -> Dict[str, Any]:
    keys = ("url", "slo_ms", "phase", "images", "dataset", "max_images", "label_match", "burstiness", "seed",
            "warmup_s", "timeout_header", "connections", "drain_s", "closed_loop", "duration")
    return {k: getattr(args, k) for k in keys}


def _stats_line(before: Any, after: Any) -> Optional[str]:
    if not (isinstance(before, dict) and isinstance(after, dict)) or "error" in after:
        return None
    parts = []
    if isinstance(after.get("requests"), (int, float)) and isinstance(before.get("requests"), (int, float)):
        parts.append(f"requests {before['requests']} -> {after['requests']}")
    if isinstance(after.get("errors"), (int, float)) and isinstance(before.get("errors"), (int, float)):
        parts.append(f"errors {before['errors']} -> {after['errors']}")
    for k in ("slo_attainment", "p50_ms", "p99_ms"):
        if isinstance(after.get(k), (int, float)):
            parts.append(f"{k} {after[k]:.3g}")
    return ("Server's `/stats` (before -> after; cumulative, the server's own measure from arrival): "
            + ", ".join(parts) + ".") if parts else None


def open_loop_report(args: argparse.Namespace, phases: List[Any], images: Any, run: Dict[str, Any],
                     command: str) -> Tuple[str, Dict[str, Any]]:
    """The Markdown and the JSON data of an open-loop run."""
    from ..bench.images import score
    from ..bench.report import analyse, phase_table

    schedule, outcomes = run["schedule"], run["outcomes"]
    correct, match = score(images, schedule.item, outcomes, args.label_match)
    result = analyse(schedule, outcomes, args.slo_ms, correct)
    labelled = (f"labelled ({len(images.class_names)} classes; answers matched by {match})" if correct is not None
                else "unlabelled (effective accuracy not reported)")
    arrivals = "Poisson" if args.burstiness == 1 else f"gamma, burstiness {args.burstiness:g}"
    lines = [
        "# coopnets bench serve", "",
        f"`{command}`", "",
        f"Target {args.url} (POST /predict), SLO {args.slo_ms:g} ms"
        + (f", x-request-timeout-seconds {args.timeout_header:g}" if args.timeout_header else "")
        + f". {len(schedule)} requests, open loop ({arrivals} arrivals, seed {args.seed}), warm-up "
        f"{args.warmup_s:g} s (not scored), drain {args.drain_s:g} s; up to {args.connections} keep-alive "
        f"connections ({run['connections_opened']} opened). Images: {images.source}, {len(images)}, {labelled}.", "",
        phase_table(result["phases"]), "",
    ]
    if result["steps"]:
        lines += ["Recovery after each load step (1-s windows of p99 from the step): " + "; ".join(
            f"{k} at {v['at']:g} s: " + ("never" if math.isinf(v["recovery_s"]) else f"{v['recovery_s']:.1f} s")
            + f" (worst window p99 {_fmt(v['worst_window_p99_ms'])} ms)" for k, v in result["steps"].items()) + ".", ""]
    for rec in run["contention"]:
        lines += [f"Contention ({rec['phase']}): a busy process pinned to core {rec['cpu']} got "
                  f"{_fmt(rec['cpu_s'], '.2f')} s of CPU in {rec['wall_s']:.2f} s "
                  f"({_fmt(100 * rec['core_share'], '.0f')} % of a core).", ""]
    stats = _stats_line(run["stats_before"], run["stats_after"])
    if stats:
        lines += [stats, ""]
    if result["first_errors"]:
        lines += ["First errors: " + "; ".join(f"`{e}`" for e in result["first_errors"]) + ".", ""]
    lines += ["Latency is answer time minus *scheduled* time; a request not answered 200 counts as infinitely "
              "late (never on time). Attainment: share of all requests answered 200 within the SLO; admitted: of "
              "those not shed (503/429). Goodput: on-time answers per second. Expired: 504. Errors: other "
              "failures by HTTP status (0: the connection failed).", "",
              "![latency and depth over time](bench_serve.png)", ""]
    series = result.pop("series")
    data = {"version": 1, "command": command, "mode": "open_loop", "settings": _settings(args),
            "started": run.get("started"), "images": {"source": images.source, "count": len(images),
                                                      "classes": images.class_names, "label_match": match},
            "phases_spec": [vars(p) for p in phases], **result, "contention": run["contention"],
            "connections_opened": run["connections_opened"], "probe": run["probe"],
            "stats_before": run["stats_before"], "stats_after": run["stats_after"], "series": series}
    return "\n".join(lines), data


def closed_loop_report(args: argparse.Namespace, images: Any, run: Dict[str, Any], command: str) -> Tuple[str, Dict[str, Any]]:
    """The Markdown and the JSON data of a closed-loop run."""
    from ..bench.report import markdown_table

    r = run["closed_loop"]
    errs = " ".join(f"{k}:{v}" for k, v in r.errors_by_status.items()) or "0"
    lines = ["# coopnets bench serve (closed loop)", "", f"`{command}`", "",
             f"Target {args.url} (POST /predict): {r.concurrency} requests always outstanding over {r.concurrency} "
             f"keep-alive connections, {r.duration_s:g} s measured after a {r.warm_s:g} s warm-up. Images: "
             f"{images.source}, {len(images)}.", "",
             markdown_table(["concurrency", "answers/s", "answered", "p50 ms", "p99 ms", "errors (by status)"],
                            [[r.concurrency, f"{r.answers_per_s:.1f}", r.answered, _fmt(r.p50_ms), _fmt(r.p99_ms),
                              errs]]), ""]
    stats = _stats_line(run["stats_before"], run["stats_after"])
    if stats:
        lines += [stats, ""]
    if r.first_errors:
        lines += ["First errors: " + "; ".join(f"`{e}`" for e in r.first_errors) + ".", ""]
    lines += ["Answers/s: 200 answers that came back within the measured window, over its length; latency from "
              "each request's send (closed loop: no schedule).", ""]
    data = {"version": 1, "command": command, "mode": "closed_loop", "settings": _settings(args),
            "started": run.get("started"), "images": {"source": images.source, "count": len(images)},
            "closed_loop": vars(r), "probe": run["probe"], "stats_before": run["stats_before"],
            "stats_after": run["stats_after"]}
    return "\n".join(lines), data


def check_reachable(url: str, timeout_s: float = 5.0) -> None:
    """Refuse a server that does not accept a TCP connection (before any image is read or request sent)."""
    from ..bench.client import split_url

    host, port, _ = split_url(url)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        why = " ".join(str(e).split()) or type(e).__name__
        raise bad_value("URL", url, f"cannot be reached ({why}): start the server, or check the address") from None


def serve(args: argparse.Namespace) -> int:
    """``coopnets bench serve``: check, load the images, run, write, print."""
    from ..bench.report import write_figure, write_json

    phases = check_args(args)
    out = check_out(args.out)
    check_reachable(args.url)
    images = load_images(args)
    command = command_line(args)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if args.closed_loop is not None:
        run = asyncio.run(_closed_loop_run(args, images))
        run["started"] = started
        markdown, data = closed_loop_report(args, images, run, command)
    else:
        run = asyncio.run(_open_loop_run(args, phases, images))
        run["started"] = started
        markdown, data = open_loop_report(args, phases, images, run, command)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_serve.md").write_text(markdown)
    write_json(out / "bench_serve.json", data)
    png = out / "bench_serve.png"
    if args.closed_loop is None:
        write_figure(png, phases, data["series"], args.slo_ms,
                     f"coopnets bench serve {args.url}: latency and depth over time")
    elif png.exists():
        png.unlink()  # an earlier open-loop run's figure would not describe this run
    print(markdown)
    print(f"wrote {out / 'bench_serve.md'}, bench_serve.json" + ("" if args.closed_loop else ", bench_serve.png"),
          file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.bench_command == "serve":
        return serve(args)
    raise bad_value("coopnets bench", args.bench_command, f"choose from {', '.join(SUBCOMMANDS)}")  # pragma: no cover
