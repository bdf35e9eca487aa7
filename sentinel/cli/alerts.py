"""What sentinel holds: ``alerts``, ``silence`` and ``remediate`` (the log and approvals)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from sentinel.cli.base import _state_store, app


@app.command("alerts")
def alerts_cmd(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="settings YAML file")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="one JSON document")] = False,
    all_states: Annotated[bool, typer.Option("--all", help="resolved alerts too (kept 15 minutes)")] = False,
) -> None:
    """The alerts sentinel holds (state, age, value) and each receiver's delivery status, from its state
    database: works whether or not sentinel is running."""
    import json as _json


    store = _state_store(config)
    now = time.time()
    alerts: list[dict[str, Any]] = [
        {"rule": rule.split(";")[-1], "labels": a.labels, "state": a.state.value, "value": a.value,
         "active_for_s": round(now - a.active_at, 1),
         "last_sent_s_ago": round(now - a.last_sent_at, 1) if a.last_sent_at else None}
        for rule, a in store.all_alerts() if all_states or a.state.value != "inactive"]
    receivers = store.receiver_status()
    if json_out:
        typer.echo(_json.dumps({"alerts": alerts, "receivers": receivers}, default=str))
        return
    console = Console()
    t = Table(title=f"{len(alerts)} alert(s)")
    for col in ("alert", "labels", "state", "value", "active for", "last sent"):
        t.add_column(col)
    for a in sorted(alerts, key=lambda x: -float(x["active_for_s"])):
        labels = ", ".join(f"{k}={v}" for k, v in sorted(a["labels"].items()) if k != "alertname")
        t.add_row(str(a["rule"]), labels, str(a["state"]), f"{a['value']:g}", f"{a['active_for_s']:.0f}s",
                  "-" if a["last_sent_s_ago"] is None else f"{a['last_sent_s_ago']:.0f}s ago")
    console.print(t)
    r = Table(title="receivers")
    for col in ("receiver", "pending", "sent", "failed", "expired", "superseded", "oldest pending", "last error"):
        r.add_column(col)
    for name, st in sorted(receivers.items()):
        c = st["counts"]
        oldest = f"{now - st['oldest_pending']:.0f}s" if st["oldest_pending"] else "-"
        r.add_row(name, *(str(c.get(k, 0)) for k in ("pending", "sent", "failed", "expired", "superseded")), oldest,
                  (st["last_error"] or "")[:60])
    console.print(r)


silence_app = typer.Typer(help="Mute notifications of matching alerts for a while (Alertmanager's silences).",
                          no_args_is_help=True)
app.add_typer(silence_app, name="silence")


remediate_app = typer.Typer(help="Remediation: the log of decisions and outcomes, and approvals for actions a "
                            "human must allow (GPU reset).", no_args_is_help=True)
app.add_typer(remediate_app, name="remediate")


def _answer(approval_id: str, approve: bool, by: str | None, config: Path | None) -> None:
    import getpass

    store = _state_store(config)
    who = by or getpass.getuser()
    doc = store.decide_approval(approval_id, approve, who, time.time())
    if doc is None:
        typer.echo(f"error: no approval {approval_id!r} (`sentinel remediate log` lists them)", err=True)
        raise typer.Exit(1)
    wanted = "approved" if approve else "rejected"
    if doc["status"] != wanted:
        typer.echo(f"error: approval {approval_id} was already {doc['status']} by {doc.get('decided_by')}", err=True)
        raise typer.Exit(1)
    typer.echo(f"{doc['action']} on {doc['target']} {wanted} by {who}; a running sentinel acts on it at its next "
               "evaluation of the rule" if approve else f"{doc['action']} on {doc['target']} rejected by {who}; the "
               "problem climbs to the next rung")


@remediate_app.command("approve")
def remediate_approve(
    approval_id: Annotated[str, typer.Argument(help="the id SentinelRemediationAwaitingApproval names")],
    by: Annotated[str | None, typer.Option(help="who approves (default: your user name)")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="settings YAML file")] = None,
) -> None:
    """Allow an action that waits for a human (recorded in the audit log with your name)."""
    _answer(approval_id, True, by, config)


@remediate_app.command("reject")
def remediate_reject(
    approval_id: Annotated[str, typer.Argument(help="the id SentinelRemediationAwaitingApproval names")],
    by: Annotated[str | None, typer.Option(help="who rejects (default: your user name)")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="settings YAML file")] = None,
) -> None:
    """Refuse an action that waits for a human: the problem climbs to the next rung."""
    _answer(approval_id, False, by, config)


@remediate_app.command("log")
def remediate_log(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="settings YAML file")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="one JSON document")] = False,
    limit: Annotated[int, typer.Option(help="the last N audit entries")] = 50,
) -> None:
    """Decisions, outcomes, escalations and approvals from sentinel's audit log (newest first), each problem's
    place on the escalation ladder, and the approvals waiting: works whether or not sentinel runs."""
    import json as _json
    from datetime import UTC, datetime


    store = _state_store(config)
    kinds = {"decision", "outcome", "escalation", "approval", "recovery"}
    entries = [e for e in store.audit_log(limit * 4) if e["kind"] in kinds][:limit]
    ladders = {f"{rule}/{target}": v for (rule, target), v in store.ladders().items()}
    approvals = store.approvals()
    if json_out:
        typer.echo(_json.dumps({"audit": entries, "ladders": ladders, "approvals": approvals}, default=str))
        return

    def when(ts: float) -> str:
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")

    console = Console()
    t = Table(title=f"remediation log (last {len(entries)})")
    for col in ("when", "kind", "incident", "action", "target", "result"):
        t.add_column(col)
    for e in entries:
        result = (e.get("reason") or e.get("outcome") or e.get("why") or e.get("status") or e.get("detail") or "")
        t.add_row(when(e["ts"]), e["kind"], e["subject"], str(e.get("action") or e.get("rung") or ""),
                  str(e.get("target") or ""), str(result)[:120])
    console.print(t)
    if ladders:
        lt = Table(title="escalation ladders")
        for col in ("problem", "rung", "attempts", "last attempt", "why"):
            lt.add_column(col)
        for problem, d in sorted(ladders.items()):
            lt.add_row(problem, d.get("rung", ""), str(d.get("attempts", 0)),
                       when(d["last_at"]) if d.get("last_at") else "-", str(d.get("why", ""))[:100])
        console.print(lt)
    pending = [a for a in approvals if a.get("status") == "pending"]
    if pending:
        at = Table(title="waiting for approval: sentinel remediate approve ID")
        for col in ("id", "action", "target", "rule", "requested", "why"):
            at.add_column(col)
        for a in pending:
            at.add_row(a["id"], a["action"], a["target"], a.get("rule", ""), when(a["requested_at"]),
                       str(a.get("why", ""))[:80])
        console.print(at)


@silence_app.command("add")
def silence_add(
    matchers: Annotated[list[str], typer.Argument(help='e.g. alertname="CudaError" replica=~"replica-[01]"')],
    author: Annotated[str, typer.Option(help="who silences")],
    comment: Annotated[str, typer.Option(help="why")],
    duration: Annotated[str, typer.Option(help="how long, from now")] = "1h",
    config: Annotated[Path | None, typer.Option("--config", "-c", help="settings YAML file")] = None,
) -> None:
    """Add a silence; prints its id. A running sentinel applies it at its next evaluation."""
    from sentinel.alerts.silences import parse_matcher
    from sentinel.durations import parse_duration

    try:
        texts = [str(parse_matcher(m)) for m in matchers]
        seconds = parse_duration(duration)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    if seconds <= 0:
        raise typer.BadParameter("must be positive", param_hint="--duration")
    store = _state_store(config)
    now = time.time()
    sid = store.add_silence(texts, now, now + seconds, author, comment, now)
    store.audit(now, "silence", sid, matchers=texts, by=author, comment=comment)
    typer.echo(sid)


@silence_app.command("list")
def silence_list(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="settings YAML file")] = None,
    json_out: Annotated[bool, typer.Option("--json")] = False,
    all_: Annotated[bool, typer.Option("--all", help="expired ones too")] = False,
) -> None:
    """The active silences (with --all, every one)."""
    import json as _json


    now = time.time()
    found = _state_store(config).silences(None if all_ else now)
    if json_out:
        typer.echo(_json.dumps(found))
        return
    t = Table(title=f"{len(found)} silence(s)")
    for col in ("id", "matchers", "ends in", "by", "comment"):
        t.add_column(col)
    for x in found:
        left = x["endsAt"] - now
        t.add_row(x["id"][:12], " ".join(x["matchers"]), f"{left / 60:.0f}m" if left > 0 else "expired",
                  x["createdBy"], x["comment"])
    Console().print(t)


@silence_app.command("expire")
def silence_expire(
    silence_id: Annotated[str, typer.Argument(help="the id `silence add` printed (or its first 12 characters)")],
    config: Annotated[Path | None, typer.Option("--config", "-c", help="settings YAML file")] = None,
) -> None:
    """End a silence now."""
    store = _state_store(config)
    now = time.time()
    ids = [x["id"] for x in store.silences(now) if x["id"].startswith(silence_id)]
    if len(ids) != 1:
        typer.echo(f"error: {'no' if not ids else 'more than one'} active silence starts with {silence_id!r}", err=True)
        raise typer.Exit(1)
    store.expire_silence(ids[0], now)
    store.audit(now, "silence-expired", ids[0])
    typer.echo(f"expired {ids[0]}")
