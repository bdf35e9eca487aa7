"""``sentinel rules``: check, test and export rule files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sentinel.cli.base import app, err_console
from sentinel.errors import FileFormatError, SentinelError
from sentinel.rules.model import load_rule_file

rules_app = typer.Typer(help="Validate, test and export rule files.", no_args_is_help=True)
app.add_typer(rules_app, name="rules")


@rules_app.command("check")
def rules_check(
    files: Annotated[list[Path], typer.Argument(help="rule files")],
    promtool: Annotated[str, typer.Option(help="promtool binary for the PromQL parse")] = "promtool",
    runbooks_dir: Annotated[Path | None, typer.Option(help="runbooks a rule may name (default: the settings' "
                                                           "runbooks_dir)")] = None,
    lint_fatal: Annotated[bool, typer.Option("--lint-fatal", help="exit 3 on lint problems (as promtool)")] = False,
) -> None:
    """Validate rule files: schema, templates, duplicates, runbook names, PromQL (through promtool).

    Errors print as file:line: field: problem. As promtool: exit 0 ok (lint problems are printed and,
    with --lint-fatal, exit 3), 1 error.
    """
    from sentinel.errors import FileFormatError
    from sentinel.rules.check import check_file
    from sentinel.runbooks.model import load_runbooks
    from sentinel.settings import load_settings

    folder = runbooks_dir or load_settings(None).runbooks_dir
    books: list[str] | None = None
    if folder.is_dir():
        try:
            books = list(load_runbooks(folder))
        except FileFormatError as exc:
            for line in exc.problems:
                typer.echo(f"{line} (runbook names not checked)", err=True)
    else:
        typer.echo(f"note: no runbooks directory at {folder}; sentinel.runbook names are not checked "
                   "(--runbooks-dir)", err=True)
    worst = 0
    for f in files:
        errors, lints, n = check_file(f, promtool, books)
        for line in errors:
            typer.echo(line, err=True)  # plain: one problem a line, never wrapped
        for line in lints:
            typer.echo(f"{line} (lint)", err=True)
        if errors:
            worst = 1
        elif lints:
            if lint_fatal and worst == 0:
                worst = 3
            typer.echo(f"{f}: FAILED (lint): {n} rules found, {len(lints)} lint problem(s)")
        else:
            typer.echo(f"{f}: SUCCESS: {n} rules found")
    raise typer.Exit(worst)


@rules_app.command("test")
def rules_test(
    files: Annotated[list[Path], typer.Argument(help="test files in promtool's format")],
    also_promtool: Annotated[bool, typer.Option("--promtool", help="also run promtool on the exported rules")] = False,
) -> None:
    """Run rule unit tests through sentinel's state machine (PromQL answered by a temporary Prometheus)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    failed = False
    # progress on stderr (each file starts a Prometheus for its PromQL): a bar in a terminal, nothing otherwise
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=err_console, transient=True)
    with progress:
        task = progress.add_task("rule unit tests", total=len(files))
        for f in files:
            failed |= _test_one(f, also_promtool)
            progress.advance(task)
    raise typer.Exit(1 if failed else 0)


def _test_one(f: Path, also_promtool: bool) -> bool:
    """One test file, as promtool prints it; True when it failed."""
    from sentinel.rules.unittest import run_promtool, run_test_file

    failed = False
    typer.echo(f"Unit Testing: {f}")
    try:
        outcome = run_test_file(f)
    except (SentinelError, ValueError) as exc:
        typer.echo(f"  FAILED:\n{exc}", err=True)
        return True
    if outcome.ok:
        typer.echo("  SUCCESS")
    else:
        failed = True
        typer.echo("  FAILED:")
        for line in outcome.failures:
            typer.echo(f"    {line}")
    if also_promtool:
        ok, text = run_promtool(f)
        typer.echo(f"  promtool on the exported rules: {'SUCCESS' if ok else 'FAILED'}")
        if not ok:
            failed = True
            typer.echo(text)
    return failed


@rules_app.command("export")
def rules_export(
    files: Annotated[list[Path] | None, typer.Argument(help="rule files (default: the rules directory)")] = None,
    fmt: Annotated[str, typer.Option("--format", help="export format")] = "prometheus",
    out: Annotated[Path, typer.Option(help="output directory")] = Path("deploy/prometheus/rules"),
    rules_dir: Annotated[Path, typer.Option(help="the rules directory")] = Path("rules"),
) -> None:
    """Write Prometheus rule files (log rules and sentinel: blocks stripped) that promtool accepts."""
    from sentinel.rules.export import export_files
    from sentinel.rules.model import rule_files

    if fmt != "prometheus":
        raise typer.BadParameter(f"unknown format {fmt!r} (supported: prometheus)", param_hint="--format")
    paths = files or rule_files(rules_dir)
    try:
        by_file = {p: load_rule_file(p) for p in paths}
    except FileFormatError as exc:
        for line in exc.problems:
            typer.echo(line, err=True)
        raise typer.Exit(1) from None
    for path in export_files(by_file, out):
        typer.echo(f"wrote {path}")
