"""The alert state machine against Prometheus's documented semantics."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sentinel.alerts.fingerprint import fingerprint
from sentinel.alerts.state import RESOLVED_RETENTION_S, AlertingRule, Sample, State, ends_at
from sentinel.errors import EvaluationError

S = Sample({"__name__": "up", "instance": "a"}, 1.0)
LABELS = {"instance": "a", "alertname": "X"}


def test_fingerprint_matches_alertmanager_fnv1a_with_0xff_separators() -> None:
    assert fingerprint({}) == "cbf29ce484222325"  # FNV-1a 64 offset basis: Alertmanager's empty set
    # Computed by hand: FNV-1a over b"a\xffb\xff".
    h = 0xCBF29CE484222325
    for byte in b"a\xffb\xff":
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    assert fingerprint({"a": "b"}) == f"{h:016x}"
    assert fingerprint({"a": "b", "c": "d"}) != fingerprint({"a": "bc", "": "d"})


@given(st.dictionaries(st.text(min_size=1, max_size=5), st.text(max_size=5), max_size=6))
def test_fingerprint_ignores_insertion_order(labels: dict[str, str]) -> None:
    assert fingerprint(labels) == fingerprint(dict(reversed(list(labels.items()))))


def test_pending_then_firing_after_for() -> None:
    r = AlertingRule("X", for_s=60)
    [a] = r.eval(0, [S])
    assert a.state == State.PENDING and a.active_at == 0 and a.labels == LABELS
    assert r.eval(59, [S])[0].state == State.PENDING
    [a] = r.eval(60, [S])
    assert a.state == State.FIRING and a.fired_at == 60


def test_no_for_fires_at_once() -> None:
    assert AlertingRule("X").eval(5, [S])[0].state == State.FIRING


def test_pending_alert_that_disappears_is_dropped_and_timer_resets() -> None:
    r = AlertingRule("X", for_s=60)
    r.eval(0, [S])
    assert r.eval(30, []) == [] and r.active == {}
    r.eval(40, [S])
    assert r.eval(99, [S])[0].state == State.PENDING  # 59 s since the new ActiveAt
    assert r.eval(100, [S])[0].state == State.FIRING


def test_resolved_alert_kept_15_minutes_then_dropped() -> None:
    r = AlertingRule("X")
    r.eval(0, [S])
    assert r.eval(10, []) == []
    [a] = r.active.values()
    assert a.state == State.INACTIVE and a.resolved_at == 10
    r.eval(10 + RESOLVED_RETENTION_S, [])
    assert len(r.active) == 1
    r.eval(10 + RESOLVED_RETENTION_S + 1, [])
    assert r.active == {}


def test_keep_firing_for() -> None:
    r = AlertingRule("X", keep_firing_for_s=30)
    r.eval(0, [S])
    assert r.eval(10, [])[0].state == State.FIRING  # keep_firing_since = 10
    assert r.eval(39, [])[0].state == State.FIRING
    assert r.eval(40, []) == []
    assert next(iter(r.active.values())).resolved_at == 40


def test_keep_firing_since_resets_when_the_condition_returns() -> None:
    r = AlertingRule("X", keep_firing_for_s=30)
    r.eval(0, [S])
    r.eval(10, [])
    r.eval(20, [S])
    assert next(iter(r.active.values())).keep_firing_since == 0
    assert r.eval(45, [])[0].state == State.FIRING  # restarted at 45


def test_reappearing_resolved_alert_starts_a_new_pending_episode() -> None:
    r = AlertingRule("X", for_s=10)
    r.eval(0, [S])
    r.eval(10, [S])
    r.eval(20, [])
    [a] = r.eval(30, [S])
    assert a.state == State.PENDING and a.active_at == 30 and a.resolved_at == 0


def test_duplicate_label_sets_fail_the_evaluation_and_change_no_state() -> None:
    r = AlertingRule("X", labels={"instance": "fixed"})
    r.eval(0, [S])
    before = {k: (v.state, v.active_at) for k, v in r.active.items()}
    with pytest.raises(EvaluationError, match="same labelset"):
        r.eval(5, [Sample({"instance": "a", "__name__": "m1"}, 1), Sample({"instance": "a", "__name__": "m2"}, 2)])
    assert {k: (v.state, v.active_at) for k, v in r.active.items()} == before


def test_limit_exceeded_drops_all_alerts() -> None:
    r = AlertingRule("X", limit=1)
    with pytest.raises(EvaluationError, match="limit"):
        r.eval(0, [Sample({"i": "1"}, 1), Sample({"i": "2"}, 1)])
    assert r.active == {}


def test_rule_labels_override_series_labels_and_templates_expand() -> None:
    r = AlertingRule("X", labels={"severity": "page", "instance": "x"}, annotations={"s": "v={{ $value }}"},
                     expand=lambda t, lbs, v: t.replace("{{ $value }}", str(v)))
    [a] = r.eval(0, [Sample({"instance": "a"}, 3.0)])
    assert a.labels == {"instance": "x", "severity": "page", "alertname": "X"}
    assert a.annotations == {"s": "v=3.0"}


def test_sending_resend_delay_and_ends_at() -> None:
    r = AlertingRule("X", for_s=10)
    r.eval(0, [S])
    assert r.to_send(0, 60, 15) == []  # pending is never sent
    r.eval(10, [S])
    [a] = r.to_send(10, 60, 15)
    assert a.state == State.FIRING and ends_at(a) == 10 + 4 * 60
    assert r.to_send(70, 60, 15) == []  # not yet: last_sent + resend_delay must be before now
    assert len(r.to_send(70.5, 60, 15)) == 1
    [b] = r.to_send(131, 60, 300)  # an interval longer than resend_delay sets the horizon
    assert b.valid_until == 131 + 4 * 300


def test_resolved_is_sent_at_once_with_its_resolved_time() -> None:
    r = AlertingRule("X")
    r.eval(0, [S])
    r.to_send(0, 60, 15)
    r.eval(5, [])
    [a] = r.to_send(5, 60, 15)
    assert a.state == State.INACTIVE and ends_at(a) == 5
    assert r.to_send(6, 60, 15) == []
    assert len(r.to_send(66, 60, 15)) == 1  # re-sent during retention, like Prometheus


def test_consecutive_samples_need_n_evaluations_in_a_row() -> None:
    r = AlertingRule("GpuHot", consecutive=3)
    assert r.eval(0, [S])[0].state == State.PENDING
    assert r.eval(15, [S])[0].state == State.PENDING
    r.eval(30, [])  # a gap resets the count, like a pending alert disappearing
    assert r.eval(45, [S])[0].state == State.PENDING
    r.eval(60, [S])
    [a] = r.eval(75, [S])
    assert a.state == State.FIRING and a.hits == 3 and a.fired_at == 75
