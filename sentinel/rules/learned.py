"""Learned (dynamic) thresholds: a robust per-series baseline fitted on Prometheus history.

For each series of a rule's signal (its ``expr``, without a comparison), scikit-learn's MinCovDet
(Minimum Covariance Determinant: a robust location and scale that ignores up to half the points as
outliers) is fitted over ``history`` from ``query_range``. The band is ``center ± k·scale``; the rule's
alert holds the series that leave it (``direction``: above, below or both). Bands are refitted every
``refit`` and exported as ``sentinel_learned_threshold_{lower,upper}`` so dashboards draw them.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
from prometheus_client.core import Metric
from prometheus_client.registry import Collector
from sklearn.covariance import MinCovDet

from sentinel.alerts.fingerprint import fingerprint
from sentinel.alerts.state import Sample

Direction = Literal["above", "below", "both"]
MIN_RELATIVE_SCALE = 1e-3  # a flat history still gets a band 0.1 % of its level wide (no zero-width band)


@dataclass(frozen=True)
class Band:
    center: float
    scale: float
    k: float
    points: int
    fitted_at: float

    @property
    def lower(self) -> float:
        return self.center - self.k * self.scale

    @property
    def upper(self) -> float:
        return self.center + self.k * self.scale

    def departs(self, value: float, direction: Direction) -> bool:
        above, below = value > self.upper, value < self.lower
        return {"above": above, "below": below, "both": above or below}[direction]


def fit_band(values: Iterable[float], k: float, now: float) -> Band:
    """A robust center and scale of ``values`` (NaN/Inf dropped); raises ValueError with too few points."""
    x = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
    if len(x) < 4:
        raise ValueError(f"only {len(x)} finite points: too few to fit")
    if np.ptp(x) == 0:
        center, scale = float(x[0]), 0.0
    else:
        mcd = MinCovDet(random_state=0, support_fraction=None).fit(x.reshape(-1, 1))
        center, scale = float(mcd.location_[0]), float(math.sqrt(mcd.covariance_[0, 0]))
    scale = max(scale, abs(center) * MIN_RELATIVE_SCALE, 1e-12)
    return Band(center, scale, k, len(x), now)


# (signal, start, end, step) → {series labels (frozen) : values}
RangeQuery = Callable[[str, float, float, float], list[tuple[dict[str, str], list[float]]]]


class LearnedThresholds(Collector):
    """The fitted bands of every learned rule, keyed by rule and series fingerprint."""

    def __init__(self) -> None:
        self._bands: dict[str, dict[str, tuple[dict[str, str], Band]]] = {}
        self._lock = threading.Lock()

    def refit(self, rule: str, expr: str, query_range: RangeQuery, history: float, step: float, k: float,
              min_points: int, now: float | None = None) -> int:
        """Fit every series of ``expr`` over the last ``history`` seconds; returns how many got a band."""
        now = time.time() if now is None else now
        fitted: dict[str, tuple[dict[str, str], Band]] = {}
        for labels, values in query_range(expr, now - history, now, step):
            if sum(1 for v in values if math.isfinite(v)) < min_points:
                continue
            fitted[fingerprint(labels)] = (labels, fit_band(values, k, now))
        with self._lock:
            self._bands[rule] = fitted
        return len(fitted)

    def band(self, rule: str, labels: Mapping[str, str]) -> Band | None:
        with self._lock:
            entry = self._bands.get(rule, {}).get(fingerprint(labels))
        return entry[1] if entry else None

    def departures(self, rule: str, samples: list[Sample], direction: Direction) -> list[Sample]:
        """The samples outside their series' band (series without a band yet never alert)."""
        out = []
        for s in samples:
            b = self.band(rule, {k: v for k, v in s.labels.items() if k != "__name__"})
            if b is not None and b.departs(s.value, direction):
                out.append(s)
        return out

    def forget(self, keep: set[str]) -> None:
        with self._lock:
            for rule in set(self._bands) - keep:
                del self._bands[rule]

    def collect(self) -> Iterable[Metric]:
        lower = Metric("sentinel_learned_threshold_lower", "Lower edge of a learned threshold band.", "gauge")
        upper = Metric("sentinel_learned_threshold_upper", "Upper edge of a learned threshold band.", "gauge")
        center = Metric("sentinel_learned_threshold_center", "Robust center of a learned baseline.", "gauge")
        with self._lock:
            items = [(rule, labels, band) for rule, series in self._bands.items() for labels, band in series.values()]
        for rule, labels, band in items:
            lbs = {**labels, "alertname": rule}
            lower.add_sample(lower.name, lbs, band.lower)
            upper.add_sample(upper.name, lbs, band.upper)
            center.add_sample(center.name, lbs, band.center)
        yield from (lower, upper, center)
