"""ElastAlert's delivery options on log rules (realert, aggregation) and the replay of missed evaluations,
through the evaluator, the SQLite state store and the local log store, with a controlled clock. The same
replay against a real Elasticsearch outage is in tests/integration/test_end_to_end.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sentinel.alerts.notification import rfc3339
from sentinel.alerts.store import Store
from sentinel.errors import DatasourceError
from sentinel.logstore.local import LocalLogStore
from sentinel.rules.evaluator import META_ALERT, Evaluator
from sentinel.rules.model import Group, LoadedGroup, Rule
from sentinel.rules.sources import LogRuleSource

T0 = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t


class FlakyStore:
    """The local store behind a switch: down means every query fails, as Elasticsearch unreachable."""

    def __init__(self, inner: LocalLogStore) -> None:
        self.inner = inner
        self.down = False

    def count(self, *a: Any, **k: Any) -> Any:
        if self.down:
            raise ConnectionError("connection refused")
        return self.inner.count(*a, **k)

    def aggregate(self, *a: Any, **k: Any) -> Any:
        if self.down:
            raise ConnectionError("connection refused")
        return self.inner.aggregate(*a, **k)


def setup(tmp_path: Path, log: dict[str, Any], interval: float = 10.0, db: str = "s.db"
          ) -> tuple[Evaluator, LoadedGroup, LocalLogStore, FlakyStore, Clock]:
    logs = LocalLogStore(tmp_path / "logs.db")
    flaky = FlakyStore(logs)
    rule = Rule.model_validate({"alert": "CudaError", "log": {"filter": [{"exists": "cuda_error"}],
                                                              "query_key": "replica", **log}})
    group = LoadedGroup(file="r.yaml", group=Group(name="logs", interval=interval, rules=[rule]))
    clock = Clock()
    ev = Evaluator(Store(tmp_path / db), None, LogRuleSource(flaky),
                   default_interval=interval, clock=clock)
    ev.load([group])
    return ev, group, logs, flaky, clock


def sent(ev: Evaluator) -> list[tuple[float, list[tuple[str, str, str]]]]:
    """Every CudaError notification handed to delivery, one entry per evaluation (and aggregation_key
    value): (when, [(replica, status, startsAt)])."""
    out: dict[tuple[float, tuple[str, ...]], list[tuple[str, str, str]]] = {}
    for _, created, e in ev.store.alert_log_after(0, limit=10_000):
        if e.labels["alertname"] != "CudaError":
            continue  # SentinelRuleEvaluationFailing (the store down), asserted where it matters
        status = "resolved" if e.resolved(created) else "firing"
        key = (created, tuple(e.labels.get(k, "") for k in e.group_by))
        out.setdefault(key, []).append((e.labels["replica"], status, rfc3339(e.starts_at)))
    return [(t, alerts) for (t, _), alerts in out.items()]


def run(ev: Evaluator, group: LoadedGroup, clock: Clock, until: float, step: float = 10.0) -> None:
    while clock.t < until:
        clock.t += step
        ev.eval_group(group.key)


def test_realert_spaces_pages_of_one_alert_and_swallows_a_flap(tmp_path: Path) -> None:
    ev, group, logs, _, clock = setup(tmp_path, {"timeframe": "15s", "realert": "5m"})
    logs.add([(T0 + 5, {"cuda_error": "x", "replica": "r0"})])
    run(ev, group, clock, T0 + 60)  # fires at +10, resolves at +20 (windows are (at - 15 s, at])
    logs.add([(T0 + 65, {"cuda_error": "x", "replica": "r0"})])  # a flap: fires again at +70, ends at +80
    logs.add([(T0 + 65, {"cuda_error": "x", "replica": "r1"})])  # another replica is its own alert
    run(ev, group, clock, T0 + 360)
    statuses = [(t - T0, [(r, s) for r, s, _ in alerts]) for t, alerts in sent(ev)]
    assert statuses == [(10, [("r0", "firing")]), (20, [("r0", "resolved")]),
                        (70, [("r1", "firing")]), (80, [("r1", "resolved")])]  # r0's flap: no page
    run(ev, group, clock, T0 + 400)  # resolved alerts are sent again at the resend pace, as Prometheus does
    assert [(t - T0, a[0][:2]) for t, a in sent(ev)][4:] == [(390, ("r1", "resolved"))]


def test_realert_repeats_a_firing_alert_at_its_own_pace(tmp_path: Path) -> None:
    ev, group, logs, _, clock = setup(tmp_path, {"timeframe": "10m", "realert": "2m"})
    logs.add([(T0 + 5, {"cuda_error": "x", "replica": "r0"})])
    run(ev, group, clock, T0 + 300)
    assert [t - T0 for t, _ in sent(ev)] == [10, 140, 270]  # first page, then every realert (as a resend)


def test_a_refire_after_realert_pages_again(tmp_path: Path) -> None:
    ev, group, logs, _, clock = setup(tmp_path, {"timeframe": "15s", "realert": "1m"})
    logs.add([(T0 + 5, {"cuda_error": "x", "replica": "r0"}), (T0 + 45, {"cuda_error": "x", "replica": "r0"})])
    run(ev, group, clock, T0 + 120)
    # fired at +10, resolved at +20, fired again at +50 (held: within 1m of the page at +10) until +70,
    # when it had resolved: the second episode sends nothing
    assert [(t - T0, [s for _, s, _ in a]) for t, a in sent(ev)] == [(10, ["firing"]), (20, ["resolved"])]
    logs.add([(T0 + 125, {"cuda_error": "x", "replica": "r0"})])
    run(ev, group, clock, T0 + 200)
    assert [(t - T0, [s for _, s, _ in a]) for t, a in sent(ev)][2:] == [(130, ["firing"]), (140, ["resolved"])]


def test_aggregation_sends_one_notification_per_period(tmp_path: Path) -> None:
    ev, group, logs, _, clock = setup(tmp_path, {"timeframe": "10m", "realert": "0s", "aggregation": "1m"})
    logs.add([(T0 + 5, {"cuda_error": "x", "replica": "r0"}), (T0 + 25, {"cuda_error": "x", "replica": "r1"}),
              (T0 + 45, {"cuda_error": "x", "replica": "r2"})])
    run(ev, group, clock, T0 + 60)
    assert sent(ev) == []  # held since +10
    run(ev, group, clock, T0 + 70)
    [(t, alerts)] = sent(ev)
    assert t == T0 + 70 and sorted(r for r, _, _ in alerts) == ["r0", "r1", "r2"]  # one page for three


def test_aggregation_key_splits_and_a_restart_keeps_what_is_held(tmp_path: Path) -> None:
    log = {"timeframe": "10m", "aggregation": "1m", "aggregation_key": "replica"}
    ev, group, logs, _, clock = setup(tmp_path, log)
    logs.add([(T0 + 5, {"cuda_error": "x", "replica": "r0"}), (T0 + 15, {"cuda_error": "x", "replica": "r1"})])
    run(ev, group, clock, T0 + 30)
    assert sent(ev) == []
    # sentinel restarts (a new evaluator on the same state database): the held notifications survive
    ev2, group2, _, _, clock2 = setup(tmp_path, log)
    clock2.t = clock.t
    run(ev2, group2, clock2, T0 + 80)
    out = sent(ev2)
    assert [t - T0 for t, _ in out] == [70, 70] and sorted(a[0][0] for _, a in out) == ["r0", "r1"]


def test_an_outage_is_replayed_when_the_store_returns(tmp_path: Path) -> None:
    """Lines logged while the store was down fire and resolve afterwards, with their real times; the
    alert that was firing before the outage is kept (never resolved by silence) and not paged again."""
    ev, group, logs, flaky, clock = setup(tmp_path, {"timeframe": "30s"})
    logs.add([(T0 + 5, {"cuda_error": "x", "replica": "r0"})])
    run(ev, group, clock, T0 + 20)
    assert [(t - T0, a[0][:2]) for t, a in sent(ev)] == [(10, ("r0", "firing"))]
    flaky.down = True
    logs.add([(T0 + 25, {"cuda_error": "x", "replica": "r0"}), (T0 + 95, {"cuda_error": "x", "replica": "r1"})])
    run(ev, group, clock, T0 + 200)
    assert len(sent(ev)) == 1  # nothing resolved by silence while the store was down
    [rt] = ev.groups[group.key].rules
    assert rt.health == "err" and [a.labels["rule"] for a in ev.internal[META_ALERT].machine.firing()] == ["CudaError"]
    flaky.down = False
    run(ev, group, clock, T0 + 210)
    out = [(t - T0, a) for t, a in sent(ev)][1:]
    fmt = "2027-01-15T08:0{}.000Z"  # T0 = 2027-01-15T08:00:00Z
    assert [(t, [(r, s) for r, s, _ in a]) for t, a in out] == [
        (60, [("r0", "resolved")]),    # the line at +25 left the window at +55: resolved at +60
        (100, [("r1", "firing")]),     # r1's line at +95, seen by the evaluation at +100
        (130, [("r1", "resolved")]),
        (210, [("r0", "resolved"), ("r1", "resolved")])]  # resolved alerts are re-sent a resend delay later
    assert out[1][1][0][2] == fmt.format("1:40")  # startsAt: when it really fired, not when the store came back
    # the firing one was queued for the evaluation at +100 but went out at +210: its endsAt counts from then,
    # or Alertmanager would take it as already over
    [ends] = [rfc3339(e.ends_at) for _, t, e in ev.store.alert_log_after(0)
              if not e.resolved(t) and e.labels.get("replica") == "r1"]
    assert ends == fmt.format("7:30")  # +210 + 4 x the 60 s resend delay
    assert rt.health == "ok"


def test_a_restart_replays_the_time_sentinel_was_down(tmp_path: Path) -> None:
    ev, group, logs, _, clock = setup(tmp_path, {"timeframe": "30s"})
    run(ev, group, clock, T0 + 20)
    logs.add([(T0 + 45, {"cuda_error": "x", "replica": "r0"})])  # sentinel is down from +20 to +300
    ev2, group2, _, _, clock2 = setup(tmp_path, {"timeframe": "30s"})
    clock2.t = T0 + 290
    run(ev2, group2, clock2, T0 + 300)
    assert [(t - T0, [(r, s) for r, s, _ in a]) for t, a in sent(ev2)] == [
        (50, [("r0", "firing")]), (80, [("r0", "resolved")]), (300, [("r0", "resolved")])]


def test_a_replay_waits_for_the_shipper(tmp_path: Path) -> None:
    """Evaluations whose window the shipper has not delivered yet are not judged (they would resolve by
    silence): the rule waits, then replays them."""
    logs = LocalLogStore(tmp_path / "logs.db")
    shipped = [T0]
    src = LogRuleSource(logs, lambda: shipped[0], slack_s=3.0)
    q = Rule.model_validate({"alert": "A", "log": {"filter": [{"exists": "cuda_error"}]}}).log
    assert q is not None
    src.query(q, T0 + 2)  # within the slack: a live window runs a little past the last shipment
    for at, replay in ((T0 + 5, False), (T0 + 1, True)):
        try:
            src.query(q, at, replay)
        except DatasourceError as exc:
            assert "log shipping is behind" in str(exc)
        else:
            raise AssertionError(f"a window ending at {at - T0} was judged before its lines were shipped")


def _active_series(ev: Evaluator) -> list[dict[str, str]]:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    reg = CollectorRegistry()
    reg.register(ev.active)
    [family] = [f for f in text_string_to_metric_families(generate_latest(reg).decode())
                if f.name == "sentinel_active_alerts"]
    assert all(s.value == 1.0 for s in family.samples)
    return sorted((s.labels for s in family.samples), key=lambda labels: labels["replica"])


def test_active_alerts_series_follows_the_alert_state_across_a_restart(tmp_path: Path) -> None:
    """sentinel_active_alerts is Prometheus's ALERTS from sentinel's state: a series per firing alert while it
    fires (the alert's labels, alertname, alertstate), gone when it resolves, restored from the store."""
    ev, group, logs, _, clock = setup(tmp_path, {"timeframe": "30s"})
    assert _active_series(ev) == []
    logs.add([(T0 + 5, {"cuda_error": "x", "replica": "r0"}), (T0 + 6, {"cuda_error": "x", "replica": "r1"})])
    run(ev, group, clock, T0 + 10)
    assert _active_series(ev) == [
        {"alertname": "CudaError", "alertstate": "firing", "replica": "r0"},
        {"alertname": "CudaError", "alertstate": "firing", "replica": "r1"}]
    again = Evaluator(Store(tmp_path / "s.db"), None, LogRuleSource(logs), default_interval=10.0, clock=clock)
    again.load([group])  # a restarted sentinel exports the restored state before its first evaluation
    assert [s["replica"] for s in _active_series(again)] == ["r0", "r1"]
    run(again, group, clock, T0 + 50)  # both windows have passed: resolved, the series end
    assert _active_series(again) == []
    logs.add([(T0 + 55, {"cuda_error": "x", "replica": "r2"})])
    run(again, group, clock, T0 + 60)
    assert [s["replica"] for s in _active_series(again)] == ["r2"]
    again.load([])  # a rule removed by a reload takes its series with it
    assert _active_series(again) == []


def test_active_alerts_labels_are_valid_prometheus_names(tmp_path: Path) -> None:
    """A log rule's query_key can be a dotted field; the series must still parse (one bad label name would
    fail the whole scrape of sentinel)."""
    from sentinel.alerts.state import Alert, State
    from sentinel.metrics import ActiveAlerts

    active = ActiveAlerts()
    active.update("k", "CudaError", [Alert({"alertname": "CudaError", "host.name": "gpu-1", "9x": "y", "__x": "z"},
                                           {}, 1.0, State.FIRING, 1.0, fired_at=1.0)])
    [m] = list(active.collect())
    assert m.samples[0].labels == {"host_name": "gpu-1", "_9x": "y", "alertname": "CudaError", "alertstate": "firing"}
