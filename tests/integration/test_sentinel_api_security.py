"""sentinel's own API over real HTTPS (trustme certificates, uvicorn): TLS 1.3 only, scopes `read` and
`operate` from JWTs issued by `sentinel token issue`, the static token and hashed API keys, per-client rate
limits counted without timing."""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trustme
import uvicorn
from prometheus_client import CollectorRegistry
from pydantic import SecretStr
from typer.testing import CliRunner

from inference_core.security import RateLimiter, hash_key, server_config
from sentinel.alerts.store import Store
from sentinel.api import FixedControls, authenticator, create_app
from sentinel.cli import app as cli
from sentinel.netutil import free_port
from sentinel.rules.evaluator import Evaluator
from sentinel.settings import ApiSettings

pytestmark = pytest.mark.integration
SECRET = "sentinel-jwt-secret-0123456789abcdef-0123"
STATIC = "static-operator-token-0123456789"
KEY = "machine-key-0123456789abcdef"


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, ssl.SSLContext, Path]]:
    work = tmp_path_factory.mktemp("api")
    ca = trustme.CA()
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(work / "server.pem"))
    ca.cert_pem.write_to_path(str(work / "ca.pem"))
    settings = ApiSettings(token=SecretStr(STATIC), jwt_secret=SecretStr(SECRET), jwt_audience="sentinel",
                           api_key_hashes=[hash_key(KEY)], protect_reads=True)
    store = Store(work / "s.db")
    paused: list[bool] = []
    app = create_app(Evaluator(store, None, None), store, CollectorRegistry(), FixedControls(paused=paused),
                     authenticator(settings.token, settings), limiter=RateLimiter(0.001, 30), protect_reads=True)
    port = free_port()
    server = uvicorn.Server(server_config(app, "127.0.0.1", port, work / "server.pem", work / "server.pem",
                                          log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    (work / "sentinel.yaml").write_text(f"api:\n  jwt_secret: {SECRET}\n  jwt_audience: sentinel\n")
    yield f"https://127.0.0.1:{port}", ssl.create_default_context(cafile=str(work / "ca.pem")), work
    server.should_exit = True
    thread.join(10)


def issue(work: Path, *scopes: str, subject: str = "oncall") -> str:
    args = ["token", "issue", "-c", str(work / "sentinel.yaml"), "--subject", subject, "--ttl", "15m"]
    for s in scopes:
        args += ["--scope", s]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    return r.output.strip()


def test_scopes_tokens_and_keys(api: tuple[str, ssl.SSLContext, Path]) -> None:
    url, ctx, work = api
    reader, operator = issue(work, "read"), issue(work, "read", "operate")
    with httpx.Client(verify=ctx) as c:
        def code(method: str, path: str, token: str | None) -> int:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            return c.request(method, f"{url}{path}", headers=headers).status_code

        assert code("GET", "/healthz", None) == 200  # probes need no token
        assert code("GET", "/api/v1/alerts", None) == 401  # protect_reads
        assert code("GET", "/api/v1/alerts", reader) == 200
        assert code("POST", "/api/v1/remediation/pause", reader) == 403  # read is not operate
        assert code("POST", "/api/v1/remediation/pause", operator) == 200
        assert code("POST", "/api/v1/remediation/pause", STATIC) == 200  # the static token: every scope
        assert code("POST", "/api/v1/remediation/pause", KEY) == 200  # a hashed API key
        assert code("POST", "/api/v1/remediation/pause", "not-a-key") == 401
        assert code("POST", "/api/v1/remediation/pause", issue(work, "infer")) == 403  # the model API's scope
    ctx12 = ssl.create_default_context(cafile=str(work / "ca.pem"))
    ctx12.maximum_version = ssl.TLSVersion.TLSv1_2
    with httpx.Client(verify=ctx12) as c, pytest.raises(httpx.ConnectError):  # TLS 1.2 is refused
        c.get(f"{url}/healthz")
    bad = CliRunner().invoke(cli, ["token", "issue", "-c", str(work / "sentinel.yaml"), "--subject", "x",
                                   "--scope", "admin"])
    assert bad.exit_code == 2 and "unknown scope" in bad.output
    h = CliRunner().invoke(cli, ["token", "hash"], input=f"{KEY}\n")
    assert h.exit_code == 0 and h.output.strip().endswith(hash_key(KEY))


def test_rate_limit_per_subject(api: tuple[str, ssl.SSLContext, Path]) -> None:
    """The bucket holds 30 and refills at 0.001/s: counted, not timed. Each subject has its own."""
    url, ctx, work = api
    a, b = issue(work, "read", subject="alice"), issue(work, "read", subject="bob")
    with httpx.Client(verify=ctx) as c:
        codes = [c.get(f"{url}/api/v1/alerts", headers={"Authorization": f"Bearer {a}"}).status_code
                 for _ in range(32)]
        assert codes == [200] * 30 + [429, 429]
        r = c.get(f"{url}/api/v1/alerts", headers={"Authorization": f"Bearer {a}"})
        assert int(r.headers["Retry-After"]) > 100
        assert c.get(f"{url}/api/v1/alerts", headers={"Authorization": f"Bearer {b}"}).status_code == 200


def test_silence_routes(api: tuple[str, ssl.SSLContext, Path]) -> None:
    """POST /api/v1/silences and DELETE /api/v1/silence/{id} need `operate`; bad matchers are 422s."""
    url, ctx, work = api
    reader, operator = issue(work, "read", subject="sil-r"), issue(work, "read", "operate", subject="sil-o")
    body = {"matchers": ['alertname="CudaError"'], "endsAt": "2099-01-01T00:00:00Z", "createdBy": "alice",
            "comment": "driver update"}
    with httpx.Client(verify=ctx) as c:
        assert c.post(f"{url}/api/v1/silences", json=body, headers={"Authorization": f"Bearer {reader}"}
                      ).status_code == 403
        r = c.post(f"{url}/api/v1/silences", json=body, headers={"Authorization": f"Bearer {operator}"})
        assert r.status_code == 200, r.text
        sid = r.json()["data"]["silenceID"]
        bad = c.post(f"{url}/api/v1/silences", json={**body, "matchers": ["alertname=CudaError"]},
                     headers={"Authorization": f"Bearer {operator}"})
        assert bad.status_code == 422
        listed = c.get(f"{url}/api/v1/silences", headers={"Authorization": f"Bearer {reader}"}).json()
        assert [s["id"] for s in listed["data"]["silences"]] == [sid]
        assert c.delete(f"{url}/api/v1/silence/{sid}", headers={"Authorization": f"Bearer {operator}"}
                        ).status_code == 200
        assert c.delete(f"{url}/api/v1/silence/{sid}", headers={"Authorization": f"Bearer {operator}"}
                        ).status_code == 404
