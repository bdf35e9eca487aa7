"""The checked-in OpenAPI documents are what the apps serve, and the CLI's own small promises."""

from __future__ import annotations

import json
from importlib.metadata import version
from typing import Any

from typer.testing import CliRunner

from sentinel.cli import app
from sentinel.openapi_docs import inference_spec, render, sentinel_spec
from tests.conftest import ROOT


def skeleton(spec: dict[str, Any]) -> dict[str, Any]:
    """Routes, methods, parameters and request-body models: what a client relies on (FastAPI's cosmetic
    changes between versions do not count)."""
    out: dict[str, Any] = {}
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            body = (op.get("requestBody") or {}).get("content", {}).get("application/json", {}).get("schema", {})
            out[f"{method.upper()} {path}"] = (sorted(p["name"] for p in op.get("parameters", [])),
                                               body.get("$ref", "").rsplit("/", 1)[-1])
    return out


def test_openapi_documents_are_in_step() -> None:
    for name, spec in (("sentinel.json", sentinel_spec()), ("inference.json", inference_spec())):
        path = ROOT / "deploy" / "openapi" / name
        assert skeleton(json.loads(path.read_text())) == skeleton(json.loads(render(spec))), (
            f"{path} is stale: run `sentinel deploy openapi`")
    paths = json.loads((ROOT / "deploy" / "openapi" / "sentinel.json").read_text())["paths"]
    assert {"/api/v1/silences", "/api/v1/alerts", "/api/v1/alertmanager/webhook"} <= set(paths)
    assert "/v1/completions" in json.loads((ROOT / "deploy" / "openapi" / "inference.json").read_text())["paths"]


def test_version_and_completion() -> None:
    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"sentinel {version('sentinel')}"
    assert "--install-completion" in CliRunner().invoke(app, ["--help"]).output


def test_the_example_settings_file_is_in_step_and_means_the_defaults() -> None:
    from sentinel.generate.settings_example import render as render_settings
    from sentinel.settings import Settings, load_settings

    path = ROOT / "deploy" / "sentinel.yaml"
    assert path.read_text() == render_settings(), "deploy/sentinel.yaml is stale: run `sentinel deploy settings`"
    assert load_settings(path) == Settings()  # every line is accepted, and each value is the default
    text = path.read_text()
    for section in ("api", "prometheus", "replicas", "alerting", "remediation", "logs", "diagnostics"):
        assert f"\n{section}:\n" in text


def test_help_at_80_columns_shows_plain_metavars_and_whole_option_names() -> None:
    """Every command's --help in an 80-column terminal: no typer-style `<bool>`/`<str>` metavars (a flag takes
    no value and shows none) and no option name cut off with an ellipsis."""
    import re

    import typer
    from typer.testing import CliRunner

    from sentinel.cli import app
    from sentinel.cli.reference_docs import _commands

    runner = CliRunner()
    problems = []
    for path, _ in _commands(typer.main.get_command(app), ["sentinel"]):
        r = runner.invoke(app, [*path[1:], "--help"], env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"},
                          terminal_width=80)
        assert r.exit_code == 0, (path, r.output)
        for line in r.output.splitlines():
            if re.search(r"<(bool|str|int|float|path|Path|list\[[^\]]*\])>", line) or (
                    re.search(r"--[\w-]*…", line)):
                problems.append(f"{' '.join(path)}: {line.strip()}")
    assert problems == []


def test_every_command_that_prints_a_table_takes_json() -> None:
    """A command whose output is a table (rich's, in its own body or a helper of its module) also answers
    --json, for scripts."""
    import inspect
    import re

    import typer

    from sentinel.cli import app
    from sentinel.cli.reference_docs import _commands

    missing = []
    for path, cmd in _commands(typer.main.get_command(app), ["sentinel"]):
        fn = getattr(cmd, "callback", None)
        if fn is None or hasattr(cmd, "commands"):
            continue
        body = inspect.getsource(fn)
        module = inspect.getsource(inspect.getmodule(fn))  # type: ignore[arg-type]
        helpers = [name for name in re.findall(r"\b(_\w+)\(", body)
                   if re.search(rf"def {name}\(.*?(?=\ndef |\Z)", module, re.S) and "Table(" in
                   re.search(rf"def {name}\(.*?(?=\ndef |\Z)", module, re.S).group(0)]  # type: ignore[union-attr]
        prints_table = "Table(" in body or helpers or "print_report(" in body
        if prints_table and not any("--json" in p.opts for p in cmd.params if p.param_type_name == "option"):
            missing.append(" ".join(path))
    assert missing == []
