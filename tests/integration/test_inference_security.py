"""The seed's section 5 on the model API, over real HTTPS: TLS 1.3 only (certificates from trustme), bearer
authentication with hashed API keys and JWTs (scope `infer`), per-client token buckets counted without
timing (a refill rate so slow that only the burst passes), a body size limit; the official `openai` client
works through all of it."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import openai
import pytest
import trustme

from inference_core.security import hash_key, issue_token
from sentinel.netutil import free_port

pytestmark = pytest.mark.integration
KEY = "sk-machine-client-0123456789abcdef"
SECRET = "jwt-test-secret-0123456789abcdef-0123456789"


@pytest.fixture(scope="module")
def tls_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    work = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_and_cert_chain_pem.write_to_path(str(work / "server.pem"))
    ca.cert_pem.write_to_path(str(work / "ca.pem"))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "inference_core.server", "--model-dir", str(tiny_model_dir), "--served-model-name",
         "deepseek-tiny", "--port", str(port), "--log-dir", str(work), "--tls-cert", str(work / "server.pem"),
         "--tls-key", str(work / "server.pem"), "--api-key-hash", hash_key(KEY), "--jwt-secret-env", "JWT_SECRET",
         "--jwt-audience", "inference", "--rate-limit", "0.001", "--rate-burst", "4", "--max-body-bytes", "65536"],
        env={**os.environ, "JWT_SECRET": SECRET})
    url = f"https://127.0.0.1:{port}"
    deadline = time.time() + 90
    with httpx.Client(verify=ssl.create_default_context(cafile=str(work / "ca.pem"))) as c:
        while True:
            assert proc.poll() is None, "the server exited"
            try:
                if c.get(f"{url}/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "the server did not become ready"
            time.sleep(0.3)
    yield url, work / "ca.pem"
    proc.terminate()
    proc.wait(30)


def context(ca: Path, version: ssl.TLSVersion) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.minimum_version = ctx.maximum_version = version
    return ctx


def test_tls_1_3_only(tls_server: tuple[str, Path]) -> None:
    url, ca = tls_server
    with httpx.Client(verify=context(ca, ssl.TLSVersion.TLSv1_3)) as c:
        assert c.get(f"{url}/health").status_code == 200
    with httpx.Client(verify=context(ca, ssl.TLSVersion.TLSv1_2)) as c, pytest.raises(httpx.ConnectError):
        c.get(f"{url}/health")
    with httpx.Client() as c, pytest.raises((httpx.ConnectError, httpx.RemoteProtocolError)):  # plain HTTP: no
        c.get(url.replace("https", "http") + "/health")


def test_authentication_and_scopes(tls_server: tuple[str, Path]) -> None:
    url, ca = tls_server
    now = time.time()

    def status(token: str | None) -> tuple[int, dict[str, object]]:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        with httpx.Client(verify=ssl.create_default_context(cafile=str(ca))) as c:
            r = c.get(f"{url}/v1/models", headers=headers)
        return r.status_code, r.json()

    code, body = status(None)
    assert code == 401 and body["error"]["type"] == "authentication_error"  # type: ignore[index]
    assert status("sk-wrong")[0] == 401
    cases = {
        "expired": issue_token(SECRET, "alice", ["infer"], ttl_s=60, audience="inference", now=now - 3600),
        "no infer scope": issue_token(SECRET, "alice", ["read"], audience="inference"),
        "wrong audience": issue_token(SECRET, "alice", ["infer"], audience="sentinel"),
        "wrong secret": issue_token("another-secret-0123456789abcdef-0123456789", "alice", ["infer"],
                                    audience="inference"),
        "no exp": jwt.encode({"sub": "alice", "scope": "infer", "aud": "inference"}, SECRET, algorithm="HS256"),
        "alg none": jwt.encode({"sub": "alice", "scope": "infer", "aud": "inference", "exp": int(now + 60)}, None,
                               algorithm="none"),
    }
    got = {name: status(token)[0] for name, token in cases.items()}
    assert got == {"expired": 401, "no infer scope": 403, "wrong audience": 401, "wrong secret": 401,
                   "no exp": 401, "alg none": 401}
    assert status(issue_token(SECRET, "bob", ["infer"], audience="inference"))[0] == 200


def test_rate_limits_per_client_and_body_size(tls_server: tuple[str, Path]) -> None:
    """The refill is 0.001/s: each client gets its burst of 4 and then 429s, counted, not timed."""
    url, ca = tls_server
    carol = issue_token(SECRET, "carol", ["infer"], audience="inference")
    dave = issue_token(SECRET, "dave", ["infer"], audience="inference")
    with httpx.Client(verify=ssl.create_default_context(cafile=str(ca))) as c:
        codes = [c.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {carol}"}).status_code
                 for _ in range(6)]
        assert codes == [200, 200, 200, 200, 429, 429]
        r = c.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {carol}"})
        assert r.json()["error"]["type"] == "rate_limit_error" and int(r.headers["Retry-After"]) > 100
        assert c.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {dave}"}).status_code == 200
        big = c.post(f"{url}/v1/completions", content=b"x" * 70_000,
                     headers={"Authorization": f"Bearer {dave}", "Content-Type": "application/json"})
        assert big.status_code == 413
        metrics = c.get(f"{url}/metrics").text
    assert 'inference_requests_refused_total{reason="rate_limited"} 3.0' in metrics


def test_the_openai_client_through_tls_and_an_api_key(tls_server: tuple[str, Path]) -> None:
    url, ca = tls_server
    with httpx.Client(verify=ssl.create_default_context(cafile=str(ca))) as http:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, http_client=http)
        out = client.completions.create(model="deepseek-tiny", prompt="The cluster is", max_tokens=4, temperature=0)
        assert out.usage is not None and out.usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="sk-nope", max_retries=0, http_client=http).models.list()


def test_completion_text_is_logged_only_when_asked_and_then_redacted(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Without --log-text no prompt or completion text reaches the log; with it, the completion is written
    through the same redaction as log shipping (inference_core/redaction.py)."""
    import json

    from inference_core.redaction import redact_text
    from tests.integration.test_inference_api import start_server

    for flag in ([], ["--log-text"]):
        logs = tmp_path / ("with" if flag else "without")
        proc, url = start_server(tiny_model_dir, logs, *flag)
        try:
            r = httpx.post(f"{url}/v1/completions", json={"model": "deepseek-tiny", "prompt": "mail bob@example.com "
                           "on 2026-11-29", "max_tokens": 8, "temperature": 0}, timeout=60)
            assert r.status_code == 200, r.text
            text = r.json()["choices"][0]["text"]
        finally:
            proc.terminate()
            proc.wait(30)
        lines = [json.loads(x) for x in (logs / "inference.log").read_text().splitlines()]
        done = [x for x in lines if x.get("message") == "inference request completed"]
        assert done, lines
        raw = (logs / "inference.log").read_text()
        assert "bob@example.com" not in raw and "2026-11-29 " not in raw  # the prompt is never logged
        if flag:
            assert done[-1]["completion"] == redact_text(text)
        else:
            assert "completion" not in done[-1]


def test_concurrent_streams_per_client(tiny_model_dir: Path, tmp_path: Path) -> None:
    """With --max-concurrent-per-client 1, a second request while a stream is open is a 429; once the
    stream is over, the client may go again."""
    from tests.integration.test_inference_api import fault, start_server

    proc, url = start_server(tiny_model_dir, tmp_path, "--max-concurrent-per-client", "1")
    fault(url, latency_ms=50)  # 64 tokens take seconds: the stream is surely still open
    body = {"model": "deepseek-tiny", "prompt": "The cluster is", "max_tokens": 64, "temperature": 0,
            "stream": True, "ignore_eos": True}
    try:
        with httpx.Client(timeout=60) as c:
            with c.stream("POST", f"{url}/v1/completions", json=body) as stream:
                assert stream.status_code == 200
                lines = stream.iter_lines()  # kept: a dropped iterator would close the stream
                next(lines)  # the stream is open and producing
                second = c.post(f"{url}/v1/completions", json={**body, "stream": False, "max_tokens": 2})
                assert second.status_code == 429 and "already in flight" in second.text
                assert sum(1 for _ in lines) > 10
            fault(url, latency_ms=0)
            again = c.post(f"{url}/v1/completions", json={**body, "stream": False, "max_tokens": 2})
            assert again.status_code == 200, again.text
    finally:
        proc.terminate()
        proc.wait(30)
