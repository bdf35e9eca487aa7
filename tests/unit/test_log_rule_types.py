"""ElastAlert's rule types over the local store (the Elasticsearch store gives the same counts: see the
parity test in tests/integration/test_elasticsearch_shipping.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sentinel.logstore.local import LocalLogStore
from sentinel.rules.model import LogQuery
from sentinel.rules.sources import LogRuleSource

T0 = 1_000_000.0


def store(tmp_path: Path, events: list[tuple[float, dict[str, Any]]]) -> LogRuleSource:
    s = LocalLogStore(tmp_path / "logs.db")
    s.add(events)
    return LogRuleSource(s)


def got(src: LogRuleSource, at: float, **q: Any) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value for s in src.query(LogQuery(**q), at)}


def test_flatline_fires_when_a_stream_or_a_group_goes_quiet(tmp_path: Path) -> None:
    # replica-a logs every 10 s throughout; replica-b stops at T0 + 60
    ev = [(T0 + t, {"replica": "a"}) for t in range(0, 180, 10)] + \
         [(T0 + t, {"replica": "b"}) for t in range(0, 60, 10)]
    src = store(tmp_path, ev)
    assert got(src, T0 + 55, type="flatline", threshold=3, timeframe=60) == {}
    assert got(src, T0 + 500, type="flatline", threshold=1, timeframe=60) == {(): 0.0}  # silence: value 0
    q = {"type": "flatline", "threshold": 3, "timeframe": 60, "query_key": "replica"}
    assert got(src, T0 + 100, **q) == {(("replica", "b"),): 1.0}  # one event (at +50) in (40, 100]
    assert got(src, T0 + 130, **q) == {(("replica", "b"),): 0.0}  # none now, some in the window before
    assert got(src, T0 + 400, **q) == {}  # long gone: no longer tracked (stateless; ElastAlert's forget_keys)


def test_spike_up_and_down_against_the_window_before(tmp_path: Path) -> None:
    ev = [(T0 + t, {"replica": "a", "level": "error"}) for t in range(0, 60, 20)] + \
         [(T0 + 60 + t, {"replica": "a", "level": "error"}) for t in range(0, 60, 4)]   # 3 then 15 events
    src = store(tmp_path, ev)
    assert got(src, T0 + 119.9, type="spike", spike_height=4, timeframe=60) == {(): 5.0}
    assert got(src, T0 + 119.9, type="spike", spike_height=6, timeframe=60) == {}
    assert got(src, T0 + 119.9, type="spike", spike_height=4, spike_type="down", timeframe=60) == {}
    assert got(src, T0 + 119.9, type="spike", spike_height=4, threshold_ref=5, timeframe=60) == {}
    assert got(src, T0 + 179.9, type="spike", spike_height=4, spike_type="down", timeframe=60) == {(): 0.0}
    assert got(src, T0 + 59.9, type="spike", spike_height=2, timeframe=60) == {}  # nothing before: no spike


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
                                        ({"type": "frequency", "threshold_ref": 2}, "only for type spike")])
def test_rule_types_are_validated(q: dict[str, Any], msg: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=msg):
        LogQuery(**q)


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
