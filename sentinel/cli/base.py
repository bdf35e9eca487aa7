"""The ``sentinel`` command's root: the app, its consoles and the helpers its command groups share."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
import typer.core
from rich.console import Console

# the metavar an option's value shows in --help, by its Python type (click's habit: PATH, TEXT, ...); a flag
# takes no value and shows none (typer alone would print `<bool>`, as if it took one)
_METAVARS = {"str": "TEXT", "Path": "PATH", "int": "INTEGER", "float": "NUMBER", "list[str]": "TEXT",
             "list[Path]": "PATH"}


def _tidy(cmd: Any) -> None:
    make_help = cmd.get_help_option

    def help_option(ctx: Any) -> Any:
        opt = make_help(ctx)
        if opt is not None:
            opt.metavar = ""
        return opt

    cmd.get_help_option = help_option
    for param in cmd.params:
        if param.param_type_name == "argument" and not param.type_descriptor.is_choice:
            shown = _METAVARS.get(param.bare_type(), "VALUE") + ("..." if param.nargs != 1 else "")
            param.display_type_rich = lambda ctx, shown=shown: shown
        if param.param_type_name != "option" or param.metavar is not None:
            continue
        if getattr(param, "is_flag", False):
            param.metavar = ""
        elif not param.type_descriptor.is_choice:
            param.metavar = _METAVARS.get(param.bare_type(), "VALUE")
    for sub in getattr(cmd, "commands", {}).values():
        _tidy(sub)


class _Root(typer.core.TyperGroup):
    """The root command: before anything runs or prints help, every option's metavar is made plain."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        _tidy(self)
        return super().main(*args, **kwargs)


app = typer.Typer(help="sentinel: watch, page, diagnose and heal a local LLM inference service.", cls=_Root,
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

