"""An online latency model per (serving option, batch size): a profiled prior, corrected as it runs.

The prediction for option ``o`` at batch size ``n`` is ::

    prior_o(n) * cell_o(n) * g          (expected run time, ms)
    prior_o(n) * cell_o(n) * g * margin (what a deadline check should use: :meth:`LatencyModel.upper`)

``prior_o(n) = a_o + b_o * n``
    a linear model per option, least squares (``a, b >= 0``) over the profiled batch
    sizes (:meth:`LatencyModel.profile`, or :meth:`LatencyModel.from_profile_rows` from
    :func:`coopnets.profile` tables); with one profiled size the time is split half fixed,
    half per sample. Unprofiled batch sizes are inter-/extrapolated by the line.
``g`` (global slowdown)
    an EWMA of ``log(measured / predicted)`` shared by every cell, so that one observation
    of any option moves all predictions: CPU contention, throttling or a GPU shared with
    another job is learned within a few batches. It moves up faster (``alpha_up``) than
    down (``alpha_down``): being late costs more than being shallow.
``cell_o(n)``
    a slower per-cell EWMA of the rest of the error, kept *relative*: after each update the
    mean log correction of the cells observed in the last ``recent`` batches moves into
    ``g``. So what all recent cells share (a slowdown) is global and reaches the options
    not being run, and a cell only keeps what sets it apart from its recent peers (the
    prior's error at that batch size, early exit on real data). Batch sizes never observed
    take the interpolation of the observed neighbours' corrections.
``margin``
    the ``margin_quantile`` of the last ``margin_window`` ratios measured/predicted (the
    window starts full of 1.0, then the profile's repeat-to-repeat spread), clipped to
    ``[min_margin, max_margin]``.

:meth:`predict`/:meth:`upper` take no lock (dict reads and float stores are atomic under
the GIL; a prediction may be one observation stale); :meth:`observe` is serialized.

Example:
    >>> lat = LatencyModel({"depth1": {1: 2.0, 8: 9.0}, "depth2": {1: 4.0, 8: 18.0}})
    >>> round(lat.predict("depth1", 4), 2)    # a + b*n through the two profiled sizes
    5.0
    >>> for _ in range(6):                    # the machine became 3x slower
    ...     lat.observe("depth1", 8, 27.0)
    >>> 2.5 < lat.global_factor <= 3.0        # learned from depth 1 only, applies to depth 2 too
    True
    >>> lat.predict("depth2", 8) > 2.5 * 18.0
    True
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, Iterable, List, Mapping, Optional, Protocol, Sequence, Tuple, TypeVar

from ..inference.profiler import measure_latency

Prior = Mapping[str, Mapping[int, float]]


class Named(Protocol):
    """Anything with a ``name`` (a :class:`~coopnets.serving.ServingOption`)."""

    @property
    def name(self) -> str: ...


Opt = TypeVar("Opt", bound=Named)


def fit_line(points: Mapping[int, float]) -> Tuple[float, float]:
    """Least-squares ``(a, b)`` of ``ms = a + b * n`` with ``a, b >= 0`` through ``{n: ms}``.

    Example:
        >>> fit_line({1: 3.0, 3: 7.0})
        (1.0, 2.0)
        >>> fit_line({4: 8.0})                 # one point: half fixed cost, half per sample
        (4.0, 1.0)
        >>> fit_line({1: 5.0, 8: 4.0})         # noise that would make b < 0: flat
        (4.5, 0.0)
    """
    pts = [(int(n), float(t)) for n, t in points.items()]
    if not pts or any(n < 1 or not t > 0 for n, t in pts):
        raise ValueError(f"a latency prior needs batch sizes >= 1 with times > 0 ms, got {dict(points)!r}.")
    if len({n for n, _ in pts}) == 1:
        n, t = pts[0]
        return t / 2, t / (2 * n)
    mean_n = sum(n for n, _ in pts) / len(pts)
    mean_t = sum(t for _, t in pts) / len(pts)
    var = sum((n - mean_n) ** 2 for n, _ in pts)
    b = sum((n - mean_n) * (t - mean_t) for n, t in pts) / var
    if b < 0:
        return mean_t, 0.0
    a = mean_t - b * mean_n
    if a < 0:  # through the origin instead
        return 0.0, sum(n * t for n, t in pts) / sum(n * n for n, _ in pts)
    return a, b


def _quantile(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


class LatencyModel:
    """Predicted run time (ms) of a batch per serving option and batch size, learned online.

    Args:
        prior: ``{option name: {batch size: ms}}`` measured before serving (see :meth:`profile`).
        alpha_up / alpha_down: EWMA weights of the global slowdown when a batch ran slower /
            faster than predicted.
        alpha_cell: EWMA weight of the per-(option, batch size) correction.
        recent: how many recent observations define "the cells in use" whose common
            correction is moved into the global factor.
        margin_quantile / margin_window: the safety margin is this quantile of the last
            ``margin_window`` ratios measured/predicted.
        min_margin / max_margin: bounds of the margin.
        max_step: one observation moves the model by at most this factor (a single stall
            does not swamp it).
        spread: initial ratios measured/predicted for the margin (the profile's spread).
    """

    def __init__(
        self,
        prior: Optional[Prior] = None,
        *,
        alpha_up: float = 0.6,
        alpha_down: float = 0.3,
        alpha_cell: float = 0.2,
        recent: int = 16,
        margin_quantile: float = 0.95,
        margin_window: int = 64,
        min_margin: float = 1.0,
        max_margin: float = 3.0,
        max_step: float = 8.0,
        spread: Iterable[float] = (),
    ) -> None:
        for name, value in (("alpha_up", alpha_up), ("alpha_down", alpha_down), ("alpha_cell", alpha_cell),
                            ("margin_quantile", margin_quantile)):
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value!r}.")
        if margin_window < 1 or recent < 1 or not 1.0 <= min_margin <= max_margin or max_step <= 1.0:
            raise ValueError("need margin_window >= 1, recent >= 1, 1 <= min_margin <= max_margin and max_step > 1.")
        self.alpha_up, self.alpha_down, self.alpha_cell = alpha_up, alpha_down, alpha_cell
        self.margin_quantile, self.min_margin, self.max_margin = margin_quantile, min_margin, max_margin
        self.max_step = max_step
        self._lock = threading.Lock()
        self._lines: Dict[str, Tuple[float, float]] = {}
        self._points: Dict[str, Dict[int, float]] = {}
        self._cells: Dict[str, Dict[int, float]] = {}  # observed log corrections per option
        self._cache: Dict[str, Dict[int, float]] = {}  # prior * correction, without g
        self._recent: Deque[Tuple[str, int]] = deque(maxlen=recent)
        self._ratios: Deque[float] = deque([1.0] * margin_window, maxlen=margin_window)
        self._log_g = 0.0
        self._g = 1.0
        self._margin = min_margin
        self.observations = 0
        for name, points in (prior or {}).items():
            self.set_prior(name, points)
        self._ratios.extend(float(r) for r in spread)
        self._update_margin()

    # --- the prior --------------------------------------------------------------
    def set_prior(self, option_name: str, points: Mapping[int, float]) -> None:
        """(Re)set the profiled ``{batch size: ms}`` of one option (its learned corrections are kept)."""
        line = fit_line(points)
        with self._lock:
            self._lines[option_name] = line
            self._points[option_name] = {int(n): float(t) for n, t in points.items()}
            self._cache[option_name] = {}

    def prior(self, option_name: str, batch_size: int) -> float:
        """The profiled line ``a + b * n`` of ``option_name`` (ms); ``KeyError`` for an unknown option."""
        a, b = self._lines[option_name]
        return a + b * batch_size

    @property
    def options(self) -> List[str]:
        """Names of the options with a prior."""
        return list(self._lines)

    # --- predictions -------------------------------------------------------------
    @property
    def global_factor(self) -> float:
        """The learned global slowdown ``g`` (1.0 = as profiled)."""
        return self._g

    @property
    def margin(self) -> float:
        """The current multiplicative safety margin."""
        return self._margin

    def _base(self, option_name: str, n: int) -> float:
        cache = self._cache[option_name]
        value = cache.get(n)
        if value is None:
            value = self.prior(option_name, n) * self.correction(option_name, n)
            cache[n] = value
        return value

    def predict(self, option_name: str, batch_size: int) -> float:
        """Expected run time (ms) of one batch of ``batch_size`` with ``option_name`` (no margin)."""
        return self._base(option_name, batch_size) * self._g

    def upper(self, option_name: str, batch_size: int) -> float:
        """:meth:`predict` times the safety :attr:`margin`: what a deadline check should compare."""
        return self._base(option_name, batch_size) * self._g * self._margin

    def correction(self, option_name: str, batch_size: int) -> float:
        """The learned per-cell correction; unobserved sizes interpolate their observed neighbours."""
        return math.exp(self._log_correction(option_name, batch_size))

    def _log_correction(self, option_name: str, n: int) -> float:
        cells = self._cells.get(option_name)
        if not cells:
            return 0.0
        if n in cells:
            return cells[n]
        below = [k for k in cells if k < n]
        above = [k for k in cells if k > n]
        if not below:
            return cells[min(above)]
        if not above:
            return cells[max(below)]
        lo, hi = max(below), min(above)
        w = (n - lo) / (hi - lo)
        return cells[lo] * (1 - w) + cells[hi] * w

    # --- learning -----------------------------------------------------------------
    def _clip(self, ratio: float) -> float:
        return min(max(ratio, 1.0 / self.max_step), self.max_step)

    def observe(self, option_name: str, batch_size: int, measured_ms: float) -> None:
        """Learn from one measured batch: global slowdown, this cell's correction and the margin.

        An option without a prior gets one from this measurement.
        """
        if not measured_ms > 0 or math.isinf(measured_ms):
            return
        n = int(batch_size)
        with self._lock:
            if option_name not in self._lines:
                self._lines[option_name] = fit_line({n: measured_ms / self._g})
                self._points[option_name] = {}
                self._cache[option_name] = {}
            prior = self.prior(option_name, n)
            log_cell = self._log_correction(option_name, n)
            ratio = measured_ms / (prior * math.exp(log_cell) * self._g)
            self._ratios.append(ratio)
            step = self._clip(ratio)
            log_g = self._log_g + (self.alpha_up if step > 1.0 else self.alpha_down) * math.log(step)
            rest = self._clip(measured_ms / (prior * math.exp(log_cell + log_g)))
            self._cells.setdefault(option_name, {})[n] = log_cell + self.alpha_cell * math.log(rest)
            # what the cells in use share is global: move their mean log correction into g
            self._recent.append((option_name, n))
            common = sum(self._cells[o][k] for o, k in self._recent) / len(self._recent)
            for o, k in set(self._recent):
                self._cells[o][k] -= common
                self._cache[o] = {}
            self._cache[option_name] = {}
            self._log_g = log_g + common
            self._g = math.exp(self._log_g)
            self.observations += 1
            self._update_margin()

    def _update_margin(self) -> None:
        m = _quantile(self._ratios, self.margin_quantile)
        self._margin = min(max(m, self.min_margin), self.max_margin)

    def reset(self) -> None:
        """Forget everything learned online (global slowdown, corrections, observed ratios)."""
        with self._lock:
            self._log_g, self._g = 0.0, 1.0
            self._cells.clear()
            self._recent.clear()
            self._cache = {name: {} for name in self._lines}
            self._ratios.extend([1.0] * (self._ratios.maxlen or 1))
            self.observations = 0
            self._update_margin()

    def snapshot(self, batch_sizes: Sequence[int] = (1,)) -> Dict[str, Any]:
        """What the model believes now: ``global_factor``, ``margin``, ``observations`` and
        ``predicted_ms`` (``{option: {n: ms}}`` for ``batch_sizes``)."""
        return {
            "global_factor": self._g,
            "margin": self._margin,
            "observations": self.observations,
            "predicted_ms": {o: {n: self.predict(o, n) for n in batch_sizes} for o in self.options},
        }

    # --- building the prior -------------------------------------------------------
    @classmethod
    def profile(
        cls,
        run: Callable[[Opt, int], Any],
        options: Sequence[Opt],
        batch_sizes: Sequence[int],
        repeats: int = 3,
        warmup: int = 1,
        **kwargs: Any,
    ) -> "LatencyModel":
        """Measure ``run(option, n)`` for every option and batch size: the prior of a new model.

        Each cell's time is :func:`~coopnets.inference.profiler.measure_latency`'s median of
        ``repeats`` timed calls after ``warmup`` untimed ones; the repeats' spread around the
        fitted lines seeds the margin. ``kwargs`` go to :class:`LatencyModel`.

        Example:
            >>> import time
            >>> from coopnets.serving import ServingOption
            >>> opts = [ServingOption("depth1", 1, 0.8), ServingOption("depth2", 2, 0.9)]
            >>> lat = LatencyModel.profile(lambda o, n: time.sleep(1e-3 * o.depth * n), opts, [1, 2])
            >>> lat.predict("depth2", 2) > lat.predict("depth1", 2) > lat.predict("depth1", 1)
            True
        """
        if repeats < 1 or not batch_sizes:
            raise ValueError("profile needs repeats >= 1 and at least one batch size.")
        prior: Dict[str, Dict[int, float]] = {}
        samples: Dict[Tuple[str, int], List[float]] = {}
        for option in options:
            for n in sorted(set(int(b) for b in batch_sizes)):
                times: List[float] = []

                def timed(option: Opt = option, n: int = n, times: List[float] = times) -> None:
                    start = time.perf_counter()
                    run(option, n)
                    times.append((time.perf_counter() - start) * 1e3)

                prior.setdefault(option.name, {})[n] = measure_latency(timed, repeats=repeats, warmup=warmup)
                samples[option.name, n] = times[warmup:]
        lines = {name: fit_line(points) for name, points in prior.items()}
        spread = [t / (lines[name][0] + lines[name][1] * n) for (name, n), ts in samples.items() for t in ts]
        return cls(prior, spread=spread, **kwargs)

    @classmethod
    def from_profile_rows(cls, rows: Iterable[Mapping[str, Any]], **kwargs: Any) -> "LatencyModel":
        """A model whose fixed-depth priors (``depth{d}``) come from :func:`coopnets.profile` rows
        (``depth``, ``latency_ms``, ``batch_size``; profile several batch sizes and pass all rows).

        Example:
            >>> rows = [{"depth": 1, "latency_ms": 2.0, "batch_size": 1},
            ...         {"depth": 1, "latency_ms": 9.0, "batch_size": 8}]
            >>> LatencyModel.from_profile_rows(rows).predict("depth1", 8)
            9.0
        """
        prior: Dict[str, Dict[int, float]] = {}
        for r in rows:
            prior.setdefault(f"depth{int(r['depth'])}", {})[int(r.get("batch_size", 1))] = float(r["latency_ms"])
        return cls(prior, **kwargs)
