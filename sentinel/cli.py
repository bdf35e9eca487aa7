"""The ``sentinel`` command: a thin face over the daemon and the rule tools."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

from sentinel import logstore
from sentinel.errors import FileFormatError, SentinelError
from sentinel.rules.model import load_rule_file

app = typer.Typer(help="sentinel: watch, page, diagnose and heal a local LLM inference service.",
                  no_args_is_help=True, add_completion=True)  # --install-completion / --show-completion
rules_app = typer.Typer(help="Validate, test and export rule files.", no_args_is_help=True)
app.add_typer(rules_app, name="rules")
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


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@app.command()
def up(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="settings YAML file")] = None,
    prometheus_url: Annotated[str | None, typer.Option(help="use an existing Prometheus")] = None,
    elasticsearch_url: Annotated[str | None, typer.Option(
        help="ship logs to this Elasticsearch and answer log rules from it (default: the local store)")] = None,
    api_port: Annotated[int | None, typer.Option(help="sentinel API port (default: free)")] = None,
    replicas: Annotated[int | None, typer.Option(help="number of inference replicas")] = None,
    model_dir: Annotated[Path | None, typer.Option(help="model directory (default: bundled)")] = None,
    state_dir: Annotated[Path | None, typer.Option(help="where state, logs and children live")] = None,
    rules_dir: Annotated[Path | None, typer.Option(help="rule files directory")] = None,
    receiver: Annotated[list[str] | None, typer.Option(help="NAME=URL of an alert webhook (repeatable)")] = None,
    enable_faults: Annotated[bool, typer.Option(help="start replicas with the fault switch (drills)")] = False,
) -> None:
    """Start replicas, Prometheus and the daemon; print what runs where; stop all on Ctrl-C."""
    from sentinel.daemon import Daemon, Service
    from sentinel.settings import load_settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("apscheduler", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # the Elasticsearch client logs every request, and every retry with a traceback; sentinel says once per
    # outage that the store is unreachable, and why
    logging.getLogger("elastic_transport").setLevel(logging.ERROR)
    overrides: dict[str, Any] = {}
    if prometheus_url:
        overrides.setdefault("prometheus", {})["url"] = prometheus_url
    if elasticsearch_url:
        overrides.setdefault("logs", {})["elasticsearch_url"] = elasticsearch_url
    if api_port is not None:
        overrides.setdefault("api", {})["port"] = api_port
    if replicas is not None:
        overrides.setdefault("replicas", {})["count"] = replicas
    if model_dir is not None:
        overrides.setdefault("replicas", {})["model_dir"] = model_dir
    if enable_faults:
        overrides.setdefault("replicas", {})["enable_faults"] = True
    if state_dir is not None:
        overrides["state_dir"] = state_dir
    if rules_dir is not None:
        overrides["rules_dir"] = rules_dir
    if receiver:
        rcvs = []
        for item in receiver:
            name, sep, url = item.partition("=")
            if not sep:
                raise typer.BadParameter(f"expected NAME=URL, got {item!r}", param_hint="--receiver")
            rcvs.append({"name": name, "url": url})
        overrides.setdefault("alerting", {})["receivers"] = rcvs

    def show(services: list[Service]) -> None:
        table = Table(title="sentinel up: what runs where")
        for col in ("service", "url", "pid", "detail"):
            table.add_column(col)
        for x in services:
            table.add_row(x.name, x.url, str(x.pid or "-"), x.detail)
        console.print(table)
        console.print("Ctrl-C stops everything.", style="dim")

    signal.signal(signal.SIGTERM, _raise_interrupt)
    daemon = None
    try:
        settings = load_settings(config, overrides)
        daemon = Daemon(settings, on_ready=show)
        daemon.start()
        daemon.serve()
    except KeyboardInterrupt:
        pass
    except SentinelError as exc:
        err_console.print("[bold red]sentinel up failed:[/]")
        typer.echo(str(exc), err=True)  # plain: file:line problems are never wrapped mid-line
        raise typer.Exit(2) from None
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if daemon is not None:
            if daemon.stop():
                err_console.print("sentinel: stopped every child", style="dim")
            else:  # a worker still blocked would hold the interpreter's exit: the children are dead already
                err_console.print("sentinel: the stop overran its deadline; every child was killed", style="dim")
                sys.stderr.flush()
                os._exit(1)


@app.command()
def diagnose(
    runbook: Annotated[str | None, typer.Argument(help="runbook name (see runbooks/)")] = None,
    all_: Annotated[bool, typer.Option("--all", help="every runbook (each check runs once)")] = False,
    alert: Annotated[str | None, typer.Option(help="an alert's fingerprint: run its rule's runbook")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
    report: Annotated[Path | None, typer.Option(help="also write the report (.md, .html or .json)")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="settings YAML file")] = None,
    state_dir: Annotated[Path | None, typer.Option(help="sentinel's state directory")] = None,
) -> None:
    """Run diagnostic runbooks; exit 0 ok, 1 warn, 2 fail."""
    from sentinel.runbooks.diagnose import DiagnoseError, diagnose_report, print_report
    from sentinel.runbooks.report import render, write
    from sentinel.settings import load_settings

    overrides: dict[str, Any] = {"state_dir": state_dir} if state_dir is not None else {}
    try:
        settings = load_settings(config, overrides)
        rep = diagnose_report(settings, runbook, all_, alert, console if not as_json else None)
    except (DiagnoseError, SentinelError) as exc:
        err_console.print(f"[bold red]sentinel diagnose:[/] {exc}")
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(render(rep, "json"))
    else:
        print_report(rep, console)
    if report is not None:
        try:
            write(rep, report)
        except (OSError, ValueError) as exc:
            err_console.print(f"[bold red]sentinel diagnose:[/] cannot write the report: {exc}")
            raise typer.Exit(2) from None
    raise typer.Exit(rep.exit_code)


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
    from sentinel.rules.unittest import run_promtool, run_test_file

    failed = False
    for f in files:
        typer.echo(f"Unit Testing: {f}")
        try:
            outcome = run_test_file(f)
        except (SentinelError, ValueError) as exc:
            typer.echo(f"  FAILED:\n{exc}", err=True)
            failed = True
            continue
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
    raise typer.Exit(1 if failed else 0)


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
    from sentinel.errors import SentinelError
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


def _write(out: Path, text: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    typer.echo(f"wrote {out}")


@deploy_app.command("openapi")
def deploy_openapi(
    out: Annotated[Path, typer.Option(help="folder to write them in")] = Path("deploy/openapi"),
) -> None:
    """Write the OpenAPI documents of sentinel's API and the model API (deploy/openapi/*.json)."""
    from sentinel.openapi_docs import write

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
    from sentinel.errors import SentinelError
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
    from sentinel.errors import SentinelError
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


@app.command("plan")
def plan_cmd(
    config: Annotated[Path | None, typer.Option("--model", "-m", help="a model directory or its config.json")] = None,
    params: Annotated[str | None, typer.Option("--params", help="a parameter count instead: 7B, 67B, 175B")] = None,
    dtype: Annotated[str, typer.Option(help="weights: bf16, fp16, fp32, or int8/int4 (weight-only)")] = "bf16",
    kv_dtype: Annotated[str, typer.Option(help="KV cache precision")] = "bf16",
    context: Annotated[int, typer.Option(min=1, help="tokens per sequence (prompt + output)")] = 4096,
    sequences: Annotated[int, typer.Option(min=1, help="sequences served at once")] = 16,
    prompt_tokens: Annotated[int, typer.Option(min=1, help="prompt prefilled within the TTFT target")] = 2048,
    ttft_ms: Annotated[float, typer.Option(min=1, help="prefill target (the seed: P99 < 500 ms)")] = 500.0,
    json_out: Annotated[bool, typer.Option("--json", help="one JSON document")] = False,
) -> None:
    """How many GPUs of each common type a model needs (memory and the latency target), the tensor-parallel
    degree and the interconnect (the seed's section 2)."""
    import json as _json

    from pydantic import ValidationError

    from sentinel.plan import BYTES, geometry_for, load_config, make_plan, parse_params

    if (config is None) == (params is None):
        raise typer.BadParameter("give --model (a config.json) or --params (a parameter count)", param_hint="--model")
    for name, value in (("--dtype", dtype), ("--kv-dtype", kv_dtype)):
        if value not in BYTES:
            raise typer.BadParameter(f"{value!r}: one of {', '.join(BYTES)}", param_hint=name)
    count: int | None = None
    try:
        if config is not None:
            cfg = load_config(config)
            label = str(config)
        else:
            assert params is not None
            count = int(parse_params(params))
            cfg, label = geometry_for(count), f"{params} parameters"
    except (OSError, ValueError, ValidationError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    p = make_plan(cfg, label, dtype=dtype, kv_dtype=kv_dtype, context=context, sequences=sequences,
                  prompt_tokens=prompt_tokens, ttft_target_s=ttft_ms / 1000, params=count)
    if json_out:
        typer.echo(_json.dumps(p.as_dict()))
        return
    gb = 1e9
    console.print(f"[bold]{p.model}[/]: {p.parameters / 1e9:.2f}B parameters in {p.dtype} = "
                  f"{p.weights_bytes / gb:.1f} GB; KV cache {p.kv_bytes_per_token / 1024:.0f} KiB/token x "
                  f"{p.context_tokens} tokens x {p.concurrent_sequences} sequences = {p.kv_cache_bytes / gb:.1f} GB; "
                  f"activations {p.activation_bytes / gb:.1f} GB; runtime {p.runtime_bytes / gb:.1f} GB per GPU")
    table = Table()
    for col in ("GPU", "GPUs", "TP", "per GPU", "prefill", "tok/s/seq", "link", "fits"):
        table.add_column(col)
    for o in p.options:
        star = " *" if p.recommended is o else ""
        link = "-" if o.gpus == 1 else ("NVLink" if "NVLink/NVSwitch" in o.interconnect else "PCIe") + (
            " + IB" if "InfiniBand" in o.interconnect else "")
        table.add_row(o.gpu + star, str(o.gpus), str(o.tensor_parallel),
                      f"{o.per_gpu_bytes / gb:.1f}/{o.gpu_memory_bytes / gb:.0f} GB", f"{o.prefill_ms:.0f} ms",
                      f"{o.decode_tokens_per_s:.0f}", link, "[green]yes[/]" if o.fits else f"[red]no[/]: {o.why_not}")
    console.print(table)
    if p.recommended is not None:
        r = p.recommended
        console.print(f"recommended (*): {r.gpus} x {r.gpu}, tensor parallel {r.tensor_parallel}; {r.interconnect}")
    else:
        console.print(f"[red]{p.interconnect}[/]")
    for n in p.notes:
        console.print(f"note: {n}")


@app.command("alerts")
def alerts_cmd(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="settings YAML file")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="one JSON document")] = False,
    all_states: Annotated[bool, typer.Option("--all", help="resolved alerts too (kept 15 minutes)")] = False,
) -> None:
    """The alerts sentinel holds (state, age, value) and each receiver's delivery status, from its state
    database: works whether or not sentinel is running."""
    import json as _json

    from rich.console import Console
    from rich.table import Table

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


def _state_store(config: Path | None) -> Any:
    from sentinel.alerts.store import Store
    from sentinel.settings import load_settings

    db = load_settings(config).state_dir / "sentinel.db"
    if not db.exists():
        typer.echo(f"error: no state database at {db} (is state_dir right?)", err=True)
        raise typer.Exit(2)
    return Store(db)


@app.command("chaos")
def chaos_cmd(
    drill: Annotated[str, typer.Argument(help="cuda-error | hang | crash | memory-leak | scale-out")],
    replica: Annotated[str | None, typer.Option(help="the replica to break (default: the first)")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="the settings `sentinel up` runs with")]
    = None,
    timeout: Annotated[float | None, typer.Option(
        help="seconds to wait for detection and recovery (default: 120; memory-leak: reach-limit + 60)")] = None,
    reach_limit: Annotated[float, typer.Option(
        help="memory-leak: leak at the rate that meets the replica's memory limit in this many seconds")] = 600.0,
    json_out: Annotated[bool, typer.Option("--json", help="one JSON document")] = False,
) -> None:
    """Run a drill against a running `sentinel up` (replicas.enable_faults and replicas.admin_token set):
    break one replica and report when sentinel detected it, when the replica served again, and the outcome."""
    import json as _json

    from sentinel.chaos import DRILLS, ChaosError, run_drill, run_scale_out
    from sentinel.settings import load_settings

    if drill not in (*DRILLS, "scale-out"):
        raise typer.BadParameter(f"unknown drill {drill!r}; drills: {', '.join([*DRILLS, 'scale-out'])}",
                                 param_hint="DRILL")
    s = load_settings(config)
    if s.replicas.admin_token is None and drill != "scale-out":
        typer.echo("error: drills need replicas.admin_token (the replicas' fault switch is behind it)", err=True)
        raise typer.Exit(2)
    up_file = s.state_dir / "up.json"
    if not up_file.exists():
        typer.echo(f"error: no {up_file}: is `sentinel up` running with these settings?", err=True)
        raise typer.Exit(2)
    api = _json.loads(up_file.read_text())["api"]
    if timeout is None:
        timeout = {"memory-leak": reach_limit + 60.0, "scale-out": 300.0}.get(drill, 120.0)
    if reach_limit <= 0:
        raise typer.BadParameter("must be positive", param_hint="--reach-limit")
    try:
        if drill == "scale-out":
            result = run_scale_out(api, timeout_s=timeout)
        else:
            assert s.replicas.admin_token is not None
            result = run_drill(api, DRILLS[drill], s.replicas.admin_token.get_secret_value(), replica, timeout,
                               reach_limit_s=reach_limit)
    except (ChaosError, httpx.HTTPError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    if json_out:
        typer.echo(_json.dumps(result.as_dict()))
    else:
        def fmt(v: float | None) -> str:
            return f"{v:.2f}s" if v is not None else f"not within {timeout:.0f}s"

        what = DRILLS[drill].what if drill in DRILLS else "load through the router until a replica is added"
        alert = DRILLS[drill].alert if drill in DRILLS else "a scale-out rule"
        typer.echo(f"{drill} on {result.replica}: {what}"
                   + (f" ({result.detail})" if result.detail else "") + f"\n  detected ({alert}): "
                   f"{fmt(result.detect_s)}\n  recovered (pid {result.old_pid} -> {result.new_pid}, serving): "
                   f"{fmt(result.recover_s)}\n  remediation outcome: {result.outcome or 'none recorded'}")
    if result.detect_s is None or result.recover_s is None:
        raise typer.Exit(1)


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

    from rich.console import Console
    from rich.table import Table

    store = _state_store(config)
    kinds = {"decision", "outcome", "escalation", "approval", "recovery"}
    entries = [e for e in store.audit_log(limit * 4) if e["kind"] in kinds][:limit]
    ladders = {k.removeprefix("ladder:"): v for k, v in store.items("ladder:").items()}
    approvals = sorted(store.items("approval:").values(), key=lambda d: d.get("requested_at", 0), reverse=True)
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

    from rich.console import Console
    from rich.table import Table

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


token_app = typer.Typer(help="Credentials for sentinel's API and the replicas' model API.", no_args_is_help=True)
app.add_typer(token_app, name="token")
SCOPES = ("read", "operate", "infer")


@token_app.command("issue")
def token_issue(
    scope: Annotated[list[str], typer.Option(help="read, operate (sentinel's API) or infer (the model API); "
                                                  "repeatable")],
    subject: Annotated[str, typer.Option(help="who the token is for (its 'sub'; rate limits count per subject)")],
    ttl: Annotated[str, typer.Option(help="lifetime (the seed: 15m)")] = "15m",
    audience: Annotated[str | None, typer.Option(help="its 'aud' (default: api.jwt_audience)")] = None,
    secret_env: Annotated[str | None, typer.Option(help="sign with the secret in this environment variable "
                                                        "(default: api.jwt_secret from the settings)")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="settings YAML file")] = None,
) -> None:
    """Print an HS256 token (JWT) for the given scopes, valid for --ttl."""
    import os

    from inference_core.security import issue_token
    from sentinel.durations import parse_duration
    from sentinel.settings import load_settings

    bad = [x for x in scope if x not in SCOPES]
    if bad:
        raise typer.BadParameter(f"unknown scope(s) {', '.join(bad)}; known: {', '.join(SCOPES)}", param_hint="--scope")
    s = load_settings(config)
    secret = os.environ.get(secret_env) if secret_env else (
        s.api.jwt_secret.get_secret_value() if s.api.jwt_secret else None)
    if not secret:
        typer.echo("error: no signing secret: set api.jwt_secret (SENTINEL_API__JWT_SECRET) or --secret-env", err=True)
        raise typer.Exit(2)
    seconds = parse_duration(ttl)
    if not 0 < seconds <= 86400:
        raise typer.BadParameter("between 1s and 24h", param_hint="--ttl")
    typer.echo(issue_token(secret, subject, scope, seconds, audience or s.api.jwt_audience, s.api.jwt_issuer))


@token_app.command("hash")
def token_hash(
    key: Annotated[str, typer.Option(prompt=True, hide_input=True, help="the API key (prompted; never echoed)")],
) -> None:
    """Print an API key's SHA-256, for api.api_key_hashes or the model API's --api-key-hash."""
    from inference_core.security import hash_key

    if len(key) < 16:
        raise typer.BadParameter("use 16 or more random characters", param_hint="--key")
    typer.echo(hash_key(key))


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
    from sentinel.errors import DatasourceError, SentinelError
    from sentinel.rules.logtest import evaluations, iso, parse_time
    from sentinel.rules.model import load_rule_file
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
    from rich.console import Console
    from rich.table import Table

    from sentinel.durations import parse_duration
    from sentinel.errors import SentinelError
    from sentinel.logstore.elasticsearch import LogStoreUnavailable
    from sentinel.rules.model import LogFilter, load_rules
    from sentinel.settings import load_settings

    try:
        s = load_settings(config, {"logs": {"elasticsearch_url": elasticsearch_url}} if elasticsearch_url else None)
        filters: list[LogFilter] = []
        window = 900.0
        if rule is not None:
            found = [r for g in load_rules(rules_dir or s.rules_dir) for r in g.group.rules
                     if r.alert == rule and r.log is not None]
            if not found:
                where_ = rules_dir or s.rules_dir
                raise typer.BadParameter(f"no log rule named {rule!r} in {where_}", param_hint="--rule")
            assert found[0].log is not None
            filters += found[0].log.filter
            window = found[0].log.timeframe
        for text in where or []:
            if text.lstrip().startswith("{"):
                filters.append(LogFilter.model_validate(_json.loads(text)))
            elif "=" in text:
                name, value = text.split("=", 1)
                filters.append(LogFilter(term={name.strip(): value}))
            else:
                raise typer.BadParameter(f"{text!r}: expected FIELD=VALUE or a JSON filter", param_hint="--filter")
        if query is not None:
            filters.append(LogFilter(query_string=query))
        if since is not None:
            window = parse_duration(since)
    except (ValidationError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    except SentinelError as exc:
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
    shown = ["@timestamp", "replica", "level", "request_id", "inference_time", "cuda_error", "message"]
    table = Table(title=f"{len(docs)} line(s), newest first", show_lines=False)
    for col in shown:
        table.add_column(col, overflow="fold")
    for d in docs:
        table.add_row(*("" if d.get(c) is None else str(d.get(c)) for c in shown))
    Console().print(table)


if __name__ == "__main__":  # after every command is defined
    app()
