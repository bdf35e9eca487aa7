"""sentinel's status page at ``/`` of its API, as Alertmanager and Prometheus answer there with a page: what
runs where, the firing and pending alerts with their runbook findings, each receiver's queue, silences (list,
add, expire) and the remediation log with approve and reject for the actions that wait for a human.

Server-rendered with jinja2 (``sentinel/templates/status.html.j2``): no build step, no script, no CDN; every
button is a form. Reads follow the API's rule (the ``read`` scope where ``api.protect_reads`` is on); every
button needs ``operate``. Browsers sign in with a token (``/login``): the session is a random id in an
HttpOnly, SameSite=Strict cookie (Secure over TLS), kept in memory for 8 hours (a restart signs everyone out),
and each form carries the session's CSRF token, checked on every post. A bearer header works too (curl).
The Gate middleware lets these paths through; their auth is here.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from inference_core.security import Authenticator, AuthError
from sentinel.alerts.notification import rfc3339
from sentinel.alerts.silences import parse_matcher
from sentinel.alerts.state import State
from sentinel.alerts.store import Store
from sentinel.durations import parse_duration
from sentinel.rules.evaluator import Evaluator

PATHS = ("/", "/login", "/logout", "/ui/")  # the page's own auth (the Gate lets them through)
COOKIE = "sentinel_session"
DISABLED = "signing in and buttons are disabled: no credentials are configured (set api.token, api.api_key_hashes " \
    "or api.jwt_*, as for the API's mutating endpoints)"
SESSION_S = 8 * 3600.0
KINDS = ("decision", "outcome", "escalation", "approval", "recovery", "verification", "silence", "silence-expired")
_TEMPLATES = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
                                autoescape=True, trim_blocks=True, lstrip_blocks=True)


def owns(path: str) -> bool:
    return path in PATHS[:3] or path.startswith(PATHS[3])


@dataclass
class Session:
    who: str
    scopes: frozenset[str]
    csrf: str
    expires: float


class Sessions:
    """Signed-in browsers: a random id to the token they signed in with and the CSRF token their forms carry.
    The token is checked again on every request, so a JWT's expiry or a removed key ends the session too."""

    def __init__(self, auth: Authenticator, clock: Any = time.time) -> None:
        self.auth, self.clock = auth, clock
        self._by_id: dict[str, tuple[str, str, float]] = {}  # id -> (token, csrf, expires)
        self._lock = threading.Lock()

    def _check(self, header: str, csrf: str, expires: float) -> Session:
        who = self.auth.authenticate(header, "read")
        scopes = {"read"}
        try:
            self.auth.authenticate(header, "operate")
            scopes.add("operate")
        except AuthError:
            pass
        return Session(who, frozenset(scopes), csrf, expires)

    def sign_in(self, token: str) -> tuple[str, Session]:
        """A new session for ``token``; raises AuthError when it opens nothing."""
        session = self._check(f"Bearer {token}", secrets.token_urlsafe(32), self.clock() + SESSION_S)
        sid = secrets.token_urlsafe(32)
        with self._lock:
            now = self.clock()
            self._by_id = {k: v for k, v in self._by_id.items() if v[2] > now}
            self._by_id[sid] = (token, session.csrf, session.expires)
        return sid, session

    def get(self, sid: str | None) -> Session | None:
        with self._lock:
            found = self._by_id.get(sid or "")
        if found is None or found[2] <= self.clock():
            return None
        try:
            return self._check(f"Bearer {found[0]}", found[1], found[2])
        except AuthError:
            self.drop(sid)
            return None

    def drop(self, sid: str | None) -> None:
        with self._lock:
            self._by_id.pop(sid or "", None)

    def caller(self, request: Request) -> Session | None:
        """The session of the request's cookie, or one for its bearer header (not kept; no forms)."""
        s = self.get(request.cookies.get(COOKIE))
        if s is not None:
            return s
        header = request.headers.get("authorization")
        if not header:
            return None
        try:
            return self._check(header, "", self.clock())
        except AuthError:
            return None


def _age(now: float, ts: float | None) -> str:
    if not ts:
        return "-"
    s = max(0.0, now - ts)
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.0f}m" if s < 7200 else f"{s / 3600:.1f}h"


def page_data(evaluator: Evaluator, store: Store, status: dict[str, Any], now: float) -> dict[str, Any]:
    """What the page shows, read once per request."""
    alerts: list[dict[str, Any]] = []
    for rt, active in evaluator.view(include_meta=True):
        for a in active:
            if a.state == State.INACTIVE:
                continue
            found = store.findings(rt.key, a.fingerprint, a.active_at)
            alerts.append({"name": rt.rule.name, "state": a.state.value, "labels": a.labels,
                           "summary": a.annotations.get("summary", ""), "since": _age(now, a.active_at),
                           "active_at": a.active_at, "value": f"{a.value:g}", "fingerprint": a.fingerprint,
                           "findings": None if found is None else {k: v for k, v in found.items() if k != "report"}})
    alerts.sort(key=lambda x: (x["state"] != "firing", -float(x["active_at"])))
    receivers = store.receiver_status()
    entries = [e for e in store.audit_log(400) if e["kind"] in KINDS][:100]
    return {
        "status": status, "alerts": alerts, "receivers": receivers, "silences": store.silences(now),
        "approvals": store.approvals()[:50], "log": entries, "now": now, "rfc3339": rfc3339,
        "age": lambda ts: _age(now, ts), "firing": sum(a["state"] == "firing" for a in alerts),
        "pending": sum(a["state"] == "pending" for a in alerts),
    }


def _headers() -> dict[str, str]:
    return {"Cache-Control": "no-store", "X-Frame-Options": "DENY",
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
            "form-action 'self'; frame-ancestors 'none'"}


def _see_page(anchor: str = "") -> RedirectResponse:
    return RedirectResponse(f"/{anchor}", status_code=303)


class StatusPage:
    """The page and its forms, over the evaluator, the store and the daemon's status."""

    def __init__(self, evaluator: Evaluator, store: Store, status: Any, auth: Authenticator, protect_reads: bool,
                 secure_cookie: bool) -> None:
        self.evaluator, self.store, self.status, self.auth = evaluator, store, status, auth
        self.protect_reads, self.secure_cookie = protect_reads, secure_cookie
        self.sessions = Sessions(auth)

    def render(self, name: str, code: int = 200, **ctx: Any) -> HTMLResponse:
        return HTMLResponse(_TEMPLATES.get_template(name).render(**ctx), status_code=code, headers=_headers())

    def refuse(self, code: int, error: str) -> HTMLResponse:
        return self.render("login.html.j2", code, error=error, protect_reads=self.protect_reads)

    def page(self, session: Session | None, code: int = 200, **extra: Any) -> HTMLResponse:
        data = page_data(self.evaluator, self.store, self.status(), time.time())
        return self.render("status.html.j2", code, session=session, auth_enabled=self.auth.enabled, **extra, **data)

    def acting(self, request: Request, csrf: str) -> Session | Response:
        """The session allowed to press a button, or the answer for one that is not."""
        if not self.auth.enabled:  # as the API's mutating endpoints: no credentials configured, no buttons
            return self.refuse(403, DISABLED)
        s = self.sessions.get(request.cookies.get(COOKIE))
        if s is None:
            return self.refuse(401, "sign in first: buttons need a token with the operate scope")
        if "operate" not in s.scopes:
            return self.refuse(403, f"{s.who} may read, not act: the operate scope is needed")
        if not hmac.compare_digest(s.csrf, csrf):
            return self.refuse(403, "this form is stale or came from another site (CSRF): reload the page and try "
                               "again")
        return s

    def index(self, request: Request) -> Response:
        s = self.sessions.caller(request)
        if self.protect_reads and s is None:
            return self.refuse(401, "")
        return self.page(s)

    def login_form(self) -> Response:
        return self.refuse(200, "")

    def login(self, token: str = Form(..., max_length=4096)) -> Response:
        if not self.auth.enabled:
            return self.refuse(403, DISABLED)
        try:
            sid, _ = self.sessions.sign_in(token.strip())
        except AuthError as exc:
            return self.refuse(401, f"not signed in: {exc}")
        resp = _see_page()
        resp.set_cookie(COOKIE, sid, max_age=int(SESSION_S), httponly=True, samesite="strict",
                        secure=self.secure_cookie, path="/")
        return resp

    def logout(self, request: Request) -> Response:
        self.sessions.drop(request.cookies.get(COOKIE))
        resp = _see_page()
        resp.delete_cookie(COOKIE, path="/")
        return resp

    def add_silence(self, request: Request, csrf: str = Form(""), matchers: str = Form(..., max_length=8000),
                    duration: str = Form("2h", max_length=20), comment: str = Form(..., max_length=2000)
                    ) -> Response:
        s = self.acting(request, csrf)
        if not isinstance(s, Session):
            return s
        now = time.time()
        try:
            found = [str(parse_matcher(m.strip())) for m in matchers.splitlines() if m.strip()]
            ends = now + parse_duration(duration.strip())
            if not found or len(found) > 64:
                raise ValueError("give between 1 and 64 matchers, one a line")
            if ends <= now:
                raise ValueError("the duration must be positive")
            if not comment.strip():
                raise ValueError("a comment is required (what the silence is for)")
        except ValueError as exc:
            return self.page(s, 400, form_error=f"silence not added: {exc}")
        sid = self.store.add_silence(found, now, ends, s.who, comment.strip(), now)
        self.store.audit(now, "silence", sid, matchers=found, by=s.who, comment=comment.strip())
        return _see_page("#silences")

    def expire_silence(self, request: Request, sid: str, csrf: str = Form("")) -> Response:
        s = self.acting(request, csrf)
        if not isinstance(s, Session):
            return s
        if self.store.expire_silence(sid, time.time()):
            self.store.audit(time.time(), "silence-expired", sid, by=s.who)
        return _see_page("#silences")

    def decide(self, request: Request, approval_id: str, answer: str, csrf: str = Form("")) -> Response:
        s = self.acting(request, csrf)
        if not isinstance(s, Session):
            return s
        if answer not in ("approve", "reject"):
            return self.refuse(404, f"no such answer {answer!r}")
        if self.store.decide_approval(approval_id, answer == "approve", s.who, time.time()) is None:
            return self.refuse(404, f"no approval {approval_id!r}")
        return _see_page("#remediation")


def status_routes(evaluator: Evaluator, store: Store, status: Any, auth: Authenticator, protect_reads: bool,
                  secure_cookie: bool) -> APIRouter:
    p = StatusPage(evaluator, store, status, auth, protect_reads, secure_cookie)
    router = APIRouter(include_in_schema=False)
    router.add_api_route("/", p.index, methods=["GET"])
    router.add_api_route("/login", p.login_form, methods=["GET"])
    router.add_api_route("/login", p.login, methods=["POST"])
    router.add_api_route("/logout", p.logout, methods=["POST"])
    router.add_api_route("/ui/silences", p.add_silence, methods=["POST"])
    router.add_api_route("/ui/silences/{sid}/expire", p.expire_silence, methods=["POST"])
    router.add_api_route("/ui/approvals/{approval_id}/{answer}", p.decide, methods=["POST"])
    return router
