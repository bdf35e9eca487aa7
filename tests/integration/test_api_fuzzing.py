"""schemathesis 4 (`--checks all`) against both APIs over real HTTP, each from its own OpenAPI document:
sentinel's API (uvicorn on loopback, with a real state store) and the inference server (a subprocess serving
the bundled model). Then, from the same documents, every operation that declares a scope is called without
credentials (401) and with a token lacking that scope (403): a new route cannot be left open by mistake.

Each API is fuzzed in two passes with a fixed seed and a bounded number of examples:
- the examples and fuzzing phases with every check; tests/integration/schemathesis_hooks.py keeps generated
  bodies inside the rules a JSON schema cannot state (a silence ends in the future, regexes compile, token
  ids lie below the model's vocabulary size, prompts fit its context) and leaves invalid bodies invalid;
- the coverage phase (boundary and negative cases, where hooks do not apply) with every check except
  positive_data_acceptance, which would flag those same model- and time-dependent 400s.
POST /admin/drain is left out of the inference pass: it is meant to make every later request a 503.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from inference_core.security import hash_key, issue_token
from sentinel.alerts.store import Store
from sentinel.api import FixedControls, authenticator, create_app
from sentinel.netutil import free_port
from sentinel.rules.evaluator import Evaluator
from sentinel.settings import ApiSettings
from tests.conftest import ROOT

pytestmark = pytest.mark.integration
SECRET = "fuzz-jwt-secret-0123456789abcdef-012345"
STATIC = "fuzz-static-token-0123456789"
KEY = "fuzz-api-key-0123456789"
EXAMPLES = 25
SCHEMATHESIS = str(Path(sys.executable).parent / "schemathesis")


@pytest.fixture(scope="module")
def sentinel_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    work = tmp_path_factory.mktemp("fuzz-sentinel")
    settings = ApiSettings(token=SecretStr(STATIC), jwt_secret=SecretStr(SECRET))
    store = Store(work / "s.db")
    app = create_app(Evaluator(store, None, None), store, CollectorRegistry(),
                     FixedControls(on_inbound=lambda payload: {"matched": 0, "skipped": []}),
                     authenticator(settings.token, settings))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def inference_api(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("fuzz-inference") / "server.log"
    env = {**os.environ, "FUZZ_JWT_SECRET": SECRET}
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "inference_core.server", "--model-dir", str(tiny_model_dir),
                                 "--port", str(port), "--api-key-hash", hash_key(KEY), "--jwt-secret-env",
                                 "FUZZ_JWT_SECRET", "--rate-limit", "0"], stdout=out, stderr=subprocess.STDOUT,
                                env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        assert "Traceback" not in log.read_text(), log.read_text()[-5000:]  # nothing blew up unseen


def schemathesis(url: str, token: str, *extra: str) -> None:
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.integration.schemathesis_hooks", "FUZZ_MODEL": "deepseek-tiny",
           "FUZZ_VOCAB": "512"}
    base = [SCHEMATHESIS, "run", f"{url}/openapi.json", "--checks", "all", "--max-examples", str(EXAMPLES),
            "--seed", "20261129", "--generation-database", "none", "--request-timeout", "60",
            "-H", f"Authorization: Bearer {token}", *extra]
    for phase in (["--phases", "examples,fuzzing"], ["--phases", "coverage", "--exclude-checks",
                                                     "positive_data_acceptance"]):
        p = subprocess.run([*base, *phase], capture_output=True, text=True, env=env, cwd=ROOT, timeout=900,
                           check=False)
        if p.returncode != 0:  # pytest.fail prints the report whole (an assertion message would be cut)
            pytest.fail(f"schemathesis {' '.join(phase)} found a problem:\n{p.stdout[-8000:]}\n{p.stderr[-2000:]}",
                        pytrace=False)
        assert " passed" in p.stdout, p.stdout[-2000:]


def test_schemathesis_finds_nothing_on_sentinels_api(sentinel_api: str) -> None:
    schemathesis(sentinel_api, STATIC)


def test_schemathesis_finds_nothing_on_the_model_api(inference_api: str) -> None:
    schemathesis(inference_api, KEY, "--exclude-path", "/admin/drain")


def _operations(spec: dict[str, Any]) -> list[tuple[str, str, list[str]]]:
    """(method, path, scopes) of every operation that cannot be called without credentials."""
    out = []
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            security = op.get("security")
            if security and {} not in security:
                out.append((method.upper(), path, [s for req in security for s in next(iter(req.values()))]))
    return out


def _scope_check(url: str, wrong_scope_token: str, skip: set[str] = frozenset()) -> int:  # type: ignore[assignment]
    spec = httpx.get(f"{url}/openapi.json").json()
    ops = [o for o in _operations(spec) if o[1] not in skip]
    for method, path, _ in ops:
        concrete = path.replace("{sid}", "0")
        r = httpx.request(method, f"{url}{concrete}", content=b"{}", headers={"Content-Type": "application/json"})
        assert r.status_code == 401, (method, path, r.status_code, r.text)
        r = httpx.request(method, f"{url}{concrete}", content=b"{}", headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {wrong_scope_token}"})
        # a valid token without the scope: 403; /admin/* takes the replica's admin token, which no JWT is: 401
        assert r.status_code == (401 if path.startswith("/admin/") else 403), (method, path, r.status_code, r.text)
    return len(ops)


def test_no_operation_is_reachable_without_its_scope(sentinel_api: str, inference_api: str) -> None:
    read_only = issue_token(SECRET, "fuzz", ["read"], 900)
    assert _scope_check(sentinel_api, read_only) >= 6  # every mutating route: 'operate'
    no_infer = issue_token(SECRET, "fuzz", ["read", "operate"], 900)
    # /admin/* takes the replica's admin token, which no JWT is
    assert _scope_check(inference_api, no_infer) >= 3
    spec = json.loads((ROOT / "deploy" / "openapi" / "sentinel.json").read_text())
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
