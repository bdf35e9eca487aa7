"""The remediation policy (pure, exhaustive) and the shell around it with an in-test actuator.

The actuator here is a seam (a small class implementing the Actuator protocol), not a patch: the real
one (the supervisor) is exercised end to end in tests/integration/test_end_to_end.py.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from sentinel.alerts.state import Alert, State
from sentinel.alerts.store import Store
from sentinel.errors import RemediationError
from sentinel.remediation.policy import ActionRequest, Guardrails, History, decide
from sentinel.remediation.remediator import Remediator

REQ = ActionRequest("CudaError", "restart", "replica-0", "fp", "CudaError/fp/1.000", firing=True)
HIST = History(frozenset({"replica-0"}), False, None, 0, 0)


@pytest.mark.parametrize(("req", "hist", "g", "act", "reason"), [
    (REQ, HIST, Guardrails(), True, "restart replica-0"),
    (ActionRequest("R", "restart", "replica-0", "fp", "i", firing=False), HIST, Guardrails(), False, "not firing"),
    (ActionRequest("R", "restart", None, "fp", "i", firing=True), HIST, Guardrails(), False, "no replica label"),
    (ActionRequest("R", "restart", "../../etc", "fp", "i", firing=True), HIST, Guardrails(), False, "unknown target"),
    (REQ, History(frozenset({"replica-0"}), True, None, 0, 0), Guardrails(), False, "already remediated"),
    (REQ, HIST, Guardrails(paused=True), False, "paused"),
    (REQ, History(frozenset({"replica-0"}), False, None, 0, 1), Guardrails(), False, "in flight"),
    (REQ, History(frozenset({"replica-0"}), False, 900.0, 0, 0), Guardrails(cooldown_s=300), False, "cooldown"),
    (REQ, History(frozenset({"replica-0"}), False, 600.0, 0, 0), Guardrails(cooldown_s=300), True, "restart"),
    (REQ, History(frozenset({"replica-0"}), False, None, 6, 0), Guardrails(max_actions_per_hour=6), False, "rate"),
    (REQ, HIST, Guardrails(dry_run=True), False, "dry-run: would restart replica-0"),
])
def test_policy(req: ActionRequest, hist: History, g: Guardrails, act: bool, reason: str) -> None:
    d = decide(req, hist, g, now=1000.0)
    assert d.act is act and reason in d.reason


IN = ActionRequest("Idle", "scale_in", "replica-0", "fp", "Idle/fp/1.000", firing=True)


def _cap(replicas: int = 3, healthy_after: int = 2, firing_since: float = 0.0, last_scale: float | None = None
         ) -> History:
    return History(frozenset({"replica-0"}), False, None, 0, 0, replicas, healthy_after, firing_since, last_scale)


@pytest.mark.parametrize(("hist", "g", "act", "reason"), [
    (_cap(), Guardrails(), True, "scale_in replica-0"),
    (_cap(replicas=2), Guardrails(min_replicas=2), False, "at replicas.min_count=2 (2 running)"),
    (_cap(replicas=1), Guardrails(), False, "at replicas.min_count=1"),
    (_cap(healthy_after=0), Guardrails(), False, "the last healthy replica"),
    (_cap(firing_since=800.0), Guardrails(scale_in_stabilization_s=300), False, "stabilization window (firing since"),
    (_cap(firing_since=700.0), Guardrails(scale_in_stabilization_s=300), True, "scale_in"),
    (_cap(last_scale=750.0), Guardrails(scale_in_stabilization_s=300), False, "a scale action ran within"),
    (_cap(), Guardrails(dry_run=True), False, "dry-run: would scale_in"),
])
def test_scale_in_policy(hist: History, g: Guardrails, act: bool, reason: str) -> None:
    """Kubernetes HPA habits: the 300 s stabilization window, a floor, never the last healthy replica."""
    d = decide(IN, hist, g, now=1000.0)
    assert d.act is act and reason in d.reason, d


OUT = ActionRequest("Busy", "scale_out", "replica-0", "fp", "Busy/fp/1.000", firing=True)


@pytest.mark.parametrize(("replicas", "act", "reason"), [
    (2, True, "scale_out replica-0"),
    (3, False, "at replicas.max_count=3 (3 running): a human must add capacity"),
    (4, False, "at replicas.max_count=3 (4 running)"),
])
def test_scale_out_stops_at_the_ceiling_as_a_decision(replicas: int, act: bool, reason: str) -> None:
    """HPA's ScalingLimited: at max_count a scale-out is refused by the policy (audited, no failed action
    that escalates), as a scale-in is at min_count."""
    d = decide(OUT, _cap(replicas=replicas), Guardrails(max_replicas=3), now=1000.0)
    assert d.act is act and reason in d.reason, d


class Actuator:
    def __init__(self, healthy: bool = True, fail: bool = False) -> None:
        self.calls: list[tuple[str, str]] = []
        self.healthy, self.fail = healthy, fail
        self.done = threading.Event()

    def targets(self) -> set[str]:
        return {"replica-0"}

    def act(self, action: str, target: str) -> str:
        self.calls.append((action, target))
        if self.fail:
            self.done.set()
            raise RemediationError("restart failed")
        return f"{action} {target}"

    def verify(self, target: str, timeout_s: float, action: str = "restart") -> bool:
        self.done.set()
        return self.healthy


def firing(active_at: float = 1.0) -> Alert:
    labels = {"alertname": "CudaError", "replica": "replica-0"}
    return Alert(labels, {}, 1.0, State.FIRING, active_at, fired_at=active_at)


@pytest.mark.parametrize(("actuator", "outcome"), [(Actuator(), "succeeded"), (Actuator(healthy=False),
                         "failed-verification"), (Actuator(fail=True), "failed")])
def test_one_action_per_incident_with_audited_outcome(tmp_path: Path, actuator: Actuator, outcome: str) -> None:
    store = Store(tmp_path / "s.db")
    r = Remediator(store, actuator, Guardrails(cooldown_s=0), clock=lambda: 100.0)
    assert r.consider("CudaError", "restart", firing()).act
    assert actuator.done.wait(5)
    r.shutdown()
    assert not r.consider("CudaError", "restart", firing()).act  # same incident: never twice
    assert actuator.calls == [("restart", "replica-0")]
    kinds = [(e["kind"], e.get("outcome")) for e in reversed(store.audit_log())]
    assert kinds[:2] == [("decision", None), ("outcome", outcome)]
    assert store.remediations()[0].outcome == outcome


def test_cooldown_is_persisted_across_restarts(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    a = Actuator()
    r = Remediator(store, a, Guardrails(cooldown_s=300), clock=lambda: 100.0)
    r.consider("CudaError", "restart", firing(1.0))
    a.done.wait(5)
    r.shutdown()
    store.close()
    store = Store(tmp_path / "s.db")  # a new daemon: the cooldown came from disk
    r2 = Remediator(store, Actuator(), Guardrails(cooldown_s=300), clock=lambda: 200.0)
    d = r2.consider("CudaError", "restart", firing(150.0))  # a new incident on the same target
    assert not d.act and "cooldown" in d.reason


def test_the_concurrency_cap_is_persisted_across_restarts(tmp_path: Path) -> None:
    """The in-flight count is the store's unfinished actions, not a counter in memory: an action that a
    sentinel killed with -9 left running still holds the cap (max_concurrent=1) in the next run, for any
    target, until recovery has given it an outcome."""
    from sentinel.state.remediation import Remediation

    store = Store(tmp_path / "s.db")
    assert store.start_remediation(Remediation("CudaError/old/1.000", "old", "CudaError", "restart", "replica-1",
                                               90.0, None, None))  # what the killed run left behind
    store.close()
    store = Store(tmp_path / "s.db")

    class TwoReplicas(Actuator):
        def targets(self) -> set[str]:
            return {"replica-0", "replica-1"}

    a = TwoReplicas()
    r = Remediator(store, a, Guardrails(cooldown_s=0, max_concurrent=1), clock=lambda: 100.0)
    d = r.consider("CudaError", "restart", firing(50.0))  # another replica, another incident
    assert not d.act and "1 repair(s) in flight (max_concurrent=1)" in d.reason
    assert r.recover() == ["CudaError/old/1.000"]  # replica-1 verifies healthy: the action gets its outcome
    r.shutdown()
    assert store.in_flight_remediations() == 0
    r = Remediator(store, a, Guardrails(cooldown_s=0, max_concurrent=1), clock=lambda: 100.0)
    assert r.consider("CudaError", "restart", firing(50.0)).act
    r.shutdown()
    assert a.calls == [("restart", "replica-0")]


def test_scale_actions_share_one_cooldown_across_replicas(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")

    class TwoReplicas(Actuator):
        def targets(self) -> set[str]:
            return {"replica-0", "replica-1"}

    a = TwoReplicas()
    r = Remediator(store, a, Guardrails(cooldown_s=300), clock=lambda: 100.0)
    hot0 = Alert({"alertname": "GpuSaturatedScaleOut", "replica": "replica-0"}, {}, 95.0, State.FIRING, 1.0,
                 fired_at=1.0)
    hot1 = Alert({"alertname": "GpuSaturatedScaleOut", "replica": "replica-1"}, {}, 95.0, State.FIRING, 1.0,
                 fired_at=1.0)
    assert r.consider("GpuSaturatedScaleOut", "scale_out", hot0).act
    a.done.wait(5)
    r.shutdown()
    d = r.consider("GpuSaturatedScaleOut", "scale_out", hot1)
    assert not d.act and "cooldown" in d.reason  # the deployment just scaled: replica-1 waits
    # a restart of replica-1 is not held back by the scale cooldown
    r2 = Remediator(store, TwoReplicas(), Guardrails(cooldown_s=300), clock=lambda: 100.0)
    cuda = Alert({"alertname": "CudaError", "replica": "replica-1"}, {}, 1.0, State.FIRING, 2.0, fired_at=2.0)
    assert r2.consider("CudaError", "restart", cuda).act
    r2.shutdown()


def test_the_scale_cooldown_counts_from_the_end_of_a_slow_scale_out(tmp_path: Path) -> None:
    """A scale-out whose new replica took 20 s to start (longer than the 5 s cooldown): another replica's
    busy alert, still firing on metrics from before the new capacity, waits the cooldown out from when the
    scale-out finished, not from when it began; while one is in flight it waits too."""
    from sentinel.state.remediation import Remediation

    store = Store(tmp_path / "s.db")
    assert store.start_remediation(Remediation("Busy/a/1.000", "a", "Busy", "scale_out", "replica-0", 100.0,
                                               None, None))
    now = [121.0]

    class Two(Actuator):
        def targets(self) -> set[str]:
            return {"replica-0", "replica-1"}

        def capacity(self) -> tuple[int, int]:
            return 2, 1

    a = Two()
    busy1 = Alert({"alertname": "Busy", "replica": "replica-1"}, {}, 95.0, State.FIRING, 90.0, fired_at=95.0)
    r = Remediator(store, a, Guardrails(cooldown_s=5, max_concurrent=2), clock=lambda: now[0])
    d = r.consider("Busy", "scale_out", busy1)
    assert not d.act and "1 scale action(s) in flight (one at a time)" in d.reason  # started 21 s ago
    store.finish_remediation("Busy/a/1.000", 120.0, "succeeded")
    now[0] = 123.0
    d = r.consider("Busy", "scale_out", busy1)
    assert not d.act and "cooldown for another 2s" in d.reason  # finished 3 s ago
    now[0] = 126.0
    assert r.consider("Busy", "scale_out", busy1).act
    assert a.done.wait(5)
    r.shutdown()
    assert a.calls == [("scale_out", "service")]


HOSTILE = ["$(touch /tmp/sentinel-pwned)", "`touch /tmp/sentinel-pwned`", "replica-0; touch /tmp/sentinel-pwned",
           "../../../../tmp/sentinel-pwned", "replica-0\ntouch /tmp/sentinel-pwned", "-rf"]


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_labels_never_reach_an_action(tmp_path: Path, value: str) -> None:
    """A label is only ever compared with the names of the replicas sentinel runs: a hostile value is an
    unknown target, no action is taken, and the audit keeps the value as data."""
    store = Store(tmp_path / "s.db")
    actuator = Actuator()
    r = Remediator(store, actuator, Guardrails(cooldown_s=0), clock=lambda: 100.0)
    a = Alert({"alertname": "CudaError", "replica": value}, {}, 1.0, State.FIRING, 1.0, fired_at=1.0)
    d = r.consider("CudaError", "restart", a)
    r.shutdown()
    assert not d.act and actuator.calls == []
    assert store.audit_log()[0]["labels"]["replica"] == value


def test_hostile_labels_never_reach_a_runbook_command(tmp_path: Path) -> None:
    """The cuda-error runbook with every hostile label at once: the nvidia-smi it runs (a stand-in that
    records its argument list) gets only the runbook's own arguments, and nothing is created anywhere."""
    import os
    import stat

    from sentinel.runbooks.base import Context
    from sentinel.runbooks.model import load_runbooks
    from sentinel.runbooks.runner import run
    from tests.conftest import ROOT

    argv_log = tmp_path / "argv.log"
    smi = tmp_path / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" >> {argv_log}\necho 'NVIDIA-SMI has failed'\nexit 9\n")
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    labels = {"alertname": "CudaError", **{f"l{i}": v for i, v in enumerate(HOSTILE)}, "replica": HOSTILE[0]}
    ctx = Context(nvidia_smi=str(smi), alert_labels=labels, proc=tmp_path, sys=tmp_path, var_log=tmp_path,
                  dmesg=str(tmp_path / "no-dmesg"))
    report = run([load_runbooks(ROOT / "runbooks")["cuda-error"]], ctx, "injection drill")
    assert report.results, "the runbook ran no step"
    recorded = argv_log.read_text() if argv_log.exists() else ""
    assert recorded, "the stand-in nvidia-smi was never run: the test would prove nothing"
    assert not any(v in recorded or v.strip("`$()") in recorded for v in HOSTILE[:4]), recorded
    assert not os.path.exists("/tmp/sentinel-pwned")


KILLED_MID_ACTION = """
import os, signal, sys, threading, time
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from sentinel.alerts.store import Store
from sentinel.remediation.policy import Guardrails
from sentinel.remediation.remediator import Remediator
from tests.unit.test_remediation import firing

class Stuck:
    def targets(self): return {"replica-0"}
    def act(self, action, target):
        os.kill(os.getpid(), signal.SIGKILL)  # sentinel dies in the middle of the restart
    def verify(self, target, timeout_s, action="restart"): return True

store = Store(Path(sys.argv[1]))
assert store.claim_findings("f;g;CudaError", "fp", 1.0, 100.0)  # a runbook was running too
Remediator(store, Stuck(), Guardrails(cooldown_s=300), clock=lambda: 100.0).consider("CudaError", "restart", firing())
time.sleep(30)
"""


@pytest.mark.parametrize("healthy", [True, False])
def test_kill_9_mid_remediation_is_resolved_on_restart(tmp_path: Path, healthy: bool) -> None:
    """sentinel is killed with -9 while a restart runs. The next run verifies the target: healthy, the action
    ends 'interrupted-verified'; not healthy, it is marked aborted, and the incident, still firing, is acted on
    again at once (the aborted try counts towards the hourly limit, not the cooldown). The runbook that was
    running is forgotten, so it runs again. The audit says which."""
    import signal
    import subprocess
    import sys

    from tests.conftest import ROOT

    db = tmp_path / "s.db"
    p = subprocess.run([sys.executable, "-c", KILLED_MID_ACTION, str(db), str(ROOT)], capture_output=True, text=True,
                       timeout=60, check=False, cwd=ROOT)
    assert p.returncode == -signal.SIGKILL, p.stderr
    store = Store(db)
    [left] = store.unfinished_remediations()
    assert left.outcome is None
    assert store.interrupted_findings() == [("f;g;CudaError", "fp", 1.0)]
    assert store.claim_findings("f;g;CudaError", "fp", 1.0, 200.0)  # the runbook may run again
    a = Actuator(healthy=healthy)
    r = Remediator(store, a, Guardrails(cooldown_s=300), clock=lambda: 200.0)
    assert r.recover() == [left.incident]
    r.shutdown()
    [rec] = [e for e in store.audit_log() if e["kind"] == "recovery"]
    assert rec["outcome"] == ("interrupted-verified" if healthy else "aborted")
    assert store.unfinished_remediations() == []
    r = Remediator(store, a, Guardrails(cooldown_s=300), clock=lambda: 200.0)
    again = r.consider("CudaError", "restart", firing())
    r.shutdown()
    if healthy:
        assert not again.act  # verified: the incident was handled
    else:
        assert again.act, again.reason  # aborted: acted on again, not held by the cooldown
        assert [x.outcome for x in store.remediations()] == ["aborted", "failed-verification"]


def test_evidence_from_before_the_targets_restart_never_triggers_an_action(tmp_path: Path) -> None:
    """A cuda_error line logged before replica-0 was restarted still lies in the CudaError window (a reload
    widened it): the alert fires, but the line is about the process that is gone, so nothing is restarted.
    A line from the current incarnation does trigger the restart."""
    from sentinel.logstore.local import LocalLogStore
    from sentinel.rules.evaluator import Evaluator
    from sentinel.rules.model import Group, LoadedGroup, Rule
    from sentinel.rules.sources import LogRuleSource

    logs = LocalLogStore(tmp_path / "logs.db")
    src = LogRuleSource(logs)
    rule = Rule.model_validate({"alert": "CudaError", "log": {"filter": [{"exists": "cuda_error"}],
                                                              "timeframe": "10m", "query_key": "replica"},
                                "sentinel": {"remediation": "restart"}})
    store = Store(tmp_path / "s.db")
    now = [1_000.0]
    ev = Evaluator(store, None, src, clock=lambda: now[0])
    ev.load([LoadedGroup(file="r.yaml", group=Group(name="logs", rules=[rule]))])
    [rt] = ev.all_runtimes()

    class Restarted(Actuator):
        def incarnation(self, target: str) -> float | None:
            return 900.0  # replica-0 was restarted at 900

    a = Restarted()
    r = Remediator(store, a, Guardrails(cooldown_s=0), clock=lambda: now[0],
                   evidence=lambda rt_, alert, since: src.evidence_since(rt_.rule.log, alert.labels, since, now[0]))
    logs.add([(850.0, {"cuda_error": "Xid 79", "replica": "replica-0"})])  # before the restart
    rt.machine.eval(now[0], src.query(rule.log, now[0]))  # type: ignore[arg-type]
    [alert] = rt.machine.firing()
    r.on_firing(rt, [alert])
    assert a.calls == []
    [d] = [e for e in store.audit_log() if e["kind"] == "decision"]
    assert not d["act"] and "predates replica-0's current incarnation" in d["reason"]
    logs.add([(950.0, {"cuda_error": "Xid 79 again", "replica": "replica-0"})])  # this incarnation
    r.on_firing(rt, [alert])
    assert a.done.wait(5)
    r.shutdown()
    assert a.calls == [("restart", "replica-0")]


def test_scale_in_waits_for_the_stabilization_window_and_a_scale_out_restarts_it(tmp_path: Path) -> None:
    """The shell feeds the policy the alert's firing time, the actuator's capacity and the last scale action
    from the store (so the window survives a restart of sentinel)."""
    store = Store(tmp_path / "s.db")
    now = [1000.0]

    class Three(Actuator):
        def targets(self) -> set[str]:
            return {"replica-0", "replica-1", "replica-2"}

        def capacity(self) -> tuple[int, int]:
            return 3, 2

    a = Three()
    r = Remediator(store, a, Guardrails(cooldown_s=0, scale_in_stabilization_s=300), clock=lambda: now[0])
    idle = Alert({"alertname": "Idle", "replica": "replica-0"}, {}, 5.0, State.FIRING, 800.0, fired_at=900.0)
    d = r.consider("Idle", "scale_in", idle)
    assert not d.act and "stabilization window" in d.reason
    now[0] = 1250.0  # fired 350 s ago
    assert r.consider("Idle", "scale_in", idle).act
    assert a.done.wait(5)
    r.shutdown()
    assert a.calls == [("scale_in", "service")]  # the service, not the replica
    r2 = Remediator(Store(tmp_path / "s.db"), Three(), Guardrails(cooldown_s=0, scale_in_stabilization_s=300),
                    clock=lambda: 1400.0)  # a restarted sentinel: the last scale action is on disk
    again = Alert({"alertname": "Idle", "replica": "replica-1"}, {}, 5.0, State.FIRING, 800.0, fired_at=900.0)
    d = r2.consider("Idle", "scale_in", again)
    assert not d.act and "a scale action ran within" in d.reason
