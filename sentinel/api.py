"""sentinel's HTTP API: health, metrics, and Prometheus-shaped views of rules and alerts.

Read-only endpoints answer without auth; every mutating endpoint needs the API bearer token.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, SecretStr, StringConstraints, field_validator

from inference_core.apidoc import AllowHeader, document
from inference_core.security import Authenticator, AuthError, RateLimiter, hash_key
from sentinel.alerts.notification import rfc3339
from sentinel.alerts.silences import MATCHER_PATTERN, parse_matcher
from sentinel.alerts.state import Alert, State
from sentinel.alerts.store import Store
from sentinel.inbound import Timestamp, WebhookPayload
from sentinel.remediation.policy import Guardrails
from sentinel.rules.evaluator import Evaluator, RuleRuntime
from sentinel.rules.model import Rule
from sentinel.statuspage import owns, status_routes


class SilenceIn(BaseModel):
    """A silence as Alertmanager's API takes it (matchers in its text form)."""

    model_config = ConfigDict(extra="forbid")
    matchers: list[Annotated[str, StringConstraints(pattern=MATCHER_PATTERN, max_length=1000)]] = Field(
        min_length=1, max_length=64)
    startsAt: Timestamp | None = None  # noqa: N815 - Alertmanager's field names
    endsAt: Timestamp  # noqa: N815
    createdBy: str = Field(min_length=1, max_length=200)  # noqa: N815
    comment: str = Field(min_length=1, max_length=2000)

    @field_validator("matchers")
    @classmethod
    def _matchers(cls, v: list[str]) -> list[str]:
        return [str(parse_matcher(m)) for m in v]


def authenticator(token: SecretStr | None, api: Any = None) -> Authenticator:
    """The API's credentials: the static ``api.token`` (an API key with every scope, kept only as a hash),
    hashed API keys, and JWTs (``api.jwt_*``); see ``inference_core.security.Authenticator``."""
    hashes = [hash_key(token.get_secret_value())] if token is not None else []
    if api is None:
        return Authenticator(hashes)
    secret = api.jwt_secret.get_secret_value() if api.jwt_secret is not None else None
    return Authenticator.from_files([*hashes, *api.api_key_hashes], secret, api.jwt_public_key, api.jwt_jwks,
                                    api.jwt_audience, api.jwt_issuer)


class Controls(Protocol):
    """What the API asks of the running daemon, as one object (``sentinel.daemon.Daemon`` is one)."""

    def status(self) -> dict[str, Any]: ...

    def guardrails(self) -> Guardrails: ...

    def set_paused(self, paused: bool) -> None: ...

    def reload_rules(self) -> list[str]:
        """Load rules and runbooks again; the problems (none: the new set is in)."""
        ...

    def inbound(self, payload: WebhookPayload) -> dict[str, Any]:
        """Alertmanager's webhook in; raise ``NotWired`` where this process takes none."""
        ...

    def on_serving(self) -> None:
        """The API is serving."""
        ...


class NotWired(RuntimeError):
    """This process has no such control (the inbound webhook in a process that evaluates nothing)."""


@dataclass
class FixedControls:
    """Controls with fixed answers: for the OpenAPI document, tests, and a process that runs no daemon."""

    status_doc: dict[str, Any] = field(default_factory=dict)
    paused: list[bool] = field(default_factory=list)  # every set_paused, in order
    problems: list[str] = field(default_factory=list)
    on_inbound: Callable[[WebhookPayload], dict[str, Any]] | None = None

    def status(self) -> dict[str, Any]:
        return self.status_doc

    def guardrails(self) -> Guardrails:
        return Guardrails()

    def set_paused(self, paused: bool) -> None:
        self.paused.append(paused)

    def reload_rules(self) -> list[str]:
        return list(self.problems)

    def inbound(self, payload: WebhookPayload) -> dict[str, Any]:
        if self.on_inbound is None:
            raise NotWired("inbound alerts are not wired in this process")
        return self.on_inbound(payload)

    def on_serving(self) -> None:
        pass


def create_app(evaluator: Evaluator, store: Store, registry: CollectorRegistry, controls: Controls,
               auth: Authenticator, limiter: RateLimiter | None = None, protect_reads: bool = False,
               secure_cookie: bool = False) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        controls.on_serving()
        yield

    app = FastAPI(title="sentinel", version="0.1.0", lifespan=lifespan)
    app.middleware("http")(Gate(auth, limiter, protect_reads))
    app.include_router(read_routes(evaluator, store, registry, controls))
    app.include_router(write_routes(store, controls))
    app.include_router(status_routes(evaluator, store, controls.status, auth, protect_reads, secure_cookie))

    def scope_of(method: str, path: str) -> list[dict[str, list[str]]] | None:
        if method not in ("GET", "HEAD", "OPTIONS"):
            return [{"bearer": ["operate"]}]
        if path.startswith("/api/"):
            return [{"bearer": ["read"]}] if protect_reads else [{}, {"bearer": ["read"]}]
        return None

    document(app, scope_of, media={("GET", "/metrics"): ["text/plain"]},
             description="sentinel's API: alerts, rules, silences, remediation, the Alertmanager webhook")
    app.add_middleware(AllowHeader, routes_of=lambda: app.routes)
    return app


class Gate:
    """Every mutating request is authenticated (scope ``operate``) before its body is read or validated: a
    stranger learns nothing about the schema (401, not 422), and a malformed body costs nothing. Reads
    under /api/ need the ``read`` scope when ``protect_reads`` is on. Then the client's rate."""

    def __init__(self, auth: Authenticator, limiter: RateLimiter | None, protect_reads: bool) -> None:
        self.auth, self.limiter, self.protect_reads = auth, limiter, protect_reads

    async def __call__(self, request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        auth, limiter = self.auth, self.limiter
        path, mutating = request.url.path, request.method not in ("GET", "HEAD", "OPTIONS")
        who = f"addr:{request.client.host if request.client else '?'}"
        if owns(path):  # the status page's forms sign in by cookie and carry a CSRF token: checked there
            mutating = False
        if mutating or (self.protect_reads and path.startswith("/api/")):
            if mutating and not auth.enabled:
                return JSONResponse({"status": "error", "error": "mutating endpoints are disabled: set api.token "
                                     "(SENTINEL_API__TOKEN) or api.jwt_*"}, status_code=403)
            try:
                who = auth.authenticate(request.headers.get("authorization"), "operate" if mutating else "read")
            except AuthError as exc:
                return JSONResponse({"status": "error", "error": str(exc)}, status_code=exc.status,
                                    headers={"WWW-Authenticate": "Bearer"} if exc.status == 401 else None)
        if limiter is not None and (path.startswith("/api/") or owns(path)):
            wait = limiter.take(who)
            if wait > 0:
                return JSONResponse({"status": "error", "error": f"rate limit exceeded; retry in {wait:.1f}s"},
                                    status_code=429, headers={"Retry-After": str(max(1, math.ceil(wait)))})
        return await call_next(request)


def read_routes(evaluator: Evaluator, store: Store, registry: CollectorRegistry, controls: Controls) -> APIRouter:
    """Health, metrics, and Prometheus-shaped views of rules and alerts; the audit log; silences."""
    router = APIRouter()

    @router.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @router.get("/api/v1/status")
    def get_status() -> dict[str, Any]:
        return {"status": "success", "data": controls.status()}

    @router.get("/api/v1/alerts")
    def alerts() -> dict[str, Any]:
        return {"status": "success", "data": {"alerts": _alerts_json(evaluator, store)}}

    @router.get("/api/v1/rules")
    def rules() -> dict[str, Any]:
        groups: dict[str, dict[str, Any]] = {}
        for rt, active in evaluator.view():
            g = rt.group
            group = groups.setdefault(g.key, {"name": g.group.name, "file": g.file, "interval": evaluator.interval(g),
                                              "rules": []})
            group["rules"].append(_rule_json(rt, active))
        return {"status": "success", "data": {"groups": list(groups.values())}}

    @router.get("/api/v1/actions")
    def actions(limit: int = 100) -> dict[str, Any]:
        return {"status": "success", "data": {"audit": store.audit_log(min(max(limit, 1), 1000)),
                                              "guardrails": vars(controls.guardrails())}}

    @router.get("/api/v1/silences")
    def list_silences() -> dict[str, Any]:
        return {"status": "success", "data": {"silences": store.silences()}}

    return router


def write_routes(store: Store, controls: Controls) -> APIRouter:
    """The mutating endpoints (scope ``operate``): the inbound webhook, rule reload, silences, the pause."""
    router = APIRouter()

    @router.post("/api/v1/alertmanager/webhook")
    def alertmanager_webhook(payload: WebhookPayload) -> dict[str, Any]:
        """Alertmanager's webhook in: firing alerts named like a sentinel rule get its runbook and remedy."""
        try:
            return {"status": "success", "data": controls.inbound(payload)}
        except NotWired as exc:
            raise HTTPException(503, str(exc)) from exc

    @router.post("/api/v1/rules/reload")
    def reload_rules() -> JSONResponse:
        problems = controls.reload_rules()
        if problems:
            return JSONResponse({"status": "error", "errorType": "bad_data", "error": "\n".join(problems)},
                                status_code=400)
        return JSONResponse({"status": "success", "data": {}})

    @router.post("/api/v1/silences")
    def add_silence(body: SilenceIn) -> dict[str, Any]:
        now = time.time()
        starts = body.startsAt.timestamp() if body.startsAt else now
        if body.endsAt.timestamp() <= max(starts, now):
            raise HTTPException(400, "endsAt must be in the future and after startsAt")
        sid = store.add_silence(body.matchers, starts, body.endsAt.timestamp(), body.createdBy, body.comment, now)
        store.audit(now, "silence", sid, matchers=body.matchers, by=body.createdBy, comment=body.comment)
        return {"status": "success", "data": {"silenceID": sid}}

    @router.delete("/api/v1/silence/{sid}")
    def expire_silence(sid: str) -> dict[str, Any]:
        if not store.expire_silence(sid, time.time()):
            raise HTTPException(404, f"no active silence {sid}")
        store.audit(time.time(), "silence-expired", sid)
        return {"status": "success", "data": {"silenceID": sid}}

    @router.post("/api/v1/remediation/pause")
    def pause() -> dict[str, Any]:
        controls.set_paused(True)
        return {"status": "success", "data": {"paused": True}}

    @router.post("/api/v1/remediation/resume")
    def resume() -> dict[str, Any]:
        controls.set_paused(False)
        return {"status": "success", "data": {"paused": False}}

    return router


def _alerts_json(evaluator: Evaluator, store: Store) -> list[dict[str, Any]]:
    out = []
    for rt, active in evaluator.view(include_meta=True):
        for a in active:
            if a.state == State.INACTIVE:
                continue
            item = {"labels": a.labels, "annotations": a.annotations, "state": a.state.value,
                    "activeAt": rfc3339(a.active_at), "value": f"{a.value:g}", "fingerprint": a.fingerprint}
            found = store.findings(rt.key, a.fingerprint, a.active_at)
            if found is not None:  # the runbook's result for this episode (the full report stays in the store)
                item["findings"] = {k: v for k, v in found.items() if k != "report"}
            out.append(item)
    return out


def _query_text(rule: Rule) -> str:
    if rule.log is not None:
        return "log: " + rule.log.model_dump_json()
    return rule.expr or ""


def _rule_json(rt: RuleRuntime, active: list[Alert]) -> dict[str, Any]:
    """One rule as Prometheus's ``/api/v1/rules`` shows it (recording rules without alert fields)."""
    common = {"name": rt.rule.name, "query": _query_text(rt.rule), "labels": rt.rule.labels, "health": rt.health,
              "lastError": rt.last_error or "", "evaluationTime": rt.last_duration,
              "lastEvaluation": rfc3339(rt.last_eval)}
    if rt.rule.record is not None:
        return {"type": "recording", **common}
    return {"type": "alerting", **common, "duration": rt.rule.for_, "keepFiringFor": rt.rule.keep_firing_for,
            "annotations": rt.rule.annotations, "state": _rule_state(active),
            "alerts": [{"labels": a.labels, "state": a.state.value, "activeAt": rfc3339(a.active_at),
                        "value": f"{a.value:g}"} for a in active if a.state != State.INACTIVE]}


def _rule_state(alerts: Any) -> str:
    states = {a.state for a in alerts}
    if State.FIRING in states:
        return "firing"
    if State.PENDING in states:
        return "pending"
    return "inactive"
