"""Load generation against a serving endpoint: the library behind ``coopnets bench serve URL``.

Modules, one job each:

* :mod:`.schedule`: phases (``NAME:RATE:SECONDS[:contention]``) and seeded arrival schedules
  (Poisson, or gamma inter-arrivals with a burstiness factor);
* :mod:`.openloop`: the open-loop runner (request ``i`` sent at its scheduled time whatever
  happened to the earlier ones; latency counted from the schedule) and the closed-loop
  capacity measurement, over an async submit (HTTP) or a callback submit (in-process);
* :mod:`.client`: a small asyncio HTTP/1.1 keep-alive client for ``POST /predict``;
* :mod:`.images`: the request bodies: an image folder (ImageFolder labels when it has class
  folders) or the embedded digits test split;
* :mod:`.contention`: a CPU-bound child process for the phases marked ``contention``;
* :mod:`.report`: percentiles, per-phase figures, recovery after load steps, the Markdown
  table, the JSON and the figure.

Example:
    >>> from coopnets.bench import arrival_schedule, parse_phases
    >>> phases = parse_phases(["quiet:20:2", "burst:60:1"])
    >>> s = arrival_schedule(phases, n_items=10, seed=0)
    >>> [p.name for p in s.phases], 50 < len(s) < 150
    (['quiet', 'burst'], True)
"""
from .contention import Contention
from .openloop import ClosedLoopResult, Done, Outcome, Submit, closed_loop, closed_loop_capacity, open_loop, run_open_loop
from .report import analyse, classify, latencies_ms, percentile, phase_summary, recovery_time, summarize, window_p99
from .schedule import Phase, Schedule, arrival_schedule, back_to_back, parse_phase, parse_phases, poisson_schedule

__all__ = [
    "ClosedLoopResult", "Contention", "Done", "Outcome", "Phase", "Schedule", "Submit", "analyse", "arrival_schedule",
    "back_to_back", "classify", "closed_loop", "closed_loop_capacity", "latencies_ms", "open_loop", "parse_phase",
    "parse_phases", "percentile", "phase_summary", "poisson_schedule", "recovery_time", "run_open_loop", "summarize",
    "window_p99",
]
