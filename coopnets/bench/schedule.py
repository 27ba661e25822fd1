"""Phases of load and seeded arrival schedules: when each request is sent and which image it carries.

A phase is ``NAME:RATE:SECONDS[:contention]`` (requests/s for so many seconds, optionally
with the busy process of :mod:`coopnets.bench.contention` running); phases run back to back.
Arrivals within a phase are a renewal process with mean inter-arrival ``1 / rate``:
exponential (Poisson arrivals) when ``burstiness == 1``, else gamma with shape
``burstiness`` and scale ``1 / (rate * burstiness)`` (vLLM's definition: the coefficient of
variation of the gaps is ``1 / sqrt(burstiness)``, so below 1 is burstier than Poisson).

Every phase draws from its own generator, keyed by the seed, the phase's name and its
occurrence, so changing one phase (its rate, its length, a warm-up before it) does not
move another phase's arrivals or images (they shift in time with the phase's start, nothing
else). Images cycle through seeded permutations of the set, so every image is used about
equally often.

Example:
    >>> phases = parse_phases(["quiet:10:2", "burst:40:1:contention"], warmup_s=1)
    >>> [(p.name, p.start, p.rate, p.contention) for p in phases]
    [('warmup', 0.0, 10.0, False), ('quiet', 1.0, 10.0, False), ('burst', 3.0, 40.0, True)]
    >>> s = arrival_schedule(phases, n_items=5, seed=0)
    >>> bool((s.times[s.phase == 2] >= 3.0).all()), sorted(set(s.item.tolist()))
    (True, [0, 1, 2, 3, 4])
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["Phase", "Schedule", "arrival_schedule", "back_to_back", "parse_phase", "parse_phases", "poisson_schedule"]

#: the name of the unscored phase a warm-up adds before the others
WARMUP = "warmup"


@dataclass(frozen=True)
class Phase:
    """One phase of the load: ``rate`` requests/s from ``start`` for ``duration`` seconds (schedule time).

    Example:
        >>> Phase("burst", 2.0, 3.0, 60.0).end
        5.0
    """

    name: str
    start: float
    duration: float
    rate: float
    contention: bool = False

    @property
    def end(self) -> float:
        return self.start + self.duration


def parse_phase(spec: str) -> Tuple[str, float, float, bool]:
    """``NAME:RATE:SECONDS[:contention]`` as ``(name, rate, seconds, contention)``; ``ValueError`` (one line,
    naming the spec) when it is not one.

    Example:
        >>> parse_phase("burst:60:12"), parse_phase("busy:20:5:contention")
        (('burst', 60.0, 12.0, False), ('busy', 20.0, 5.0, True))
        >>> parse_phase("burst:-1:12")
        Traceback (most recent call last):
        ...
        ValueError: --phase burst:-1:12: the rate must be a number > 0 (requests/s), e.g. burst:60:12
    """
    parts = str(spec).split(":")
    example = "e.g. burst:60:12 or busy:20:12:contention"
    if len(parts) not in (3, 4) or not parts[0].strip():
        raise ValueError(f"--phase {spec}: give NAME:RATE:SECONDS[:contention], {example}")
    name = parts[0].strip()
    values = []
    for field, text in (("rate", parts[1]), ("length", parts[2])):
        try:
            v = float(text)
        except ValueError:
            v = math.nan
        if not (math.isfinite(v) and v > 0):
            unit = "requests/s" if field == "rate" else "seconds"
            raise ValueError(f"--phase {spec}: the {field} must be a number > 0 ({unit}), e.g. {name}:60:12")
        values.append(v)
    if len(parts) == 4 and parts[3].strip().lower() != "contention":
        raise ValueError(f"--phase {spec}: the optional 4th field can only be 'contention', {example}")
    return name, values[0], values[1], len(parts) == 4


def back_to_back(specs: Sequence[Tuple[str, float, float, bool]], warmup_s: float = 0.0,
                 warmup_rate: Optional[float] = None) -> List[Phase]:
    """Phases ``(name, rate, seconds, contention)`` one after another from 0, after a warm-up of ``warmup_s``
    seconds (named ``warmup``, at ``warmup_rate``, default the first phase's rate) when ``warmup_s > 0``.

    Example:
        >>> [(p.name, p.start, p.end) for p in back_to_back([("a", 5, 2, False), ("b", 9, 1, False)], warmup_s=0.5)]
        [('warmup', 0.0, 0.5), ('a', 0.5, 2.5), ('b', 2.5, 3.5)]
    """
    phases: List[Phase] = []
    t = 0.0
    if warmup_s > 0 and specs:
        rate = float(specs[0][1] if warmup_rate is None else warmup_rate)
        phases.append(Phase(WARMUP, 0.0, float(warmup_s), rate))
        t = float(warmup_s)
    for name, rate, seconds, contention in specs:
        if not (rate > 0 and seconds > 0):
            raise ValueError(f"phase {name!r}: the rate ({rate!r}) and the length ({seconds!r}) must be > 0")
        phases.append(Phase(str(name), t, float(seconds), float(rate), bool(contention)))
        t += float(seconds)
    return phases


def parse_phases(specs: Sequence[str], warmup_s: float = 0.0) -> List[Phase]:
    """The ``--phase`` specs (:func:`parse_phase`) back to back after a warm-up (:func:`back_to_back`).

    Names must differ from each other and from ``warmup`` (the report is keyed by name).

    Example:
        >>> [p.name for p in parse_phases(["a:1:1", "b:2:1"])]
        ['a', 'b']
        >>> parse_phases(["a:1:1", "a:2:1"])
        Traceback (most recent call last):
        ...
        ValueError: --phase a:2:1: the phase name 'a' is used twice; give every phase its own name
    """
    parsed, seen = [], {WARMUP}
    for spec in specs:
        p = parse_phase(spec)
        if p[0] in seen:
            why = "is the warm-up's (--warmup-s)" if p[0] == WARMUP else "is used twice"
            raise ValueError(f"--phase {spec}: the phase name {p[0]!r} {why}; give every phase its own name")
        seen.add(p[0])
        parsed.append(p)
    return back_to_back(parsed, warmup_s)


@dataclass
class Schedule:
    """Scheduled arrivals: ``times`` (s from the start, sorted), the ``phase`` index and image ``item`` of each."""

    phases: List[Phase]
    times: np.ndarray
    phase: np.ndarray
    item: np.ndarray

    def __len__(self) -> int:
        return len(self.times)

    @property
    def end(self) -> float:
        return self.phases[-1].end if self.phases else 0.0

    def index(self, name: str) -> int:
        """The index of the phase called ``name``."""
        return next(i for i, p in enumerate(self.phases) if p.name == name)

    def phase_of(self, i: int) -> Phase:
        """The phase request ``i`` belongs to."""
        return self.phases[int(self.phase[i])]


def _gaps(rng: np.random.Generator, rate: float, burstiness: float, size: int) -> np.ndarray:
    if burstiness == 1.0:
        return rng.exponential(1.0 / rate, size=size)
    return rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=size)


def _phase_keys(phases: Sequence[Phase], seed: int) -> List[List[int]]:
    seen: Dict[str, int] = {}
    keys = []
    for ph in phases:
        k = seen.get(ph.name, 0)
        seen[ph.name] = k + 1
        keys.append([int(seed), zlib.crc32(ph.name.encode()), k])
    return keys


def arrival_schedule(phases: Sequence[Phase], n_items: int, seed: int = 0, burstiness: float = 1.0) -> Schedule:
    """Arrivals at each phase's rate (Poisson, or gamma gaps of the given ``burstiness``) and each one's image.

    Seeded, nothing else: the same phases, ``n_items``, ``seed`` and ``burstiness`` give the same
    schedule. ``n_items`` images are cycled through in seeded permutations per phase.

    Example:
        >>> ph = [Phase("a", 0.0, 50.0, 40.0)]
        >>> poisson, bursty = arrival_schedule(ph, 3, seed=1), arrival_schedule(ph, 3, seed=1, burstiness=0.25)
        >>> cv = lambda s: float(np.std(np.diff(s.times)) / np.mean(np.diff(s.times)))
        >>> round(cv(poisson), 1), 1.6 < cv(bursty) < 2.4, 1800 < len(bursty) < 2200
        (1.0, True, True)
        >>> bool(np.array_equal(poisson.times, arrival_schedule(ph, 3, seed=1).times))
        True
    """
    if not (burstiness > 0 and math.isfinite(burstiness)):
        raise ValueError(f"--burstiness {burstiness}: must be a number > 0 (1: Poisson; below 1: burstier)")
    if n_items < 1:
        raise ValueError(f"there are no images to send (n_items={n_items})")
    times, phase_of, items = [], [], []
    for i, (ph, key) in enumerate(zip(phases, _phase_keys(phases, seed))):
        rng = np.random.default_rng(key)
        t, out = ph.start, []
        while True:
            expected = max(16, int(1.2 * ph.rate * (ph.end - t)) + 16)
            arrivals = t + np.cumsum(_gaps(rng, ph.rate, burstiness, expected))
            out.append(arrivals[arrivals < ph.end])
            if arrivals[-1] >= ph.end:
                break
            t = float(arrivals[-1])
        got = np.concatenate(out)
        times.append(got)
        phase_of.append(np.full(len(got), i, dtype=np.int64))
        item_rng = np.random.default_rng(key + [1])
        perms = [item_rng.permutation(n_items) for _ in range(max(1, math.ceil(len(got) / n_items)))]
        items.append(np.concatenate(perms)[:len(got)].astype(np.int64))
    if not times:
        return Schedule(list(phases), np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.int64))
    return Schedule(list(phases), np.concatenate(times), np.concatenate(phase_of), np.concatenate(items))


def poisson_schedule(phases: Sequence[Phase], n_items: int, seed: int = 0) -> Schedule:
    """Poisson arrivals (:func:`arrival_schedule` with ``burstiness=1``).

    Example:
        >>> s = poisson_schedule([Phase("a", 0.0, 1.0, 100.0), Phase("b", 1.0, 1.0, 300.0)], n_items=5, seed=1)
        >>> bool(np.all(np.diff(s.times) > 0)), 250 < len(s) < 550, sorted(set(s.item.tolist()))
        (True, True, [0, 1, 2, 3, 4])
    """
    return arrival_schedule(phases, n_items, seed, 1.0)
