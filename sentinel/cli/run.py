"""Running sentinel: ``up``, ``diagnose``, ``plan`` and the ``chaos`` drills."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import httpx
import typer
from rich.table import Table

from sentinel.cli.base import app, console, err_console
from sentinel.errors import SentinelError


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _daemon_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("apscheduler", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # the Elasticsearch client logs every request, and every retry with a traceback; sentinel says once per
    # outage that the store is unreachable, and why
    logging.getLogger("elastic_transport").setLevel(logging.ERROR)


def _show_services(services: list[Any], json_out: bool) -> None:
    """What runs where: a table, or one JSON line."""
    if json_out:
        typer.echo(json.dumps({"services": [vars(x) for x in services]}))
        return
    table = Table(title="sentinel up: what runs where")
    for col in ("service", "url", "pid", "detail"):
        table.add_column(col)
    for x in services:
        table.add_row(x.name, x.url, str(x.pid or "-"), x.detail)
    console.print(table)
    console.print("Ctrl-C stops everything.", style="dim")


def _up_overrides(prometheus_url: str | None, elasticsearch_url: str | None, api_port: int | None,
                  replicas: int | None, model_dir: Path | None, enable_faults: bool, state_dir: Path | None,
                  rules_dir: Path | None, receiver: list[str] | None) -> dict[str, Any]:
    """The settings ``sentinel up``'s flags override."""
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
    return overrides


@app.command()
def up(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="settings YAML file")] = None,
    prometheus_url: Annotated[str | None, typer.Option(help="use an existing Prometheus")] = None,
    elasticsearch_url: Annotated[str | None, typer.Option(
        help="ship logs to this Elasticsearch and answer log rules from it (default: the local store)")] = None,
    api_port: Annotated[int | None, typer.Option(
        help="sentinel's API port (default: 9095, or the next free one)")] = None,
    replicas: Annotated[int | None, typer.Option(help="number of inference replicas")] = None,
    model_dir: Annotated[Path | None, typer.Option(help="model directory (default: bundled)")] = None,
    state_dir: Annotated[Path | None, typer.Option(help="where state, logs and children live")] = None,
    rules_dir: Annotated[Path | None, typer.Option(help="rule files directory")] = None,
    receiver: Annotated[list[str] | None, typer.Option(help="NAME=URL of an alert webhook (repeatable)")] = None,
    enable_faults: Annotated[bool, typer.Option(help="start replicas with the fault switch (drills)")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print what runs where as one JSON line, not a table")
                        ] = False,
) -> None:
    """Start replicas, Prometheus and the daemon; print what runs where; stop all on Ctrl-C."""
    from sentinel.daemon import Daemon
    from sentinel.settings import load_settings

    _daemon_logging()
    overrides = _up_overrides(prometheus_url, elasticsearch_url, api_port, replicas, model_dir, enable_faults,
                              state_dir, rules_dir, receiver)

    signal.signal(signal.SIGTERM, _raise_interrupt)
    daemon = None
    try:
        settings = load_settings(config, overrides)
        # progress on stderr while the replicas load (a spinner naming each replica's stage; nothing when stderr
        # is not a terminal): checking files, loading the weights, planning memory and allocating the KV cache
        with err_console.status("sentinel up: starting", spinner="dots") as shown:
            daemon = Daemon(settings, on_ready=lambda services: _show_services(services, json_out),
                            on_stage=lambda name, stage: shown.update(f"sentinel up: {name}: {stage}"))
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



def _show_plan(p: Any) -> None:
    """A capacity plan (``sentinel.plan.Plan``) as a summary line, a table of GPU options and notes."""
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
    _show_plan(p)



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
        # progress on stderr (a spinner with what is awaited; nothing when stderr is not a terminal)
        with err_console.status(f"{drill}: arming the fault", spinner="dots") as shown:
            if drill == "scale-out":
                result = run_scale_out(api, timeout_s=timeout)
            else:
                assert s.replicas.admin_token is not None
                result = run_drill(api, DRILLS[drill], s.replicas.admin_token.get_secret_value(), replica, timeout,
                                   reach_limit_s=reach_limit, on_phase=lambda phase: shown.update(f"{drill}: {phase}"))
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
