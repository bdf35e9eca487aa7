"""Silences and inhibition: Alertmanager's matcher semantics, muting at delivery (state kept,
notifications held), the CLI and the API routes."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from sentinel.alerts.delivery import Delivery, ReceiverOptions
from sentinel.alerts.notification import Notification
from sentinel.alerts.routing import build, default_tree
from sentinel.alerts.silences import DEFAULT_INHIBIT_RULES, InhibitRule, inhibited, parse_matcher
from sentinel.alerts.state import Sample, State
from sentinel.alerts.store import Store
from sentinel.cli import app
from sentinel.rules.evaluator import DATASOURCE_DOWN_ALERT, META_ALERT, AlertingRuntime, Evaluator
from sentinel.rules.model import Group, LoadedGroup, Rule


@pytest.mark.parametrize(("matcher", "labels", "hit"), [
    ('alertname="A"', {"alertname": "A"}, True),
    ('alertname="A"', {"alertname": "AB"}, False),
    ('team=""', {"alertname": "A"}, True),              # a missing label is the empty string
    ('team!=""', {"alertname": "A"}, False),
    ('replica=~"replica-[01]"', {"replica": "replica-1"}, True),
    ('replica=~"replica-[01]"', {"replica": "replica-10"}, False),   # anchored at both ends
    ('replica!~"replica-.*"', {"replica": "other"}, True),
    ('summary="say \\"hi\\""', {"summary": 'say "hi"'}, True),
])
def test_matchers_as_alertmanager(matcher: str, labels: dict[str, str], hit: bool) -> None:
    assert parse_matcher(matcher).matches(labels) is hit


@pytest.mark.parametrize("bad", ["alertname=A", 'a==b"', 'x=~"("', '1a="b"', ""])
def test_bad_matchers_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_matcher(bad)


def test_the_default_inhibition() -> None:
    down = {"alertname": "InferenceReplicaDown", "replica": "replica-0", "severity": "page"}
    slow0 = {"alertname": "InferenceLatencyP99High", "replica": "replica-0"}
    slow1 = {"alertname": "InferenceLatencyP99High", "replica": "replica-1"}
    assert inhibited(slow0, [down, slow0], DEFAULT_INHIBIT_RULES)
    assert not inhibited(slow1, [down, slow1], DEFAULT_INHIBIT_RULES)  # another replica: news
    assert not inhibited(down, [down], DEFAULT_INHIBIT_RULES)
    with pytest.raises(ValueError):
        InhibitRule(source_matchers=["nope"], target_matchers=['a="b"'])


def setup(tmp_path: Path) -> tuple[Evaluator, LoadedGroup, Store]:
    store = Store(tmp_path / "state" / "sentinel.db")
    rules = [Rule.model_validate({"alert": "InferenceReplicaDown", "expr": "x"}),
             Rule.model_validate({"alert": "InferenceLatencyP99High", "expr": "y"})]
    g = LoadedGroup(file="f", group=Group(name="g", rules=rules))
    ev = Evaluator(store, None, None)
    ev.load([g])
    return ev, g, store


def fire(ev: Evaluator, name: str, t: float, replicas: list[str]) -> None:
    rt = next(r for r in ev.all_runtimes() if r.rule.name == name)
    assert isinstance(rt, AlertingRuntime)
    ev.commit(rt, t, [Sample({"replica": r}, 1.0) for r in replicas])


def notified(store: Store) -> list[tuple[str, str]]:
    return [(a["labels"]["alertname"], a["labels"]["replica"]) for i in store.due(float("inf"), 1000)
            for a in Notification.from_json(i.payload).render(i.receiver)["alerts"]]


def test_silences_and_inhibition_hold_back_notifications_not_state(tmp_path: Path) -> None:
    ev, _, store = setup(tmp_path)
    now = 1_000.0
    store.add_silence(['alertname="InferenceLatencyP99High"', 'replica="replica-2"'], now - 1, now + 600, "me",
                      "maintenance", now)
    fire(ev, "InferenceReplicaDown", now, ["replica-0"])
    fire(ev, "InferenceLatencyP99High", now, ["replica-0", "replica-1", "replica-2"])
    delivery = Delivery(store, build(default_tree(["oncall"])), {"oncall": ReceiverOptions()},
                        inhibit_rules=DEFAULT_INHIBIT_RULES)
    delivery.tick(now + 31)  # after group_wait
    # replica-0's latency is inhibited by its replica being down; replica-2's is silenced; replica-1's is news
    assert sorted(notified(store)) == [("InferenceLatencyP99High", "replica-1"), ("InferenceReplicaDown", "replica-0")]
    rt = next(r for r in ev.all_runtimes() if r.rule.name == "InferenceLatencyP99High")
    assert sorted(a.labels["replica"] for a in rt.machine.active.values() if a.state == State.FIRING) == [
        "replica-0", "replica-1", "replica-2"]  # the state is all there
    # the silence expires: the next group flush tells on-call of replica-2 (still firing, never notified)
    [sid] = [x["id"] for x in store.silences(now)]
    store.expire_silence(sid, now + 100)
    fire(ev, "InferenceReplicaDown", now + 300, ["replica-0"])  # the evaluator's resends keep them firing
    fire(ev, "InferenceLatencyP99High", now + 300, ["replica-0", "replica-1", "replica-2"])
    delivery.tick(now + 31 + 300)
    item = store.due(float("inf"), 1000)[-1]
    last = Notification.from_json(item.payload).render(item.receiver)
    assert [(a["labels"]["replica"], a["status"]) for a in last["alerts"]] == [
        ("replica-1", "firing"), ("replica-2", "firing")]  # replica-0 stays inhibited


def test_silence_cli(tmp_path: Path) -> None:
    setup(tmp_path)
    cfg = tmp_path / "s.yaml"
    cfg.write_text(f"state_dir: {tmp_path / 'state'}\n")
    r = CliRunner().invoke(app, ["silence", "add", 'alertname="CudaError"', 'replica=~"replica-[01]"', "--author",
                                 "alice", "--comment", "driver update", "--duration", "2h", "-c", str(cfg)])
    assert r.exit_code == 0, r.output
    sid = r.output.strip()
    listed = CliRunner().invoke(app, ["silence", "list", "--json", "-c", str(cfg)])
    assert sid in listed.output and "driver update" in listed.output
    bad = CliRunner().invoke(app, ["silence", "add", "alertname=CudaError", "--author", "a", "--comment", "c",
                                   "-c", str(cfg)])
    assert bad.exit_code == 2 and "a matcher is" in bad.output
    assert CliRunner().invoke(app, ["silence", "expire", sid[:12], "-c", str(cfg)]).exit_code == 0
    assert CliRunner().invoke(app, ["silence", "list", "--json", "-c", str(cfg)]).output.strip() == "[]"


def test_a_datasource_down_is_one_page_not_one_per_rule(tmp_path: Path) -> None:
    """Prometheus unreachable: every PromQL rule fails. SentinelDatasourceDown fires, and the default
    inhibition mutes the per-rule SentinelRuleEvaluationFailing alerts it explains."""
    from sentinel.netutil import free_port
    from sentinel.prometheus import PromQLSource

    store = Store(tmp_path / "s.db")
    rules = [Rule.model_validate({"alert": f"R{i}", "expr": "up == 0"}) for i in range(3)]
    g = LoadedGroup(file="f", group=Group(name="g", rules=rules))
    now = 1_000.0
    ev = Evaluator(store, PromQLSource(f"http://127.0.0.1:{free_port()}", 1), None, meta_for=0, clock=lambda: now)
    ev.load([g])
    ev.eval_group(g.key)  # evaluates the meta-alerts too
    assert len(ev.internal[META_ALERT].machine.firing()) == 3
    [down] = ev.internal[DATASOURCE_DOWN_ALERT].machine.firing()
    assert down.labels == {"alertname": "SentinelDatasourceDown", "datasource": "prometheus", "severity": "page"}
    delivery = Delivery(store, build(default_tree(["oncall"])), {"oncall": ReceiverOptions()},
                        inhibit_rules=DEFAULT_INHIBIT_RULES)
    delivery.tick(now + 31)
    sent = [a["labels"]["alertname"] for i in store.due(float("inf"), 1000)
            for a in Notification.from_json(i.payload).render(i.receiver)["alerts"]]
    assert sent == ["SentinelDatasourceDown"]
