"""ElastAlert's rule types over the local store (the Elasticsearch store gives the same counts: see the
parity test in tests/integration/test_elasticsearch_shipping.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sentinel.logstore.local import LocalLogStore
from sentinel.rules.logtypes import log_query
from sentinel.rules.sources import LogRuleSource

T0 = 1_000_000.0


def store(tmp_path: Path, events: list[tuple[float, dict[str, Any]]]) -> LogRuleSource:
    s = LocalLogStore(tmp_path / "logs.db")
    s.add(events)
    return LogRuleSource(s)


def got(src: LogRuleSource, at: float, **q: Any) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value for s in src.query(log_query(**q), at)}


def run(src: LogRuleSource, start: float, end: float, step: float, **q: Any
        ) -> dict[float, dict[tuple[tuple[str, str], ...], float]]:
    """One rule evaluated every ``step`` from ``start`` to ``end`` (as the evaluator does): the times with
    samples, relative to T0."""
    query = log_query(**q)
    out = {}
    t = start
    while t <= end + 1e-9:
        samples = {tuple(sorted(s.labels.items())): s.value for s in src.query(query, t, rule="r")}
        if samples:
            out[round(t - T0, 3)] = samples
        t += step
    return out


def test_flatline_keeps_alerting_a_quiet_group_until_it_logs_again(tmp_path: Path) -> None:
    """ElastAlert2's flatline: every group seen is watched from a timeframe after it was first seen until it
    logs again; with forget_keys it alerts once and is dropped until it logs again."""
    # replica-a logs every 10 s until +170; replica-b until +50, then again at +300
    ev = [(T0 + t, {"replica": "a"}) for t in range(0, 180, 10)] + \
         [(T0 + t, {"replica": "b"}) for t in [*range(0, 60, 10), 300]]
    q = {"type": "flatline", "threshold": 3, "timeframe": 60, "query_key": "replica"}
    fired = run(store(tmp_path / "1", ev), T0 + 10, T0 + 400, 10, **q)
    b, a = (("replica", "b"),), (("replica", "a"),)
    assert min(fired) == 90 and fired[90] == {b: 2.0}  # (30, 90] holds +40 and +50: fewer than 3
    assert all(b in fired[t] for t in range(90, 410, 10))  # still silent at +400: still alerting (not forgotten)
    assert fired[300][b] == 1.0 and fired[360][b] == 0.0   # the one line at +300 is not 3 a minute
    assert [t for t in fired if a in fired[t]] == list(range(210, 410, 10))  # a: from (150, 210] holding 2
    once = run(store(tmp_path / "2", ev), T0 + 10, T0 + 400, 10, **q, forget_keys=True)
    assert {t: sorted(k[0][1] for k in v) for t, v in once.items()} == {90: ["b"], 210: ["a"], 360: ["b"]}
    # without a query_key the whole stream is watched: silence is a sample of value 0
    assert run(store(tmp_path / "3", ev), T0 + 500, T0 + 500, 10, type="flatline", threshold=1, timeframe=60) == {
        500: {(): 0.0}}


def test_spike_needs_a_baseline_and_an_empty_reference_is_a_spike(tmp_path: Path) -> None:
    """As ElastAlert2's spike: a group is judged once seen for two timeframes; the count in the window is
    compared with the window before, threshold_ref and threshold_cur default to 0, so events against an
    empty reference are a spike; after a spike the group starts over."""
    base = [(T0 - 180 + t, {"replica": "a", "level": "error"}) for t in range(0, 180, 20)]  # 3 a minute
    burst = [(T0 + t, {"replica": "a", "level": "error"}) for t in range(0, 60, 4)]          # then 15
    src = store(tmp_path / "1", base + burst)
    assert got(src, T0 + 59.9, type="spike", spike_height=4, timeframe=60) == {(): 5.0}
    assert got(src, T0 + 59.9, type="spike", spike_height=6, timeframe=60) == {}
    assert got(src, T0 + 59.9, type="spike", spike_height=4, spike_type="down", timeframe=60) == {}
    assert got(src, T0 + 59.9, type="spike", spike_height=4, threshold_ref=5, timeframe=60) == {}
    assert got(src, T0 + 119.9, type="spike", spike_height=4, spike_type="down", timeframe=60) == {(): 0.0}
    # evaluated every 10 s: one match when the burst is 4x the minute before ((-10, 50]: 13 against 3), then
    # the group starts over; two timeframes on, the burst's tail in the reference window makes a dip
    both = run(store(tmp_path / "2", base + burst), T0 - 60, T0 + 200, 10, type="spike", spike_height=4,
               timeframe=60)
    assert both == {50: {(): 13 / 3}, 170: {(): 0.0}}
    # a group seen long ago, silent in the reference window, then 6 events: a spike (6 against 0)
    quiet = [(T0 - 1000 + t, {"replica": "b"}) for t in range(0, 100, 10)] + \
            [(T0 - 50 + t, {"replica": "b"}) for t in range(0, 60, 10)]
    assert got(store(tmp_path / "3", quiet), T0, type="spike", spike_height=2, timeframe=60,
               query_key="replica") == {(("replica", "b"),): 6.0}
    # a group never seen before has no baseline: no spike
    new = [(T0 - 50 + t, {"replica": "c"}) for t in range(0, 60, 10)]
    assert got(store(tmp_path / "4", new), T0, type="spike", spike_height=2, timeframe=60, query_key="replica") == {}


def test_percentage_match(tmp_path: Path) -> None:
    ev = [(T0 + i, {"replica": r, "finish_reason": "stop" if i % 4 else "length"})
          for i in range(40) for r in ("a", "b") if r == "a" or i % 2]
    src = store(tmp_path, ev)
    q = {"type": "percentage_match", "match_bucket_filter": [{"term": {"finish_reason": "length"}}],
         "timeframe": 100, "query_key": "replica"}
    assert got(src, T0 + 50, max_percentage=20, **q) == {(("replica", "a"),): 25.0}  # b: 0 % of 20
    assert got(src, T0 + 50, min_percentage=10, **q) == {(("replica", "b"),): 0.0}


def test_query_delay_evaluates_the_window_earlier(tmp_path: Path) -> None:
    src = store(tmp_path, [(T0 + 5, {"cuda_error": "x"})])
    assert got(src, T0 + 70, type="any", filter=[{"exists": "cuda_error"}], timeframe=60) == {}
    assert got(src, T0 + 70, type="any", filter=[{"exists": "cuda_error"}], timeframe=60, query_delay=30) == {(): 1.0}


@pytest.mark.parametrize(("q", "msg"), [({"type": "flatline"}, "flatline needs threshold"),
                                        ({"type": "spike"}, "spike needs spike_height"),
                                        ({"type": "any", "threshold": 3}, "only for type flatline"),
                                        ({"type": "percentage_match", "match_bucket_filter": [{"exists": "x"}]},
                                         "min_percentage or max_percentage"),
                                        ({"type": "frequency", "threshold_ref": 2}, "only for type spike"),
                                        ({"type": "any", "forget_keys": True}, "forget_keys: only for type flatline"),
                                        ({"type": "flatline", "threshold": 2, "num_events": 3},
                                         "num_events: only for type frequency"),
                                        ({"type": "change"}, "change needs compare_key"),
                                        ({"type": "new_term", "fields": []}, "new_term needs fields"),
                                        ({"type": "metric_aggregation", "metric_agg_key": "x", "metric_agg_type": "max",
                                          "max_threshold": 1, "percentiles_method": "hdr"},
                                         "percentiles_method: only for metric_agg_type percentiles")])
def test_rule_types_are_validated(q: dict[str, Any], msg: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=msg):
        log_query(**q)


def test_new_term_from_the_store_itself(tmp_path: Path) -> None:
    """A finish_reason or model never seen in the 30 days before fires once it appears; a restart asks
    the same store, so it neither floods nor forgets."""
    day = 86400.0
    ev = [(T0 - 10 * day + i, {"replica": "a", "finish_reason": "stop"}) for i in range(5)] + \
         [(T0 + 10, {"replica": "a", "finish_reason": "stop"}), (T0 + 20, {"replica": "a", "finish_reason": "abort"}),
          (T0 + 30, {"replica": "b", "finish_reason": "stop"}), (T0 + 40, {"replica": "b"})]
    src = store(tmp_path, ev)
    q = {"type": "new_term", "fields": ["finish_reason"], "timeframe": 60}
    assert got(src, T0 + 60, **q) == {(("finish_reason", "abort"),): 1.0}
    assert got(src, T0 + 60, **q, query_key="replica") == {(("finish_reason", "abort"), ("replica", "a")): 1.0,
                                                          (("finish_reason", "stop"), ("replica", "b")): 1.0}
    assert got(src, T0 + 60, **{**q, "terms_window_size": 5 * day}) == {
        (("finish_reason", "abort"),): 1.0, (("finish_reason", "stop"),): 2.0}  # 10 days ago is forgotten


def test_change_of_a_value_within_the_window(tmp_path: Path) -> None:
    ev = [(T0 + 1, {"replica": "a", "model": "v1"}), (T0 + 2, {"replica": "a", "model": "v2"}),
          (T0 + 3, {"replica": "b", "model": "v1"}), (T0 + 4, {"replica": "b", "model": "v1"}),
          (T0 + 5, {"replica": "b"})]
    src = store(tmp_path, ev)
    assert got(src, T0 + 10, type="change", compare_key="model", query_key="replica", timeframe=60) == {
        (("replica", "a"),): 2.0}
    assert got(src, T0 + 10, type="change", compare_key="model", timeframe=60) == {(): 2.0}


def test_percentiles_as_elasticsearch_computes_them() -> None:
    """t-digest (Elasticsearch's default below 2,000 values: Dist.quantile, linear between the ranks around
    p * (n - 1)) and HdrHistogram's rank (p * n rounded, at least 1)."""
    from sentinel.logstore.local import percentile_of

    values = [float(v) for v in range(10, 110, 10)]  # 10 .. 100
    assert percentile_of(values, 50) == 55.0 and percentile_of(values, 99) == pytest.approx(99.1)
    assert percentile_of(values, 100) == 100.0 and percentile_of([7.0], 99) == 7.0
    assert percentile_of(values, 50, "hdr") == 50.0 and percentile_of(values, 99, "hdr") == 100.0
    assert percentile_of(values, 4, "hdr") == 10.0  # rank 0.4 rounds to 0: at least the first
