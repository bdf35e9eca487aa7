"""``sentinel logs``: a log rule against stored lines, and the lines behind an alert."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from sentinel import logstore
from sentinel.cli.base import app
from sentinel.errors import SentinelError
from sentinel.rules.filters import LogFilter
from sentinel.rules.model import load_rule_file

logs_app = typer.Typer(help="The log lines behind an alert, from the configured log store.", no_args_is_help=True)
app.add_typer(logs_app, name="logs")


@logs_app.command("test-rule")
def logs_test_rule(
    files: Annotated[list[Path], typer.Argument(help="rule files holding log rules")],
    start: Annotated[str, typer.Option(help="first evaluation: unix seconds or e.g. 2026-12-05T10:00:00Z")],
    end: Annotated[str, typer.Option(help="last evaluation (inclusive), as --start")],
    store: Annotated[str | None, typer.Option(help="local or es (default: es when logs.elasticsearch_url is set)")
                     ] = None,
    rule: Annotated[str | None, typer.Option(help="only this rule (its alert name)")] = None,
    step: Annotated[str | None, typer.Option(help="time between evaluations (default: each group's interval)")
                    ] = None,
    db: Annotated[Path | None, typer.Option(help="the local store's file (default: STATE_DIR/logs.db)")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="settings YAML file")] = None,
    elasticsearch_url: Annotated[str | None, typer.Option(help="query this Elasticsearch")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="one JSON object per match")] = False,
) -> None:
    """Run log rules over a past range, evaluation by evaluation, and print each evaluation's matches (as
    ElastAlert2's elastalert-test-rule). Exit 0 whether or not anything matched; 2 on bad input."""
    import json as _json

    from sentinel.durations import parse_duration
    from sentinel.errors import DatasourceError
    from sentinel.rules.logtest import evaluations, iso, parse_time
    from sentinel.rules.sources import LogCounter, LogRuleSource
    from sentinel.settings import load_settings

    try:
        s = load_settings(config, {"logs": {"elasticsearch_url": elasticsearch_url}} if elasticsearch_url else None)
        t0, t1 = parse_time(start), parse_time(end)
        every = parse_duration(step) if step else None
        groups = [g for f in files for g in load_rule_file(f)]
        kind = store or ("es" if s.logs.elasticsearch_url else "local")
        counter: LogCounter = logstore.open(s, kind=kind, db=db)
        found = 0
        for name, at, matches in evaluations(groups, LogRuleSource(counter), t0, t1, every, only=rule):
            found += len(matches)
            for m in matches:
                if json_out:
                    typer.echo(_json.dumps(m.as_dict(), sort_keys=True))
                else:
                    labels = ", ".join(f"{k}={v}" for k, v in sorted(m.labels.items())) or "(no labels)"
                    typer.echo(f"{iso(at)}  {name}  {labels}  value={m.value:g}")
        if not json_out:
            typer.echo(f"{found} match(es) from {iso(t0)} to {iso(t1)} ({kind} store)")
    except (SentinelError, ValueError) as exc:
        code = 1 if isinstance(exc, DatasourceError) else 2
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code) from exc


def _rule_filters(rule: str, rules_dir: Path) -> tuple[list[LogFilter], float]:
    """A log rule's filters and timeframe, by its alert name."""
    from sentinel.rules.model import load_rules

    found = [r.log for g in load_rules(rules_dir) for r in g.group.rules if r.alert == rule and r.log is not None]
    if not found:
        raise typer.BadParameter(f"no log rule named {rule!r} in {rules_dir}", param_hint="--rule")
    return list(found[0].filter), found[0].timeframe


def _filters(where: list[str]) -> list[LogFilter]:
    """``--filter`` values: FIELD=VALUE (a term) or a filter as JSON."""
    import json as _json

    filters: list[LogFilter] = []
    for text in where:
        if text.lstrip().startswith("{"):
            filters.append(LogFilter.model_validate(_json.loads(text)))
        elif "=" in text:
            name, value = text.split("=", 1)
            filters.append(LogFilter(term={name.strip(): value}))
        else:
            raise typer.BadParameter(f"{text!r}: expected FIELD=VALUE or a JSON filter", param_hint="--filter")
    return filters


def _show_lines(docs: list[dict[str, Any]]) -> None:
    shown = ["@timestamp", "replica", "level", "request_id", "inference_time", "cuda_error", "message"]
    table = Table(title=f"{len(docs)} line(s), newest first", show_lines=False)
    for col in shown:
        table.add_column(col, overflow="fold")
    for d in docs:
        table.add_row(*("" if d.get(c) is None else str(d.get(c)) for c in shown))
    Console().print(table)


@logs_app.command("query")
def logs_query(
    rule: Annotated[str | None, typer.Option(help="a log rule's alert name: its filters (and timeframe)")] = None,
    where: Annotated[list[str] | None, typer.Option(
        "--filter", help="FIELD=VALUE, or a filter as JSON, e.g. '{\"range\": {\"inference_time\": {\"gt\": 500}}}'"
        " (repeatable; all must match)")] = None,
    query: Annotated[str | None, typer.Option(
        "--query", "-q", help="a Lucene query, as a rule's query_string, e.g. 'cuda_error:* AND NOT replica:r0'")
    ] = None,
    since: Annotated[str | None, typer.Option(help="how far back (e.g. 15m, 2h); default: the rule's timeframe, "
                                                   "else 15m")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10000)] = 50,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="settings YAML file")] = None,
    elasticsearch_url: Annotated[str | None, typer.Option(help="query this Elasticsearch")] = None,
    rules_dir: Annotated[Path | None, typer.Option(help="rule files directory")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
) -> None:
    """Newest first: the lines a rule matches (`--rule CudaError`), or any filter, from Elasticsearch when one
    is configured, else from the local store under the state directory."""
    import json as _json

    from pydantic import ValidationError

    from sentinel.durations import parse_duration
    from sentinel.logstore.elasticsearch import LogStoreUnavailable
    from sentinel.settings import load_settings

    try:
        s = load_settings(config, {"logs": {"elasticsearch_url": elasticsearch_url}} if elasticsearch_url else None)
        filters, window = _rule_filters(rule, rules_dir or s.rules_dir) if rule is not None else ([], 900.0)
        filters += _filters(where or [])
        if query is not None:
            filters.append(LogFilter(query_string=query))
        if since is not None:
            window = parse_duration(since)
    except (ValidationError, ValueError, SentinelError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    now = time.time()
    try:
        try:
            docs = logstore.open(s).search(filters, now - window, now, limit)
        except logstore.NoLogStore as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from exc
    except LogStoreUnavailable as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    if json_out:
        for d in docs:
            typer.echo(_json.dumps(d, sort_keys=True))
        return
    _show_lines(docs)
