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
