"""`sentinel diagnose`: choose runbooks (by name, all, or an alert's rule), run them with a progress
display, and show the result as a table."""

from __future__ import annotations

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from sentinel.alerts.store import Store
from sentinel.rules.model import load_rules
from sentinel.runbooks.base import Status
from sentinel.runbooks.context import build_context
from sentinel.runbooks.model import Runbook, load_runbooks
from sentinel.runbooks.runner import Report, StepResult, run
from sentinel.settings import Settings

STYLE = {Status.OK: "green", Status.WARN: "yellow", Status.FAIL: "bold red", Status.SKIPPED: "dim"}


class DiagnoseError(Exception):
    """The request cannot be served (unknown runbook, unknown alert)."""


def _alert_runbook(settings: Settings, fingerprint: str) -> tuple[str, dict[str, str]]:
    db = settings.state_dir / "sentinel.db"
    if not db.exists():
        raise DiagnoseError(f"no alert state in {settings.state_dir} (is this sentinel's state directory?)")
    store = Store(db)
    try:
        found = store.find_alert(fingerprint)
    finally:
        store.close()
    if found is None:
        raise DiagnoseError(f"no alert with fingerprint {fingerprint!r} in {db}")
    key, alert = found
    for g in load_rules(settings.rules_dir):
        for rule in g.group.rules:
            if f"{g.key};{rule.name}" == key:
                if rule.sentinel.runbook is None:
                    raise DiagnoseError(f"rule {rule.name} names no runbook (sentinel.runbook)")
                return rule.sentinel.runbook, alert.labels
    raise DiagnoseError(f"the rule of alert {fingerprint} ({key}) is no longer in {settings.rules_dir}")


def diagnose_report(settings: Settings, name: str | None, all_: bool, alert: str | None,
                    console: Console | None) -> Report:
    books = load_runbooks(settings.runbooks_dir)
    labels: dict[str, str] = {}
    if alert is not None:
        name, labels = _alert_runbook(settings, alert)
    if all_:
        chosen: list[Runbook] = list(books.values())
        title = "all runbooks"
    elif name is not None:
        if name not in books:
            raise DiagnoseError(f"unknown runbook {name!r}; known: {', '.join(sorted(books))}")
        chosen, title = [books[name]], name
    else:
        raise DiagnoseError(f"name a runbook ({', '.join(sorted(books))}), or pass --all or --alert FINGERPRINT")
    ctx = build_context(settings, labels)
    if console is None or not console.is_terminal:
        return run(chosen, ctx, title, dedupe=all_)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  transient=True) as prog:
        task = prog.add_task("starting", total=None)

        def progress(label: str, result: StepResult | None) -> None:
            prog.update(task, description=f"running {label}" if result is None else f"{label}: {result.finding.status}")

        return run(chosen, ctx, title, progress, dedupe=all_)


def print_report(rep: Report, console: Console) -> None:
    table = Table(title=f"sentinel diagnose: {rep.title} — {rep.status.value.upper()}", show_lines=False)
    for col in ("status", "step", "summary", "remedy", "s"):
        table.add_column(col, overflow="fold")
    for r in rep.results:
        st = r.finding.status
        table.add_row(f"[{STYLE[st]}]{st.value}[/]", f"{r.runbook}/{r.step}", r.finding.summary,
                      r.finding.remedy or "", f"{r.seconds:.2f}")
    console.print(table)
    if rep.alert_labels:
        console.print("alert: " + ", ".join(f"{k}={v}" for k, v in sorted(rep.alert_labels.items())))
