"""Generated files: ``sentinel dashboards`` and ``sentinel deploy``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sentinel.cli.base import _write, app
from sentinel.errors import FileFormatError, SentinelError

dashboards_app = typer.Typer(help="Grafana dashboards generated from the rules.", no_args_is_help=True)
app.add_typer(dashboards_app, name="dashboards")


@dashboards_app.command("generate")
def dashboards_generate(
    rules_dir: Annotated[Path | None, typer.Option(help="the rules directory (default: the settings' rules_dir)")]
    = None,
    out: Annotated[Path, typer.Option(help="where the dashboards go")] = Path("dashboards"),
    provisioning: Annotated[Path, typer.Option(help="where Grafana's provisioning files go")] = Path("deploy/grafana"),
    config: Annotated[Path | None, typer.Option("--config", "-c", help="settings YAML file (datasource URLs)")]
    = None,
    logs: Annotated[bool, typer.Option("--logs/--no-logs", help="log panels over an Elasticsearch datasource")]
    = True,
) -> None:
    """Write the Grafana dashboards (overview; one panel per alerting rule) and Grafana's provisioning files
    (datasources, dashboard provider) from the rules and the settings."""
    from sentinel.generate.dashboards import render_all
    from sentinel.generate.grafana import render_provisioning
    from sentinel.rules.model import load_rules
    from sentinel.settings import load_settings

    try:
        settings = load_settings(config)
        groups = load_rules(rules_dir or settings.rules_dir)
    except FileFormatError as exc:
        for line in exc.problems:
            typer.echo(line, err=True)
        raise typer.Exit(1) from None
    except SentinelError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    for name, text in render_all(groups, logs).items():
        _write(out / name, text)
    for name, text in render_provisioning(settings, logs).items():
        _write(provisioning / name, text)



deploy_app = typer.Typer(help="Deployment files generated from sentinel's own sources.", no_args_is_help=True)
app.add_typer(deploy_app, name="deploy")


@deploy_app.command("settings")
def deploy_settings(
    out: Annotated[Path, typer.Option(help="where to write it")] = Path("deploy/sentinel.yaml"),
) -> None:
    """Write deploy/sentinel.yaml: every setting with its default and a comment."""
    from sentinel.generate.settings_example import render

    _write(out, render())


@deploy_app.command("openapi")
def deploy_openapi(
    out: Annotated[Path, typer.Option(help="folder to write them in")] = Path("deploy/openapi"),
) -> None:
    """Write the OpenAPI documents of sentinel's API and the model API (deploy/openapi/*.json)."""
    from sentinel.openapi_docs import write

    for path in write(out):
        typer.echo(f"wrote {path}")


@deploy_app.command("docs")
def deploy_docs(
    out: Annotated[Path, typer.Option(help="the documentation site's folder")] = Path("docs"),
) -> None:
    """Write the site's reference pages (docs/reference/): settings, CLI, HTTP APIs and metrics, from the code."""
    from sentinel.cli.reference_docs import write

    for path in write(out):
        typer.echo(f"wrote {path}")


@deploy_app.command("filebeat")
def deploy_filebeat(
    out: Annotated[Path, typer.Option(help="where to write it")] = Path("deploy/filebeat.yml"),
) -> None:
    """Write deploy/filebeat.yml: the seed's Filebeat input with sentinel's redaction as processors."""
    from sentinel.generate.filebeat import render

    _write(out, render())


@deploy_app.command("monitoring")
def deploy_monitoring(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="settings YAML file (default: the "
                                                "defaults plus an example on-call receiver)")] = None,
    out: Annotated[Path, typer.Option(help="the deploy folder")] = Path("deploy"),
) -> None:
    """Write prometheus/prometheus.yml and alertmanager/alertmanager.yml (scrape jobs, rule files, routing,
    receivers and inhibition from sentinel's settings and rules), for a Prometheus and Alertmanager of your
    own."""
    from sentinel.generate.monitoring import example_settings, render_alertmanager, render_prometheus
    from sentinel.settings import load_settings

    try:
        s = load_settings(config) if config is not None else example_settings()
    except SentinelError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    _write(out / "prometheus" / "prometheus.yml", render_prometheus(s))
    _write(out / "alertmanager" / "alertmanager.yml", render_alertmanager(s))


@deploy_app.command("kubernetes")
def deploy_kubernetes(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="settings YAML file")] = None,
    out: Annotated[Path, typer.Option(help="the folder to write them in")] = Path("deploy/kubernetes"),
) -> None:
    """Write deploy/kubernetes/inference.yaml (the replicas' Deployment with the seed's resources and probes,
    Service, PodDisruptionBudget, autoscaler, ServiceMonitor, PrometheusRule) and sentinel.yaml (two sentinels
    with Lease leader election, their RBAC, settings, rules and runbooks)."""
    from sentinel.generate.kubernetes import render, render_sentinel
    from sentinel.settings import load_settings

    try:
        s = load_settings(config)
        inference = render(s, s.rules_dir)
        own = render_sentinel(s, s.rules_dir, s.runbooks_dir)
    except SentinelError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    _write(out / "inference.yaml", inference)
    _write(out / "sentinel.yaml", own)
