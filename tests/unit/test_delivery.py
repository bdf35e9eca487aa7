"""Delivery's Alertmanager semantics with a controlled clock: group_wait, group_interval, repeat_interval,
send_resolved, routing with continue, restarts (the groups and the notification log are in the store), a
route removed by a configuration change, and runbook findings that arrive after the first page. The same
semantics side by side with a real Alertmanager are in tests/integration/test_grouping_vs_alertmanager.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sentinel.alerts.delivery import Delivery, ReceiverOptions, needs_update
from sentinel.alerts.event import AlertEvent
from sentinel.alerts.fingerprint import fingerprint
from sentinel.alerts.notification import Notification
from sentinel.alerts.routing import RouteConfig, build
from sentinel.alerts.store import Store
from sentinel.settings import AlertingSettings
from sentinel.state.outbox import OutboxItem

T0 = 1_800_000_000.0


def ev(labels: dict[str, str], starts: float = T0, ends: float = T0 + 86400, **extra: Any) -> AlertEvent:
    return AlertEvent.from_json({"labels": labels, "annotations": {}, "starts_at": starts, "ends_at": ends,
                                 "generator_url": "", **extra})


def bodies(store: Store) -> list[tuple[OutboxItem, dict[str, Any]]]:
    """The queued notifications, each with the webhook body it is sent as (rendered at send time)."""
    return [(i, Notification.from_json(i.payload).render(i.receiver)) for i in store.due(float("inf"), 1000)]


def sent(store: Store) -> list[tuple[float, str, str, list[tuple[str, str]]]]:
    return [(i.created_at - T0, i.receiver, p["groupKey"], [(a["labels"].get("replica", ""), a["status"])
                                                           for a in p["alerts"]]) for i, p in bodies(store)]


def make(tmp_path: Path, route: dict[str, Any], **opts: ReceiverOptions) -> tuple[Store, Delivery]:
    store = Store(tmp_path / "s.db")
    cfg = RouteConfig.model_validate(route)
    return store, Delivery(store, build(cfg), {n: opts.get(n, ReceiverOptions()) for n in cfg.receivers()})


ROUTE = {"receiver": "oncall", "group_by": ["alertname"], "group_wait": "30s", "group_interval": "5m",
         "repeat_interval": "4h"}


def test_group_wait_interval_and_repeat(tmp_path: Path) -> None:
    store, d = make(tmp_path, ROUTE)
    store.log_alerts([ev({"alertname": "A", "replica": "r0"})], T0)
    d.tick(T0 + 1)
    store.log_alerts([ev({"alertname": "A", "replica": "r1"})], T0 + 10)
    for t in range(2, 40):
        d.tick(T0 + t)
    assert sent(store) == [(30, "oncall", '{}:{alertname="A"}', [("r0", "firing"), ("r1", "firing")])]
    # a third alert joins: it waits for the group interval (5 m after the first flush), not group_wait
    store.log_alerts([ev({"alertname": "A", "replica": "r2"})], T0 + 60)
    d.tick(T0 + 60)
    d.tick(T0 + 329)
    assert len(sent(store)) == 1
    d.tick(T0 + 330)
    assert sent(store)[-1][0] == 330 and len(sent(store)[-1][3]) == 3
    # nothing changes: no notification until repeat_interval (4 h) after the last one
    for t in range(630, 4 * 3600 + 330, 300):
        d.tick(T0 + t)
    assert len(sent(store)) == 2
    store.log_alerts([ev({"alertname": "A", "replica": r}, ends=T0 + 2 * 86400) for r in ("r0", "r1", "r2")],
                     T0 + 4 * 3600)
    d.tick(T0 + 4 * 3600 + 330)  # exactly 4 h: not yet (Alertmanager's comparison is strict)
    assert len(sent(store)) == 2
    d.tick(T0 + 4 * 3600 + 630)
    assert len(sent(store)) == 3 and sent(store)[-1][3] == [("r0", "firing"), ("r1", "firing"), ("r2", "firing")]


def test_resolved_alerts_leave_the_group_after_their_notification(tmp_path: Path) -> None:
    store, d = make(tmp_path, ROUTE)
    store.log_alerts([ev({"alertname": "A", "replica": "r0"}), ev({"alertname": "A", "replica": "r1"})], T0)
    d.tick(T0 + 30)
    store.log_alerts([ev({"alertname": "A", "replica": "r0"}, ends=T0 + 100)], T0 + 100)
    d.tick(T0 + 330)
    assert sent(store)[-1][3] == [("r0", "resolved"), ("r1", "firing")]
    [g] = d.groups.values()
    assert list(g.alerts) != [] and len(g.alerts) == 1  # r0 is gone
    store.log_alerts([ev({"alertname": "A", "replica": "r1"}, ends=T0 + 400)], T0 + 400)
    d.tick(T0 + 630)
    assert sent(store)[-1][3] == [("r1", "resolved")] and d.groups == {}  # the empty group is gone too


def test_send_resolved_false_and_a_flap_inside_one_interval(tmp_path: Path) -> None:
    store, d = make(tmp_path, ROUTE, oncall=ReceiverOptions(send_resolved=False))
    store.log_alerts([ev({"alertname": "A", "replica": "r0"}), ev({"alertname": "A", "replica": "r1"})], T0)
    d.tick(T0 + 30)
    store.log_alerts([ev({"alertname": "A", "replica": "r0"}, ends=T0 + 100)], T0 + 100)
    d.tick(T0 + 330)
    assert len(sent(store)) == 1  # a resolution alone is not sent without send_resolved
    # fired and resolved between two flushes, never seen firing by the receiver: nothing to say
    store2, d2 = make(tmp_path / "b", ROUTE)
    store2.log_alerts([ev({"alertname": "B"})], T0)
    store2.log_alerts([ev({"alertname": "B"}, ends=T0 + 5)], T0 + 5)
    d2.tick(T0 + 30)
    assert sent(store2) == []


def test_needs_update_is_alertmanagers() -> None:
    entry = {"firing": ["a", "b"], "resolved": [], "sent_at": 100.0}
    assert needs_update(None, {"a"}, set(), 10, True, 100)
    assert not needs_update(None, set(), {"a"}, 10, True, 100)
    assert needs_update(entry, {"a", "c"}, set(), 10, True, 100)       # a new firing alert
    assert not needs_update(entry, {"a"}, set(), 10, False, 105)        # b gone, resolutions not sent
    assert needs_update(entry, {"a"}, {"b"}, 10, True, 105)             # b resolved
    assert needs_update(entry, set(), {"a", "b"}, 10, False, 105)       # all resolved: always said
    assert not needs_update(entry, {"a", "b"}, set(), 10, True, 105)
    assert needs_update(entry, {"a", "b"}, set(), 10, True, 111)        # repeat_interval


def test_state_survives_a_restart_and_a_removed_route_drops_its_groups(tmp_path: Path) -> None:
    route = {**ROUTE, "routes": [{"matchers": ['severity="page"'], "receiver": "pager"}]}
    store = Store(tmp_path / "s.db")
    rcv = {"oncall": ReceiverOptions(), "pager": ReceiverOptions()}
    d = Delivery(store, build(RouteConfig.model_validate(route)), rcv)
    store.log_alerts([ev({"alertname": "A", "severity": "page"}), ev({"alertname": "B"})], T0)
    d.tick(T0 + 30)
    assert len(sent(store)) == 2
    # a new process: the groups, their timers and the notification log come back; nothing is sent twice
    d = Delivery(Store(tmp_path / "s.db"), build(RouteConfig.model_validate(route)), rcv)
    d.tick(T0 + 330)
    assert len(sent(store)) == 2 and len(d.groups) == 2
    # the pager route is removed from the configuration: its group goes (as an Alertmanager reload does)
    d = Delivery(Store(tmp_path / "s.db"), build(RouteConfig.model_validate(ROUTE)), rcv)
    assert [g.route.receiver for g in d.groups.values()] == ["oncall"]


def test_findings_that_arrive_later_are_sent_at_the_next_flush(tmp_path: Path) -> None:
    store, d = make(tmp_path, ROUTE)
    store.log_alerts([ev({"alertname": "A"})], T0)
    d.tick(T0 + 30)
    store.log_alerts([ev({"alertname": "A"}, sentinel={"findings": {"status": "ok", "summary": "xid 79"}})],
                     T0 + 40)
    d.tick(T0 + 330)
    (_, first), (_, second) = bodies(store)
    assert "sentinel" not in first["alerts"][0]
    assert second["alerts"][0]["sentinel"]["findings"]["summary"] == "xid 79"


def test_group_by_all_labels_and_an_aggregation_key(tmp_path: Path) -> None:
    store, d = make(tmp_path, {**ROUTE, "group_by": ["..."]})
    store.log_alerts([ev({"alertname": "A", "replica": "r0"}), ev({"alertname": "A", "replica": "r1"})], T0)
    d.tick(T0 + 30)
    assert len(sent(store)) == 2
    store2, d2 = make(tmp_path / "b", ROUTE)
    store2.log_alerts([ev({"alertname": "C", "replica": r}, group_by=["replica"]) for r in ("r0", "r1")], T0)
    d2.tick(T0 + 30)
    assert sorted(k for _, _, k, _ in sent(store2)) == ['{}:{alertname="C", replica="r0"}',
                                                        '{}:{alertname="C", replica="r1"}']


@pytest.mark.parametrize(("alerting", "problem"), [
    ({"receivers": [{"name": "a", "url": "http://x"}], "route": {"receiver": "b"}}, "receiver 'b' is not one of"),
    ({"receivers": [{"name": "a", "url": "http://x"}], "route": {"routes": []}}, "root route needs a receiver"),
    ({"receivers": [{"name": "a", "url": "http://x"}, {"name": "a", "url": "http://y"}]}, "used twice"),
    ({"route": {"receiver": "a", "group_by": ["...", "x"]}}, "cannot be combined"),
    ({"route": {"receiver": "a", "matchers": ["severity=page"]}}, "a matcher is"),
    ({"route": {"receiver": "a", "group_interval": "0s"}}, "greater than 0"),
    ({"route": {"receiver": "a", "group_interval": "10m", "repeat_interval": "5m"}}, "never take effect"),
])
def test_bad_routes_are_refused_with_a_reason(alerting: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        AlertingSettings.model_validate(alerting)


def test_a_replayed_episode_that_already_ended_is_still_told(tmp_path: Path) -> None:
    """After a log-store outage the evaluator replays an episode that fired and resolved; both reach delivery
    in one round. Folded together it would be a flap no one hears of: it is told, firing then resolved."""
    store, d = make(tmp_path, ROUTE)
    store.log_alerts([ev({"alertname": "CudaError"}, starts=T0 + 100, flush=True)], T0 + 100)
    store.log_alerts([ev({"alertname": "CudaError"}, starts=T0 + 100, ends=T0 + 106, flush=True)], T0 + 106)
    d.tick(T0 + 200)
    assert [(t, a) for t, _, _, a in sent(store)] == [(200, [("", "firing")]), (200, [("", "resolved")])]
    d.tick(T0 + 500)
    assert len(sent(store)) == 2


def test_inbound_alerts_are_relayed_with_their_times(tmp_path: Path) -> None:
    """An Alertmanager webhook's alerts (firing with the zero endsAt, then resolved) go through the routing
    tree like sentinel's own: a firing one stays firing until its resolution arrives."""
    from sentinel.inbound import WebhookPayload, inbound_events

    def hook(status: str, ends: str) -> WebhookPayload:
        return WebhookPayload.model_validate({"version": "4", "status": status, "receiver": "sentinel", "alerts": [
            {"status": status, "labels": {"alertname": "NodeDown", "instance": "n1"},
             "startsAt": "2027-01-15T08:00:00Z", "endsAt": ends}]})

    store, d = make(tmp_path, {**ROUTE, "group_wait": "0s"})
    [e] = inbound_events(hook("firing", "0001-01-01T00:00:00Z"))
    assert e.ends_at == 0.0 and e.starts_at == T0
    store.log_alerts([e], T0 + 10)
    d.tick(T0 + 10)
    d.tick(T0 + 5000)  # no end known: still firing, not resolved by time
    store.log_alerts(inbound_events(hook("resolved", "2027-01-15T08:30:00Z")), T0 + 5000)
    d.tick(T0 + 5000 + 300)
    assert [a for _, _, _, a in sent(store)] == [[("", "firing")], [("", "resolved")]]


def test_findings_of_an_inbound_alert_go_with_it(tmp_path: Path) -> None:
    """An alert relayed from Alertmanager runs its rule's runbook; the findings reach the receivers with it
    (the alert is not in the rule's own state: another system evaluated it)."""
    from sentinel.alerts.state import Alert, State
    from sentinel.rules.evaluator import Evaluator
    from sentinel.rules.model import Group, LoadedGroup, Rule

    store, d = make(tmp_path, {**ROUTE, "group_wait": "0s"})
    ev = Evaluator(store, None, None, relay_inbound=True, clock=lambda: T0 + 20)
    ev.load([LoadedGroup(file="r.yaml", group=Group(name="g", rules=[Rule.model_validate(
        {"alert": "CudaError", "log": {"filter": [{"exists": "cuda_error"}]}})]))])
    [rt] = ev.all_runtimes()
    labels = {"alertname": "CudaError", "replica": "r0"}
    relayed = ev_alert(labels)
    store.log_alerts([relayed], T0)  # relayed at T0, as inbound_events hands it over
    d.tick(T0)
    alert = Alert(labels, {}, 0.0, State.FIRING, T0, fired_at=T0)
    ev.notify_findings(rt, alert, {"status": "ok", "summary": "Xid 79 on GPU 0"})
    d.tick(T0 + 300)
    last = bodies(store)[-1][1]["alerts"][0]
    assert last["sentinel"]["findings"]["summary"] == "Xid 79 on GPU 0" and last["status"] == "firing"
    assert relayed.ends_at == 0.0 and len(store.due(float("inf"))) == 2  # the page, then the evidence


def ev_alert(labels: dict[str, str]) -> AlertEvent:
    return AlertEvent(labels, {}, T0, 0.0)


def test_alert_events_round_trip_the_store_in_the_shape_rows_had_before(tmp_path: Path) -> None:
    """AlertEvent is typed in memory and the same JSON in the store as the untyped dicts were: a row written
    before reads back, and what is written now reads back equal."""
    store = Store(tmp_path / "s.db")
    old = {"labels": {"alertname": "A"}, "annotations": {"summary": "s"}, "starts_at": T0, "ends_at": 0.0,
           "generator_url": "http://g", "fingerprint": "", "sentinel": {"findings": {"status": "ok"}},
           "group_by": ["replica"], "flush": True}
    with store.tx() as db:  # a row as an earlier version wrote it
        db.execute("INSERT INTO alert_log (alert, created_at) VALUES (?, ?)", (json.dumps(old), T0))
    e = AlertEvent(labels={"alertname": "B"}, starts_at=T0, ends_at=T0 + 5)
    store.log_alerts([e], T0)
    [(_, _, got_old), (_, _, got_new)] = store.alert_log_after(0)
    assert got_old.to_json() == old and got_old.group_by == ("replica",) and got_old.flush
    assert got_new == e and got_new.fp == fingerprint({"alertname": "B"}) and got_new.resolved(T0 + 5)
    assert "sentinel" not in e.to_json() and "flush" not in e.to_json()
