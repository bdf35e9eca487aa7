"""Learned thresholds: robust bands, departures, the exported series."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from sentinel.alerts.state import Sample
from sentinel.rules.learned import LearnedThresholds, fit_band
from sentinel.rules.model import Rule


def test_band_ignores_the_spikes_it_is_fitted_on() -> None:
    rng = np.random.default_rng(0)
    x = 0.12 + 0.01 * rng.standard_normal(1000)
    x[::50] = 2.0  # 2 % spikes in the history
    b = fit_band(x, k=4, now=0)
    assert 0.115 < b.center < 0.125 and 0.008 < b.scale < 0.012
    assert b.departs(0.3, "above") and not b.departs(0.14, "above")
    assert b.departs(0.05, "below") and not b.departs(0.05, "above") and b.departs(0.05, "both")


def test_flat_history_still_gets_a_band_and_too_few_points_fail() -> None:
    b = fit_band([5.0] * 10, k=3, now=0)
    assert b.upper > 5.0 > b.lower and b.departs(5.1, "above")
    with pytest.raises(ValueError, match="too few"):
        fit_band([1.0, float("nan"), 2.0], k=3, now=0)


def test_refit_departures_and_exported_series() -> None:
    lt = LearnedThresholds()
    hist = {"a": list(np.linspace(0.10, 0.12, 100)), "b": [0.3] * 100, "short": [0.1] * 3}

    def query_range(expr: str, start: float, end: float, step: float) -> list[tuple[dict[str, str], list[float]]]:
        assert (start, end, step) == (0.0, 86400.0, 60.0)
        return [({"replica": k}, v) for k, v in hist.items()]

    assert lt.refit("r", "signal", query_range, 86400, 60, k=4, min_points=30, now=86400) == 2
    now = [Sample({"__name__": "x", "replica": "a"}, 0.5), Sample({"replica": "b"}, 0.3),
           Sample({"replica": "short"}, 9.0)]
    assert [s.labels.get("replica") for s in lt.departures("r", now, "above")] == ["a"]
    reg = CollectorRegistry()
    reg.register(lt)
    text = generate_latest(reg).decode()
    assert 'sentinel_learned_threshold_upper{alertname="r",replica="a"}' in text
    assert 'sentinel_learned_threshold_center{alertname="r",replica="b"} 0.3' in text
    lt.forget(set())
    assert lt.departures("r", now, "above") == []


def test_rule_model_requires_a_signal() -> None:
    r = Rule.model_validate({"alert": "A", "expr": "latency", "sentinel": {"learned": {"k": 3, "history": "2d"}}})
    assert r.kind == "learned" and r.sentinel.learned is not None and r.sentinel.learned.history == 172800
    with pytest.raises(ValueError, match="needs a PromQL signal"):
        Rule.model_validate({"alert": "A", "log": {"filter": [{"exists": "x"}]}, "sentinel": {"learned": {}}})
