"""The escalation ladder: pure steps, then through the remediator and the state store with an in-test
actuator (a seam implementing the Actuator protocol), the evaluator's escalation alerts, and the CLI."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from sentinel.alerts.state import Alert, State
from sentinel.alerts.store import Store
from sentinel.cli import app
from sentinel.remediation import ladder
from sentinel.remediation.internal import APPROVAL_ALERT, ESCALATED_ALERT, remediation_rules
from sentinel.remediation.policy import Guardrails
from sentinel.remediation.remediator import Remediator
from sentinel.rules.evaluator import Evaluator

LOCAL = frozenset({"restart", "scale_out", "scale_in", "reset_gpu"})
K8S = frozenset({"restart", "rollout_restart", "scale_out", "scale_in", "cordon"})


def _xid(*actions: str) -> dict[str, Any]:
    return {"runbook": "cuda-error", "results": [{"step": "driver-log", "evidence": {
        "xid_events": [{"code": 0, "action": a} for a in actions]}}]}


@pytest.mark.parametrize(("findings", "rung"), [
    (None, "restart"), (_xid("restart_app"), "restart"), (_xid("restart_app", "reset_gpu"), "reset_gpu"),
    (_xid("reboot"), "cordon"), (_xid("ecc_workflow"), "cordon"),
    ({"results": [{"summary": "model.safetensors: MD5 mismatch with the integrity manifest"}]}, "page"),
])
def test_entry_from_the_evidence(findings: dict[str, Any] | None, rung: str) -> None:
    assert ladder.entry(findings)[0] == rung


def test_rungs_the_actuator_cannot_take_are_skipped() -> None:
    assert ladder.climb("restart", LOCAL) == "reset_gpu" and ladder.climb("reset_gpu", LOCAL) == "page"
    assert ladder.climb("restart", K8S) == "cordon" and ladder.settle("reset_gpu", K8S) == "cordon"
    assert ladder.settle("cordon", LOCAL) == "page"


def test_next_step_counts_attempts_and_forgets_after_the_window() -> None:
    s = ladder.next_step(None, None, LOCAL, 100.0, 3600)
    assert (s.rung, s.attempts) == ("restart", 0)
    s = ladder.after(s, "restart", "succeeded", 100.0, LOCAL)
    s = ladder.after(ladder.next_step(s, None, LOCAL, 200.0, 3600), "restart", "succeeded", 200.0, LOCAL)
    assert (s.rung, s.attempts) == ("restart", 2)
    up = ladder.next_step(s, None, LOCAL, 300.0, 3600)  # the third time within the window: the next rung
    assert up.rung == "reset_gpu" and "did not hold" in up.why
    fresh = ladder.next_step(s, None, LOCAL, 200.0 + 3601, 3600)  # quiet for the window: start over
    assert (fresh.rung, fresh.attempts) == ("restart", 0)
    failed = ladder.after(ladder.Ladder("reset_gpu"), "reset_gpu", "failed", 400.0, LOCAL)
    assert failed.rung == "page"  # a failed attempt climbs at once (no cordon for local replicas)
    bad = ladder.after(ladder.Ladder(), "restart", "failed-verification", 500.0, LOCAL,
                       "IntegrityError: model/model.safetensors: md5 mismatch")
    assert bad.rung == "page" and "would not help" in bad.why
    worse = ladder.next_step(ladder.Ladder("restart", 1, 600.0), _xid("reboot"), K8S, 650.0, 3600)
    assert worse.rung == "cordon"  # new evidence puts the problem higher at once


class Actuator:
    actions = LOCAL

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.outcomes: list[bool] = []
        self.failure: str | None = None
        self.done = threading.Semaphore(0)

    def targets(self) -> set[str]:
        return {"replica-0"}

    def act(self, action: str, target: str) -> str:
        self.calls.append((action, target))
        return f"{action} {target}"

    def verify(self, target: str, timeout_s: float, action: str = "restart") -> bool:
        ok = self.outcomes.pop(0) if self.outcomes else True
        self.done.release()
        return ok

    def failure_reason(self, target: str) -> str | None:
        return self.failure


def _incident(n: float) -> Alert:
    return Alert({"alertname": "CudaError", "replica": "replica-0"}, {}, 1.0, State.FIRING, n, fired_at=n)


def _run(r: Remediator, a: Actuator, at: float) -> Any:
    d = r.consider("CudaError", "restart", _incident(at))
    if d.act:
        assert a.done.acquire(timeout=5)
        r.shutdown()  # let the outcome be recorded
        r._pool = type(r._pool)(max_workers=1)
    return d


def test_the_ladder_through_the_remediator_with_approval_and_escalation(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    now = [1000.0]
    a = Actuator()
    r = Remediator(store, a, Guardrails(cooldown_s=0), clock=lambda: now[0], ladder_window_s=3600)
    assert _run(r, a, 1000.0).act
    now[0] = 1100.0
    assert _run(r, a, 1100.0).act
    assert a.calls == [("restart", "replica-0")] * 2
    now[0] = 1200.0
    d = r.consider("CudaError", "restart", _incident(1200.0))  # the third time within the hour: GPU reset, asked
    assert not d.act and "needs a human's approval: sentinel remediate approve" in d.reason
    approval_id = d.reason.split("approve ")[1].split()[0]
    ev = Evaluator(store, None, None, clock=lambda: now[0], internal_rules=remediation_rules(store))
    ev.eval_meta(now[0])
    waiting = [x for x in ev.internal[APPROVAL_ALERT].machine.active.values() if x.state == State.FIRING]
    assert [x.labels["approval"] for x in waiting] == [approval_id] and waiting[0].labels["action"] == "reset_gpu"
    # a human approves it from the CLI, against the same state database; sentinel acts at its next evaluation
    cfg = tmp_path / "s.yaml"
    cfg.write_text(f"state_dir: {tmp_path}\n")
    (tmp_path / "sentinel.db").symlink_to(tmp_path / "s.db")
    res = CliRunner().invoke(app, ["remediate", "approve", approval_id, "--by", "oncall-alice", "-c", str(cfg)])
    assert res.exit_code == 0 and "approved by oncall-alice" in res.output
    again = CliRunner().invoke(app, ["remediate", "reject", approval_id, "-c", str(cfg)])
    assert again.exit_code == 1 and "already approved" in again.output
    a.outcomes = [False]  # the reset does not bring the replica back
    r2 = Remediator(Store(tmp_path / "s.db"), a, Guardrails(cooldown_s=0), clock=lambda: now[0])  # a restart
    assert _run(r2, a, 1200.0).act and a.calls[-1] == ("reset_gpu", "replica-0")
    now[0] = 1300.0
    d = r2.consider("CudaError", "restart", _incident(1300.0))  # nothing automatic left
    assert not d.act and "escalated to a human" in d.reason
    ev.eval_meta(now[0])
    [esc] = [x for x in ev.internal[ESCALATED_ALERT].machine.active.values() if x.state == State.FIRING]
    assert esc.labels["alertname"] == ESCALATED_ALERT and esc.labels["replica"] == "replica-0"
    assert "reset_gpu ended failed-verification" in esc.labels["reason"]
    ev.eval_meta(now[0] + 600)  # the problem stopped firing: the escalation resolves
    assert not [x for x in ev.internal[ESCALATED_ALERT].machine.active.values() if x.state == State.FIRING]
    out = CliRunner().invoke(app, ["remediate", "log", "--json", "-c", str(cfg)])
    doc = json.loads(out.output)
    assert doc["ladders"]["CudaError/replica-0"]["rung"] == "page"
    assert [e["kind"] for e in doc["audit"]].count("escalation") == 2  # restart → reset_gpu → page
    assert doc["approvals"][0]["decided_by"] == "oncall-alice"
    table = CliRunner().invoke(app, ["remediate", "log", "-c", str(cfg)])
    assert table.exit_code == 0 and "escalation ladders" in table.output and APPROVAL_ALERT not in table.output


def test_corrupted_weights_page_instead_of_a_restart_loop(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    a = Actuator()
    a.outcomes = [False]
    a.failure = "IntegrityError: /models/m/integrity.json: model.safetensors md5 mismatch"
    r = Remediator(store, a, Guardrails(cooldown_s=0), clock=lambda: 1000.0)
    assert _run(r, a, 1000.0).act  # the first restart cannot know
    d = r.consider("CudaError", "restart", _incident(1001.0))
    assert not d.act and "md5 mismatch" in d.reason and a.calls == [("restart", "replica-0")]


def test_a_rejected_reset_climbs(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    store.save_ladder("CudaError", "replica-0", ladder.Ladder("reset_gpu", 0, 900.0).to_json())
    a = Actuator()
    r = Remediator(store, a, Guardrails(cooldown_s=0), clock=lambda: 1000.0)
    d = r.consider("CudaError", "restart", _incident(1000.0))
    approval_id = d.reason.split("approve ")[1].split()[0]
    assert store.decide_approval(approval_id, False, "bob", 1001.0) is not None
    d = r.consider("CudaError", "restart", _incident(1000.0))
    assert not d.act and "escalated" in d.reason and "rejected by bob" in d.reason
    assert a.calls == []


def test_chaos_cli_refuses_what_cannot_work(tmp_path: Path) -> None:
    """`sentinel chaos`: an unknown drill, no admin token, or no running sentinel are each a clear error (the
    drills themselves run against real replicas in bench/drills.py and tests/integration)."""
    assert CliRunner().invoke(app, ["chaos", "meteor"]).exit_code == 2
    cfg = tmp_path / "s.yaml"
    cfg.write_text(f"state_dir: {tmp_path}\n")
    res = CliRunner().invoke(app, ["chaos", "hang", "-c", str(cfg)])
    assert res.exit_code == 2 and "replicas.admin_token" in res.output
    cfg.write_text(f"state_dir: {tmp_path}\nreplicas:\n  admin_token: chaos-admin-token-0123456789\n")
    res = CliRunner().invoke(app, ["chaos", "hang", "-c", str(cfg)])
    assert res.exit_code == 2 and "is `sentinel up` running" in res.output
    # scale-out needs no fault switch (no admin token), only a running sentinel
    cfg.write_text(f"state_dir: {tmp_path}\n")
    res = CliRunner().invoke(app, ["chaos", "scale-out", "-c", str(cfg)])
    assert res.exit_code == 2 and "is `sentinel up` running" in res.output
    res = CliRunner().invoke(app, ["chaos", "meteor"])
    assert "memory-leak" in res.output and "scale-out" in res.output  # the drills are listed


def test_the_leak_drill_refuses_a_replica_far_from_its_limit() -> None:
    """`sentinel chaos memory-leak` paces the leak from the replica's own memory figures, and will not leak
    gigabytes towards a host-sized limit (a real HTTP server stands in for the replica's /metrics)."""
    import threading
    from http.server import BaseHTTPRequestHandler

    from sentinel.chaos import ChaosError, leak_fault
    from tests.httpserver import LoopbackServer

    figures = {"usage": 1.0 * 2**30, "limit": 24.0 * 2**30}

    class Metrics(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            body = (f'memory_usage_bytes{{device="cpu"}} {figures["usage"]}\n'
                    f'memory_limit_bytes{{device="cpu"}} {figures["limit"]}\n').encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = LoopbackServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(ChaosError, match="--memory-limit"):
            leak_fault(url, 600, 4 * 2**30)
        figures["limit"] = 3.0 * 2**30
        fault, detail = leak_fault(url, 600, 4 * 2**30)
        assert fault == {"leak_mb_per_s": pytest.approx(2048 / 600)} and "in 600s" in detail
        figures["usage"] = 3.5 * 2**30
        with pytest.raises(ChaosError, match="already uses"):
            leak_fault(url, 600, 4 * 2**30)
    finally:
        server.shutdown()


def test_an_action_that_does_not_clear_the_condition_escalates(tmp_path: Path) -> None:
    """Verify after action: the restart succeeded (the replica serves) but the alert still fires past the
    clear deadline: the attempt is recorded as not having cleared it, and the same episode climbs the ladder."""
    store = Store(tmp_path / "s.db")
    now = [1000.0]
    a = Actuator()
    r = Remediator(store, a, Guardrails(cooldown_s=0), clock=lambda: now[0], clear_deadline_s=600)
    episode = _incident(990.0)
    assert _run(r, a, 990.0).act and a.calls == [("restart", "replica-0")]
    now[0] = 1300.0  # still firing, within the deadline: nothing more
    d = r.consider("CudaError", "restart", episode)
    assert not d.act and "already remediated" in d.reason
    now[0] = 1700.0  # past it
    d = r.consider("CudaError", "restart", episode)
    assert not d.act and "needs a human's approval" in d.reason  # the next rung, for the same episode
    [v] = [e for e in store.audit_log() if e["kind"] == "verification"]
    assert v["outcome"] == "not-cleared" and "still fires" in v["detail"]
    assert ladder.Ladder.from_json(store.ladder("CudaError", "replica-0")).rung == "reset_gpu"  # type: ignore[union-attr]
    d = r.consider("CudaError", "restart", episode)  # said once
    assert len([e for e in store.audit_log() if e["kind"] == "verification"]) == 1


def test_ladders_and_approvals_kept_as_kv_entries_move_to_their_tables(tmp_path: Path) -> None:
    """A state file from before the ladder and approval tables: its kv entries are moved over on open, once."""
    import json
    import sqlite3

    from sentinel.alerts.store import Store

    path = tmp_path / "state.db"
    Store(path).close()
    db = sqlite3.connect(path)
    old = {"rung": "reset_gpu", "attempts": 1, "since": 900.0, "why": "restart did not clear it", "history": []}
    request = {"id": "ab12", "status": "pending", "requested_at": 950.0, "incident": "i", "action": "reset_gpu",
               "rule": "CudaError", "target": "replica-0"}
    with db:
        db.execute("DROP TABLE ladders")
        db.execute("DROP TABLE approvals")
        db.execute("INSERT INTO kv VALUES ('ladder:CudaError/replica-0', ?)", (json.dumps(old),))
        db.execute("INSERT INTO kv VALUES ('approval:ab12', ?)", (json.dumps(request),))
    db.close()
    store = Store(path)
    assert store.ladders() == {("CudaError", "replica-0"): old} and store.approvals() == [request]
    assert store.items("ladder:") == {} and store.items("approval:") == {}
    decided = store.decide_approval("ab12", True, "oncall", 1_000.0)
    assert decided is not None and decided["status"] == "approved"
    store.close()
    assert Store(path).approvals()[0]["decided_by"] == "oncall"  # and a second open changes nothing
