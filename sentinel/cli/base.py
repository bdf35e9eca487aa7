"""The ``sentinel`` command's root: the app, its consoles and the helpers its command groups share."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

app = typer.Typer(help="sentinel: watch, page, diagnose and heal a local LLM inference service.",
                  no_args_is_help=True, add_completion=True)  # --install-completion / --show-completion
console = Console()
err_console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"sentinel {version('sentinel')}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="print the version and exit")] = False) -> None:
    """sentinel: watch, page, diagnose and heal a local LLM inference service."""



def _state_store(config: Path | None) -> Any:
    from sentinel.alerts.store import Store
    from sentinel.settings import load_settings

    db = load_settings(config).state_dir / "sentinel.db"
    if not db.exists():
        typer.echo(f"error: no state database at {db} (is state_dir right?)", err=True)
        raise typer.Exit(2)
    return Store(db)



def _write(out: Path, text: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    typer.echo(f"wrote {out}")

