"""The inference core over real HTTP, with the official `openai` client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from inference_core.client import ReplicaClient, ReplicaError
from sentinel.netutil import free_port, wait_http_ok

pytestmark = pytest.mark.integration
TOKEN = "test-admin-token-0123456789"


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    log_dir = tmp_path_factory.mktemp("logs")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "inference_core.server", "--model-dir", str(tiny_model_dir),
                             "--served-model-name", "deepseek-tiny", "--port", str(port), "--log-dir", str(log_dir),
                             "--enable-faults"], env={**os.environ, "INFERENCE_ADMIN_TOKEN": TOKEN})
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_http_ok(f"{url}/ready", 60, alive=lambda: proc.poll() is None), "server did not start"
        yield url, log_dir
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture
def client(server: tuple[str, Path]) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0)


def test_completions_models_and_usage(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["deepseek-tiny"]
    c = client.completions.create(model="deepseek-tiny", prompt="The cluster is", max_tokens=5, temperature=0)
    assert c.object == "text_completion" and c.usage is not None
    assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
    assert c.usage.completion_tokens <= 5
    seeded = [client.completions.create(model="deepseek-tiny", prompt="Hi", max_tokens=6, seed=7).choices[0].text
              for _ in range(2)]
    assert seeded[0] == seeded[1]  # the same seed samples the same tokens


@pytest.mark.parametrize(("kwargs", "status", "param"), [
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"temperature": 5}, 400, "temperature"),
    ({"model": "gpt-4"}, 404, "model"),
    ({"prompt": "word " * 400, "max_tokens": 200}, 400, "prompt"),
])
def test_errors_in_openai_format(client: openai.OpenAI, kwargs: dict, status: int, param: str) -> None:  # type: ignore[type-arg]
    args = {"model": "deepseek-tiny", "prompt": "x", "max_tokens": 4, **kwargs}
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(**args)
    assert info.value.status_code == status
    body = info.value.body
    assert isinstance(body, dict) and body.get("param") == param, body


def test_context_error_names_both_lengths(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match=r"prompt \(\d+ tokens\) plus max_tokens \(200\) exceeds the "
                                                     r"context length 512"):
        client.completions.create(model="deepseek-tiny", prompt="word " * 400, max_tokens=200)


def test_metrics_and_json_logs(client: openai.OpenAI, server: tuple[str, Path]) -> None:
    client.completions.create(model="deepseek-tiny", prompt="metrics", max_tokens=3)
    text = httpx.get(f"{server[0]}/metrics").text
    assert "gpu_utilization" not in text  # no GPU here: the busy ratio has its own name
    for name in ("model_inference_latency_seconds_bucket", "inference_engine_busy_percent", "memory_usage_bytes",
                 "memory_limit_bytes", "cuda_errors_total", "inference_batch_size_bucket", "model_load_seconds"):
        assert name in text, name
    from prometheus_client.parser import text_string_to_metric_families
    families = {f.name: f for f in text_string_to_metric_families(text)}
    [info] = families["inference_model_info"].samples  # which model: the dashboards' $model variable
    assert info.name == "inference_model_info" and info.value == 1
    assert info.labels["model"] == "deepseek-tiny" and info.labels["quantization"] == "none"
    queued = {s.name: s.value for s in families["inference_request_queue_time_seconds"].samples
              if not s.labels.get("le")}
    assert queued["inference_request_queue_time_seconds_count"] >= 1  # every request is scheduled once
    lines = [json.loads(x) for x in (server[1] / "inference.log").read_text().splitlines()]
    last = lines[-1]
    assert last["service.name"] == "deepseek-inference" and last["cuda_error"] is None
    assert last["queue_ms"] is not None and 0 <= last["queue_ms"] <= last["inference_time"]
    assert last["batch_size"] == 1 and last["inference_time"] > 0 and last["@timestamp"].endswith("Z")
    assert "metrics" not in json.dumps(last)  # prompt text is never logged


def test_fault_switch_needs_the_token(server: tuple[str, Path]) -> None:
    r = httpx.post(f"{server[0]}/admin/faults", json={"cuda_error": True})
    assert r.status_code == 401
    r = httpx.post(f"{server[0]}/admin/faults", json={"latency_ms": -1}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 400


def test_replica_client_reads_the_documents_the_server_answers_with(client: openai.OpenAI,
                                                                    server: tuple[str, Path]) -> None:
    """inference_core.client's types are the ones the server answers with: what sentinel's supervisor,
    router, liveness probe and runbooks read."""
    api = ReplicaClient(server[0])
    health = api.health()
    assert health.status == "ok" and health.pid is not None and health.problem is None
    assert health.layout in ("moving", "done")
    assert api.ready().ready is True
    load = api.load()
    assert load.ready and load.healthy and not load.draining and load.in_flight == 0 and load.tokens == 0
    assert "inference_requests_total" in api.metrics_text()
    with pytest.raises(ReplicaError, match="no admin token"):
        api.drain()


def test_cuda_fault_turns_the_replica_unhealthy(client: openai.OpenAI, server: tuple[str, Path]) -> None:
    # Runs last in this module: the replica stays unhealthy until restarted.
    r = httpx.post(f"{server[0]}/admin/faults", json={"cuda_error": True}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200
    with pytest.raises(openai.InternalServerError, match="CUDA error"):
        client.completions.create(model="deepseek-tiny", prompt="x", max_tokens=2)
    assert httpx.get(f"{server[0]}/health").status_code == 503
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(model="deepseek-tiny", prompt="x", max_tokens=2)
    assert info.value.status_code == 503
    last = json.loads((server[1] / "inference.log").read_text().splitlines()[-1])
    assert last["cuda_error"].startswith("CUDA error") and last["level"] == "error"
    assert 'cuda_errors_total 1.0' in httpx.get(f"{server[0]}/metrics").text
    api = ReplicaClient(server[0], admin_token=TOKEN)
    health = api.health()
    assert health.status == "unhealthy" and health.stalled is False
    assert health.cuda_error and health.problem == health.cuda_error and health.problem.startswith("CUDA error")
    ready, load = api.ready(), api.load()
    assert not ready.ready and ready.healthy is False and not load.ready
    assert api.drain().in_flight == 0 and api.load().draining is True


def test_ready_is_false_while_loading_and_after_a_failed_load(tmp_path: Path) -> None:
    """A model directory that cannot load: the server is alive (/health answers) but never ready."""
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text('{"model_type": "deepseek_v3"}')
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "inference_core.server", "--model-dir", str(tmp_path / "bad"),
                             "--port", str(port)])
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_http_ok(f"{url}/openapi.json", 60, alive=lambda: proc.poll() is None)
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/health").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.1)  # "loading" until the load fails
        r = httpx.get(f"{url}/ready")
        assert r.status_code == 503 and "'deepseek_v3' is not supported" in r.json()["load_error"]
        assert httpx.get(f"{url}/health").status_code == 503
        api = ReplicaClient(url)
        assert api.health().problem == api.ready().load_error == api.load().load_error
        assert "'deepseek_v3' is not supported" in (api.health().problem or "")
        c = httpx.post(f"{url}/v1/completions", json={"model": "bad", "prompt": "x"})
        assert c.status_code == 503 and "failed to load" in c.text
    finally:
        proc.terminate()
        proc.wait(30)
