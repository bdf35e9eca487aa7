"""The inference service: replica health and readiness, latency and errors from Prometheus, recent
`cuda_error` log lines."""

from __future__ import annotations

import json
import time
from collections import deque

from pydantic import Field

from inference_core.client import ReplicaClient, ReplicaError
from sentinel.durations import parse_duration
from sentinel.errors import DatasourceError
from sentinel.prometheus import PromQLSource
from sentinel.runbooks.base import Context, Finding, Params, Status, check

P99 = 'histogram_quantile(0.99, sum by (le, replica) (rate(model_inference_latency_seconds_bucket[{w}])))'
ERRORS = ('sum by (replica) (rate(inference_requests_total{{status="error"}}[{w}])) / '
          'sum by (replica) (rate(inference_requests_total[{w}]))')


class ServiceParams(Params):
    latency_threshold_s: float = Field(0.5, gt=0, description="the seed: P99 < 500 ms")
    max_error_ratio: float = Field(0.01, ge=0, le=1)
    window: str = Field("5m", pattern=r"^\d+[smh]$")
    log_lines: int = Field(500, ge=1, le=100_000)
    timeout_s: float = Field(3.0, gt=0)


def _recent_cuda_errors(ctx: Context, n: int, window_s: float) -> tuple[list[dict[str, object]], str]:
    """The newest ``cuda_error`` lines (at most 10, oldest first) and where they came from: the log store
    (Elasticsearch or the local one) over the window, for the alert's replica when the alert names one, or
    else the tail of each replica's log file. The replica label is a term in a structured query, never
    part of a query string, a path or a command."""
    if ctx.logs is not None:
        from sentinel.rules.filters import LogFilter

        filters = [LogFilter(exists="cuda_error")]
        replica = ctx.alert_labels.get("replica")
        if replica:
            filters.append(LogFilter(term={"replica": replica}))
        now = time.time()
        try:
            docs = ctx.logs.search(filters, now - window_s, now, 10)
        except Exception as exc:  # the store down: the files still answer
            source = f"log files (the log store did not answer: {type(exc).__name__}: {str(exc)[:200]})"
        else:
            cited = [{k: d.get(k) for k in ("@timestamp", "replica", "cuda_error", "message", "request_id",
                                              "event.id") if d.get(k) is not None} for d in reversed(docs)]
            return cited, f"log store ({type(ctx.logs).__name__})"
    else:
        source = "log files"
    out: list[dict[str, object]] = []
    for path in ctx.replica_logs:
        try:
            with path.open() as fh:
                tail = deque(fh, maxlen=n)
        except OSError:
            continue
        for line in tail:
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if isinstance(doc, dict) and doc.get("cuda_error"):
                out.append({"file": str(path), "@timestamp": doc.get("@timestamp"), "cuda_error": doc["cuda_error"],
                            **({"request_id": doc["request_id"]} if doc.get("request_id") else {})})
    return out[-10:], source


@check("service", ServiceParams)
def service_check(p: ServiceParams, ctx: Context) -> Finding:
    """Each replica's /health and /ready, P99 latency and error ratio over the window, cuda_error lines."""
    if not ctx.replicas and ctx.prometheus_url is None and not ctx.replica_logs and ctx.logs is None:
        return Finding(Status.SKIPPED, "no running sentinel found (no up.json in the state directory)")
    fails: list[str] = []
    warns: list[str] = []
    replicas = []
    for name, url in ctx.replicas:
        entry: dict[str, object] = {"name": name, "url": url}
        client = ReplicaClient(url, timeout_s=p.timeout_s)
        problem: str | None = None
        try:  # the documents themselves are the evidence: a failed load or a CUDA error says so in its words
            health = client.health()
            entry["health"] = health.model_dump(exclude_unset=True)
            problem = health.problem
            entry["ready"] = client.ready().model_dump(exclude_unset=True)
        except ReplicaError as exc:
            problem = str(exc)
            entry.setdefault("health", f"no answer: {exc}")
        if problem is not None:
            fails.append(f"{name} unhealthy ({problem})")
        replicas.append(entry)
    ev: dict[str, object] = {"replicas": replicas}
    if ctx.prometheus_url is not None:
        src = PromQLSource(ctx.prometheus_url, p.timeout_s)
        now = time.time()
        try:
            p99 = {s.labels.get("replica", "?"): s.value for s in src.query(P99.format(w=p.window), now)}
            errs = {s.labels.get("replica", "?"): s.value for s in src.query(ERRORS.format(w=p.window), now)}
            ev.update(p99_latency_s=p99, error_ratio=errs)
            warns += [f"{r} P99 {v * 1000:.0f} ms > {p.latency_threshold_s * 1000:.0f} ms" for r, v in p99.items()
                      if v > p.latency_threshold_s]
            warns += [f"{r} error ratio {v:.1%}" for r, v in errs.items() if v > p.max_error_ratio]
        except DatasourceError as exc:
            ev["prometheus_error"] = str(exc)
            warns.append("Prometheus did not answer")
    cuda, source = _recent_cuda_errors(ctx, p.log_lines, parse_duration(p.window))
    ev["recent_cuda_errors"] = cuda
    ev["cuda_error_source"] = source
    if cuda:
        last = cuda[-1]
        fails.append(f"{len(cuda)} recent cuda_error log line(s) from the {source}, last: {last['cuda_error']} "
                     f"({last.get('replica') or last.get('file')}, {last.get('@timestamp')})")
    if fails:
        return Finding(Status.FAIL, "; ".join(fails + warns), ev,
                       "restart the affected replica (sentinel does this for CudaError) and run the cuda-error runbook")
    if not replicas:  # nothing was checked: never "0 replica(s) healthy" (a down service is not an ok one)
        return Finding(Status.SKIPPED, "no replica to check: no running `sentinel up` lists one (no up.json in the "
                       f"state directory); no cuda_error in the {source}" + (f"; {'; '.join(warns)}" if warns else ""),
                       ev)
    if warns:
        return Finding(Status.WARN, "; ".join(warns), ev, "see the inference-latency runbook: batch size, GPU load")
    return Finding(Status.OK, f"{len(replicas)} replica(s) healthy" + (", latency and errors within SLO"
                   if ctx.prometheus_url else ""), ev)
