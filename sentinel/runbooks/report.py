"""Reports: JSON for automation, Markdown and HTML (jinja2, autoescaped) for incident channels."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path

import jinja2

from sentinel.runbooks.runner import Report


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(report: Report, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(report.to_dict(), indent=2, default=str)
    if fmt not in ("md", "html"):
        raise ValueError(f"unknown report format {fmt!r} (json, md, html)")
    env = jinja2.Environment(autoescape=fmt == "html", undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    env.filters["md"] = _md
    src = resources.files("sentinel.runbooks").joinpath(f"templates/report.{fmt}.j2").read_text()
    started = datetime.fromtimestamp(report.started_at, UTC).isoformat(timespec="seconds")
    return env.from_string(src).render(r=report, started=started)


def write(report: Report, path: Path) -> None:
    fmt = {".md": "md", ".html": "html", ".htm": "html", ".json": "json"}.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: report file must end in .md, .html or .json")
    path.write_text(render(report, fmt))
