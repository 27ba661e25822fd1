"""What a load test measured: latencies from the schedule, per-phase figures, recovery, table, JSON, figure.

Conventions, for every figure here:

* a request's latency is its answer's time minus its **scheduled** time (ms); a request not
  answered 200 (unanswered by the end of the drain, refused, failed) has latency ``inf``, so
  it sorts last in the percentiles and is never on time;
* **attainment**: the share of *all* the phase's requests answered 200 within the SLO;
  **admitted attainment**: the same over the requests that were not shed (``503``/``429``);
  **goodput**: on-time 200 answers per second of the phase;
* **shed**: answered ``503`` or ``429`` (overload); **expired**: ``504`` (the request's deadline
  passed while it was queued); other failures are counted by status (``0``: no HTTP status,
  the connection failed); **unanswered**: no answer before the drain ended;
* **effective accuracy** (with labels only): the share of all requests answered correctly
  *and* on time;
* **recovery** after a load step (a phase whose rate or contention differs from the one
  before): 1-s windows from the step over the phase after it; the end of the last window
  whose p99 exceeds the SLO, minus the step (0: none does; ``inf``: the phase's last
  window still does).

Example:
    >>> from coopnets.bench.openloop import Outcome
    >>> from coopnets.bench.schedule import Phase, Schedule
    >>> s = Schedule([Phase("a", 0.0, 2.0, 2.0)], np.array([0.0, 0.5, 1.0, 1.5]), np.zeros(4, int), np.zeros(4, int))
    >>> outs = [Outcome(done=0.0625, status=200, depth=1), Outcome(done=0.75, status=200, depth=2),
    ...         Outcome(done=1.2, status=503, error="HTTP 503: overloaded"), Outcome()]
    >>> r = analyse(s, outs, slo_ms=100)["phases"]["a"]
    >>> r["requests"], r["answered"], r["attainment"], r["admitted_attainment"], r["goodput_per_s"], r["shed"], r["unanswered"]
    (4, 2, 0.25, 0.3333333333333333, 0.5, 1, 1)
    >>> r["p50_ms"], r["p99_ms"], r["depth_histogram"]
    (250.0, inf, {1: 1, 2: 1})
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np

__all__ = ["EXPIRED_STATUSES", "SHED_STATUSES", "analyse", "classify", "jsonable", "latencies_ms", "load_steps",
           "markdown_table", "percentile", "phase_summary", "phase_table", "recovery_time", "summarize",
           "window_p99", "write_figure", "write_json"]

#: statuses of a request the server shed (overload)
SHED_STATUSES = (503, 429)
#: statuses of a request whose deadline passed while it was queued
EXPIRED_STATUSES = (504,)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank ``q`` quantile (``inf`` values, unanswered requests, sort last); NaN for none.

    Example:
        >>> percentile([5, 1, 4, 2, 3], 0.5), percentile(list(range(1, 101)), 0.99), percentile([1, math.inf], 0.99)
        (3, 99, inf)
    """
    xs = sorted(values)
    if not xs:
        return math.nan
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


def latencies_ms(schedule_times: Sequence[float], outcomes: Sequence[Any]) -> np.ndarray:
    """Answer time minus scheduled time, ms; ``inf`` for unanswered or failed requests.

    Example:
        >>> from coopnets.bench.openloop import Outcome
        >>> latencies_ms([0.0, 0.5, 1.0], [Outcome(done=0.02), Outcome(done=0.6, error="HTTP 503: busy"), Outcome()])
        array([20., inf, inf])
    """
    done = np.array([o.done if not o.error else math.nan for o in outcomes], dtype=float)
    lat = (done - np.asarray(schedule_times, dtype=float)) * 1e3
    lat[~np.isfinite(lat)] = math.inf
    return lat


def classify(outcome: Any) -> str:
    """``ok``, ``shed`` (503/429), ``expired`` (504), ``error`` (any other failure) or ``unanswered``.

    Example:
        >>> from coopnets.bench.openloop import Outcome
        >>> [classify(o) for o in (Outcome(done=1.0), Outcome(done=1.0, status=429, error="x"),
        ...                        Outcome(done=1.0, status=504, error="x"), Outcome(done=1.0, error="x"), Outcome())]
        ['ok', 'shed', 'expired', 'error', 'unanswered']
    """
    if math.isnan(outcome.done):
        return "unanswered"
    if not outcome.error:
        return "ok"
    if outcome.status in SHED_STATUSES:
        return "shed"
    if outcome.status in EXPIRED_STATUSES:
        return "expired"
    return "error"


def summarize(lat_ms: Sequence[float], correct: Sequence[bool], slo_ms: float,
              depths: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    """Requests, SLO attainment, p50/p90/p99, accuracy (of the answered), effective accuracy (correct and on
    time, over all requests) and the depth histogram (answered requests).

    Example:
        >>> s = summarize([10.0, 20.0, 300.0, math.inf], [True, False, True, True], slo_ms=100, depths=[1, 2, 2, 0])
        >>> s["requests"], s["answered"], s["attainment"], s["effective_accuracy"], s["accuracy"], s["depth_histogram"]
        (4, 3, 0.5, 0.25, 0.6666666666666666, {1: 1, 2: 2})
        >>> s["p50_ms"], s["p99_ms"]
        (20.0, inf)
    """
    lat = np.asarray(lat_ms, dtype=float)
    ok = np.asarray(correct, dtype=bool)
    n = len(lat)
    answered = np.isfinite(lat)
    on_time = lat <= slo_ms
    hist: Dict[int, int] = {}
    if depths is not None:
        for d, a in zip(depths, answered):
            if a:
                hist[int(d)] = hist.get(int(d), 0) + 1
    return {
        "requests": n,
        "answered": int(answered.sum()),
        "attainment": float(on_time.mean()) if n else math.nan,
        "p50_ms": float(percentile(lat.tolist(), 0.50)),
        "p90_ms": float(percentile(lat.tolist(), 0.90)),
        "p99_ms": float(percentile(lat.tolist(), 0.99)),
        "accuracy": float(ok[answered].mean()) if answered.any() else math.nan,
        "effective_accuracy": float((ok & on_time).mean()) if n else math.nan,
        "depth_histogram": dict(sorted(hist.items())),
    }


def window_p99(t_sched: Sequence[float], lat_ms: Sequence[float], start: float, end: float,
               width: float = 1.0) -> List[Dict[str, float]]:
    """p99 latency of the requests scheduled in each ``width``-second window of ``[start, end)``.

    Example:
        >>> w = window_p99([0.1, 0.5, 1.2, 1.9, 2.5], [10, 500, 20, 30, 40], 0.0, 3.0)
        >>> [(x["start"], x["n"], x["p99_ms"]) for x in w]
        [(0.0, 2, 500.0), (1.0, 2, 30.0), (2.0, 1, 40.0)]
    """
    t = np.asarray(t_sched, dtype=float)
    lat = np.asarray(lat_ms, dtype=float)
    out = []
    k = 0
    while start + k * width < end - 1e-9:
        lo, hi = start + k * width, min(start + (k + 1) * width, end)
        sel = (t >= lo) & (t < hi)
        out.append({"start": round(lo, 6), "n": int(sel.sum()),
                    "p99_ms": float(percentile(lat[sel].tolist(), 0.99)) if sel.any() else math.nan})
        k += 1
    return out


def recovery_time(windows: Sequence[Mapping[str, float]], slo_ms: float, step: float) -> float:
    """Seconds from the load step at ``step`` until the 1-s p99 is under the SLO for good (within the phase).

    The end of the last window (of those after the step) whose p99 exceeds the SLO, minus
    ``step``; 0 when none does; ``inf`` when the phase's last window still does (never recovered).

    Example:
        >>> w = window_p99([0.5, 1.5, 2.5, 3.5], [200, 250, 50, 60], 0.0, 4.0)
        >>> recovery_time(w, slo_ms=100, step=0.0), recovery_time(w[2:], 100, 2.0), recovery_time(w[:2], 100, 0.0)
        (2.0, 0.0, inf)
    """
    filled = [w for w in windows if w["n"] > 0]
    bad = [i for i, w in enumerate(filled) if w["p99_ms"] > slo_ms]
    if not bad:
        return 0.0
    if bad[-1] == len(filled) - 1:
        return math.inf
    last = filled[bad[-1]]
    width = (filled[1]["start"] - filled[0]["start"]) if len(filled) > 1 else 1.0
    return float(last["start"] + min(width, 1.0) - step)


def phase_summary(times: np.ndarray, outcomes: Sequence[Any], slo_ms: float, duration_s: float,
                  correct: Optional[np.ndarray] = None) -> Dict[str, Any]:
    """The figures of one phase's requests (module docstring); ``correct`` (per request, or ``None`` without
    labels) gives ``accuracy`` and ``effective_accuracy``."""
    lat = latencies_ms(times, outcomes)
    kinds = [classify(o) for o in outcomes]
    n = len(outcomes)
    on_time = lat <= slo_ms
    shed = kinds.count("shed")
    admitted = n - shed
    s = summarize(lat, correct if correct is not None else np.zeros(n, bool), slo_ms, [o.depth for o in outcomes])
    by_status: Dict[str, int] = {}
    for o, k in zip(outcomes, kinds):
        if k == "error":
            by_status[str(o.status)] = by_status.get(str(o.status), 0) + 1
    lag = np.array([o.sent for o in outcomes], dtype=float) - np.asarray(times, dtype=float)
    lag = lag[np.isfinite(lag)]
    gap = lat - np.array([o.server_ms for o in outcomes], dtype=float)
    gap = gap[np.isfinite(gap)]
    s.update({
        "admitted_attainment": float(on_time.sum() / admitted) if admitted else math.nan,
        "goodput_per_s": float(on_time.sum() / duration_s) if duration_s > 0 else math.nan,
        "shed": shed, "expired": kinds.count("expired"), "errors": kinds.count("error"),
        "errors_by_status": dict(sorted(by_status.items())), "unanswered": kinds.count("unanswered"),
        "send_lag_p99_ms": float(1e3 * percentile(lag.tolist(), 0.99)) if len(lag) else math.nan,
        "client_minus_server_p50_ms": float(np.median(gap)) if len(gap) else math.nan,
    })
    if correct is None:
        s["accuracy"] = s["effective_accuracy"] = None
    return s


def load_steps(phases: Sequence[Any], skip: Iterable[str] = ("warmup",)) -> List[int]:
    """Indices of the phases that start a load step: their rate or contention differs from the phase before
    (phases named in ``skip`` are neither steps nor the phase before one).

    Example:
        >>> from coopnets.bench.schedule import Phase
        >>> load_steps([Phase("warmup", 0, 1, 5), Phase("a", 1, 1, 5), Phase("b", 2, 1, 15), Phase("c", 3, 1, 15, True),
        ...             Phase("d", 4, 1, 15, True)])
        [2, 3]
    """
    skip = set(skip)
    out, prev = [], None
    for i, ph in enumerate(phases):
        if ph.name in skip:
            continue
        if prev is not None and (ph.rate != prev.rate or ph.contention != prev.contention):
            out.append(i)
        prev = ph
    return out


def analyse(schedule: Any, outcomes: Sequence[Any], slo_ms: float, correct: Optional[np.ndarray] = None,
            skip: Iterable[str] = ("warmup",)) -> Dict[str, Any]:
    """Per phase (not those in ``skip``): :func:`phase_summary` and its 1-s windows; recovery after every load
    step; the per-request series (for the figure)."""
    skip = set(skip)
    lat = latencies_ms(schedule.times, outcomes)
    phases: Dict[str, Any] = {}
    for i, ph in enumerate(schedule.phases):
        if ph.name in skip:
            continue
        sel = np.flatnonzero(schedule.phase == i)
        s = phase_summary(schedule.times[sel], [outcomes[k] for k in sel], slo_ms, ph.duration,
                          None if correct is None else np.asarray(correct)[sel])
        s.update({"rate": ph.rate, "start": ph.start, "duration": ph.duration, "contention": ph.contention,
                  "windows": window_p99(schedule.times[sel], lat[sel], ph.start, ph.end)})
        phases[ph.name] = s
    steps: Dict[str, Any] = {}
    shown = [i for i, p in enumerate(schedule.phases) if p.name not in skip]
    for i in load_steps(schedule.phases, skip):
        before = schedule.phases[shown[shown.index(i) - 1]]
        ph = schedule.phases[i]
        w = phases[ph.name]["windows"]
        rec = recovery_time(w, slo_ms, ph.start)
        steps[f"{before.name}->{ph.name}"] = {"phase": ph.name, "at": ph.start, "recovery_s": rec,
                                              "worst_window_p99_ms": max((x["p99_ms"] for x in w if x["n"]),
                                                                         default=math.nan)}
        phases[ph.name]["recovery_s"] = rec
    series = {"t": schedule.times.tolist(), "latency_ms": lat.tolist(), "depth": [o.depth for o in outcomes],
              "kind": [classify(o) for o in outcomes], "phase": schedule.phase.tolist()}
    return {"phases": phases, "steps": steps, "first_errors": sorted({o.error for o in outcomes if o.error})[:5],
            "series": series}


# --- text -------------------------------------------------------------------------------------
def markdown_table(head: Sequence[Any], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub Markdown table (``|`` in cells escaped).

    Example:
        >>> print(markdown_table(["a", "b"], [[1, "x|y"]]))
        | a | b |
        |---|---|
        | 1 | x\\|y |
    """
    def cell(v: Any) -> str:
        return str(v).replace("\n", " ").replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _ms(v: Optional[float]) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return "inf" if math.isinf(v) else f"{v:.1f}"


def _pct(v: Optional[float]) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def _hist(h: Mapping[Any, int]) -> str:
    total = sum(h.values())
    return " ".join(f"{d}:{100 * n / total:.0f}%" for d, n in sorted(h.items(), key=lambda kv: int(kv[0]))) if total else "-"


def phase_table(phases: Mapping[str, Mapping[str, Any]]) -> str:
    """The Markdown table of :func:`analyse`'s phases, one row each.

    Example:
        >>> row = {"rate": 20.0, "duration": 2.0, "contention": False, "requests": 40, "answered": 39,
        ...        "attainment": 0.95, "admitted_attainment": 0.95, "goodput_per_s": 19.0, "p50_ms": 12.0,
        ...        "p90_ms": 30.0, "p99_ms": math.inf, "effective_accuracy": None, "depth_histogram": {2: 39},
        ...        "shed": 0, "expired": 0, "errors_by_status": {}, "unanswered": 1}
        >>> print(phase_table({"quiet": row}).splitlines()[-1])
        | quiet | 20 | 2 | 40 | 39 | 95.0 | 95.0 | 19.0 | 12.0 | 30.0 | inf | - | 2:100% | 0 | 0 | 0 | 1 | - |
    """
    head = ["phase", "rate req/s", "s", "requests", "answered", "attainment %", "admitted attainment %",
            "goodput req/s", "p50 ms", "p90 ms", "p99 ms", "effective accuracy %", "depths", "shed", "expired",
            "errors (by status)", "unanswered", "recovery s"]
    rows = []
    for name, s in phases.items():
        errs = s.get("errors_by_status") or {}
        rec = s.get("recovery_s")
        rows.append([name + (" (contention)" if s.get("contention") else ""), f"{s['rate']:g}", f"{s['duration']:g}",
                     s["requests"], s["answered"], _pct(s["attainment"]), _pct(s["admitted_attainment"]),
                     f"{s['goodput_per_s']:.1f}", _ms(s["p50_ms"]), _ms(s["p90_ms"]), _ms(s["p99_ms"]),
                     _pct(s.get("effective_accuracy")), _hist(s["depth_histogram"]), s["shed"], s["expired"],
                     (" ".join(f"{k}:{v}" for k, v in errs.items()) if errs else "0"), s["unanswered"],
                     "-" if rec is None else ("never" if math.isinf(rec) else f"{rec:.1f}")])
    return markdown_table(head, rows)


def jsonable(value: Any) -> Any:
    """``value`` as strict JSON data: NaN as null, infinities as the strings ``"inf"``/``"-inf"`` (a p99 or a
    recovery time that never came), numpy scalars as numbers, tuples as lists.

    Example:
        >>> jsonable({"a": math.inf, "b": [math.nan, np.int64(3)], 4: (1.5,)})
        {'a': 'inf', 'b': [None, 3], '4': [1.5]}
    """
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return value if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: Union[str, Path], data: Any) -> Path:
    """Write ``data`` as strict JSON (:func:`jsonable`), atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(jsonable(data), indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


# --- the figure -------------------------------------------------------------------------------
_MARKS = {"shed": ("x", "tab:red", "shed (503/429)"), "expired": ("v", "tab:orange", "expired (504)"),
          "error": ("+", "black", "other error"), "unanswered": ("|", "tab:purple", "unanswered")}


def write_figure(path: Union[str, Path], phases: Sequence[Any], series: Mapping[str, Sequence[Any]], slo_ms: float,
                 title: str = "") -> Path:
    """A PNG of latency (from scheduled time, log scale, coloured by depth; failures marked above the answers,
    by kind) and mean depth over time, with the phase boundaries, contention shaded and the SLO line.

    ``phases`` are :class:`~coopnets.bench.schedule.Phase` s, ``series`` is :func:`analyse`'s.
    Drawn on a matplotlib ``Figure`` of its own (Agg; no pyplot state is touched).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    t = np.asarray(series["t"], dtype=float)
    lat = np.asarray(series["latency_ms"], dtype=float)
    depth = np.asarray(series["depth"], dtype=float)
    kind = np.asarray(series["kind"], dtype=object)
    ok = kind == "ok"
    fig = Figure(figsize=(12, 6.5))
    FigureCanvasAgg(fig)
    ax, axd = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1.2]})
    finite = lat[ok & np.isfinite(lat)]
    top = 2.0 * max(float(finite.max()) if len(finite) else slo_ms, slo_ms)
    bottom = max(0.05, 0.5 * min(float(finite.min()) if len(finite) else slo_ms, slo_ms))
    depths = sorted({int(d) for d in depth[ok]})
    if ok.any():
        import matplotlib

        lo, hi = (min(depths), max(depths)) if depths else (0, 1)
        cmap = matplotlib.colormaps["viridis"].resampled(hi - lo + 1)  # one colour per depth
        norm = matplotlib.colors.Normalize(vmin=lo - 0.5, vmax=hi + 0.5)
        pts = ax.scatter(t[ok], np.clip(lat[ok], bottom, None), c=depth[ok], cmap=cmap, norm=norm, s=5, lw=0, alpha=0.7)
        bar = fig.colorbar(pts, ax=[ax, axd], pad=0.01, ticks=depths)
        bar.set_label("depth")
    for k, (marker, colour, label) in _MARKS.items():
        sel = kind == k
        if sel.any():
            ax.scatter(t[sel], np.full(sel.sum(), top / 1.4), marker=marker, s=14, color=colour, lw=0.8, label=label)
    ax.axhline(slo_ms, color="tab:red", lw=1, ls="--", label=f"SLO {slo_ms:g} ms")
    ax.set_yscale("log")
    ax.set_ylim(bottom, top)
    ax.set_ylabel("latency from scheduled time, ms")
    win = 0.5
    end = max((p.end for p in phases), default=0.0)
    edges = np.arange(0.0, end + win, win)
    centres, means = [], []
    for a, b in zip(edges[:-1], edges[1:]):
        sel = ok & (t >= a) & (t < b)
        if sel.any():
            centres.append((a + b) / 2)
            means.append(float(depth[sel].mean()))
    axd.plot(centres, means, color="black", lw=1)
    axd.set_ylabel("mean depth\n(0.5 s)")
    if depths:
        axd.set_ylim(min(depths) - 0.5, max(depths) + 0.5)
    axd.set_xlabel("scheduled time, s")
    for a in (ax, axd):
        for p in phases:
            a.axvline(p.start, color="grey", lw=0.6)
            if p.contention:
                a.axvspan(p.start, p.end, color="orange", alpha=0.12)
            if p.name == "warmup":
                a.axvspan(p.start, p.end, color="grey", alpha=0.08)
    for p in phases:
        ax.text(p.start, 1.0, f" {p.name} ({p.rate:g}/s)", transform=ax.get_xaxis_transform(), fontsize=8, va="bottom")
    ax.legend(loc="upper left", fontsize=7, ncol=3)
    fig.suptitle(title or "latency and depth over time (orange: contention; grey: warm-up, not scored)")
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path
