"""A CPU-bound child process competing with the server: the ``contention`` phases of a load test.

:class:`Contention` starts a Python busy loop (pinned to one core when the platform allows:
the last core this process may run on, unless told which) and kills it by its pid. What it
did is measured as CPU time, not wall time: ``cpu_s`` (user + system seconds the child got,
from the kernel's accounting when it is reaped) over ``wall_s`` (how long it was running) is
``core_share``, the share of one core it took from everything else on the machine.

Example:
    >>> import time
    >>> c = Contention()
    >>> c.start("busy"); time.sleep(0.3); c.stop()
    >>> r = c.record[0]
    >>> r["phase"], r["cpu_s"] > 0, 0 < r["core_share"] <= 1.05
    ('busy', True, True)
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

__all__ = ["BUSY_LOOP", "Contention"]

#: the child: a Python busy loop pinned to the core given as its argument
BUSY_LOOP = ("import os, sys\ncpu = int(sys.argv[1])\ntry:\n    os.sched_setaffinity(0, {cpu})\n"
             "except (AttributeError, OSError):\n    pass\nwhile True:\n    pass\n")


def _proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process from ``/proc`` (Linux), NaN elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return math.nan


class Contention:
    """A CPU-bound child process (a Python busy loop) pinned to one core, started and killed by pid.

    ``record`` holds one entry per :meth:`start` / :meth:`stop`: ``phase``, ``pid``, ``cpu``
    (the core), ``wall_s``, ``cpu_s`` and ``core_share`` (``cpu_s / wall_s``).
    """

    def __init__(self, cpu: Optional[int] = None) -> None:
        try:
            allowed = sorted(os.sched_getaffinity(0))
        except AttributeError:
            allowed = list(range(os.cpu_count() or 1))
        self.cpu = allowed[-1] if cpu is None else int(cpu)
        self.proc: Optional[subprocess.Popen] = None
        self.phase = ""
        self.started = math.nan
        self.record: List[Dict[str, Any]] = []

    @property
    def running(self) -> bool:
        return self.proc is not None

    def start(self, phase: str = "") -> None:
        """Start the busy process (no-op when it runs already)."""
        if self.proc is None:
            self.proc = subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(self.cpu)], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.started = time.perf_counter()
            self.phase = phase

    def _kill_and_reap(self, proc: subprocess.Popen) -> float:
        """Kill ``proc``, reap it and return the CPU seconds it used (from its rusage)."""
        before = _proc_cpu_seconds(proc.pid)
        proc.kill()
        wait4 = getattr(os, "wait4", None)
        if wait4 is not None:
            try:
                _, status, usage = wait4(proc.pid, 0)
                proc.returncode = -9
                return float(usage.ru_utime + usage.ru_stime)
            except ChildProcessError:  # reaped elsewhere
                pass
        proc.wait(10)
        return before

    def stop(self) -> None:
        """Kill the busy process (no-op when none runs) and record what it did."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        wall = time.perf_counter() - self.started
        cpu = self._kill_and_reap(proc)
        self.record.append({"phase": self.phase, "pid": proc.pid, "cpu": self.cpu, "wall_s": wall, "cpu_s": cpu,
                            "core_share": cpu / wall if wall > 0 else math.nan})

    def __enter__(self) -> "Contention":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
