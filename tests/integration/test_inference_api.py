"""Streaming, chat, n, overload and fault drills over real HTTP with the official `openai` client."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest

from sentinel.netutil import free_port, wait_http_ok

pytestmark = pytest.mark.integration
TOKEN = "test-admin-token-0123456789"


def start_server(model_dir: Path, log_dir: Path, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "inference_core.server", "--model-dir", str(model_dir),
                             "--served-model-name", "deepseek-tiny", "--port", str(port), "--log-dir", str(log_dir),
                             "--enable-faults", *extra], env={**os.environ, "INFERENCE_ADMIN_TOKEN": TOKEN})
    url = f"http://127.0.0.1:{port}"
    assert wait_http_ok(f"{url}/ready", 60, alive=lambda: proc.poll() is None), "server did not start"
    return proc, url


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, url = start_server(tiny_model_dir, tmp_path_factory.mktemp("logs"), "--stall-timeout", "1")
    yield url
    proc.terminate()
    proc.wait(30)


def fault(url: str, **kw: object) -> None:
    r = httpx.post(f"{url}/admin/faults", json=kw, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200, r.text


def test_streaming_completion_equals_the_non_streamed_one(server: str) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    whole = client.completions.create(model="deepseek-tiny", prompt="The cluster is", max_tokens=12, temperature=0)
    chunks = list(client.completions.create(model="deepseek-tiny", prompt="The cluster is", max_tokens=12,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_completions_stream_and_n(server: str) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Status?"}]
    c = client.chat.completions.create(model="deepseek-tiny", messages=msgs, max_tokens=8, temperature=0)  # type: ignore[arg-type]
    assert c.object == "chat.completion" and c.choices[0].message.role == "assistant"
    streamed = "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
        model="deepseek-tiny", messages=msgs, max_tokens=8, temperature=0, stream=True) if ch.choices)  # type: ignore[arg-type]
    assert streamed == c.choices[0].message.content
    def two() -> list[str]:
        r = client.completions.create(model="deepseek-tiny", prompt="GPU", max_tokens=6, n=2, seed=3,
                                      extra_body={"top_k": 20})
        assert [ch.index for ch in r.choices] == [0, 1]
        assert r.usage is not None and 2 <= r.usage.completion_tokens <= 12
        return [ch.text for ch in r.choices]

    assert two() == two()  # seeded sampling is reproducible, choice by choice


def test_overload_answers_429(tiny_model_dir: Path, tmp_path: Path) -> None:
    proc, url = start_server(tiny_model_dir, tmp_path, "--max-num-seqs", "1", "--max-num-waiting", "1")
    try:
        fault(url, latency_ms=300)

        async def burst() -> list[int]:
            async with httpx.AsyncClient(timeout=60) as c:
                rs = await asyncio.gather(*(c.post(f"{url}/v1/completions", json={
                    "model": "deepseek-tiny", "prompt": "x", "max_tokens": 2}) for _ in range(6)))
            return [r.status_code for r in rs]

        codes = asyncio.run(burst())
        assert 429 in codes and 200 in codes
    finally:
        proc.terminate()
        proc.wait(30)


def test_hang_turns_health_red_and_clears(server: str) -> None:
    fault(server, hang=True)
    with httpx.Client(timeout=30) as c:
        t = threading.Thread(target=lambda: httpx.post(f"{server}/v1/completions", timeout=30, json={
            "model": "deepseek-tiny", "prompt": "x", "max_tokens": 2}))
        t.start()
        assert wait_until(lambda: c.get(f"{server}/health").status_code == 503, 10)
        assert c.get(f"{server}/health").json()["stalled"] is True
        fault(server, hang=False)
        t.join(30)
        assert wait_until(lambda: c.get(f"{server}/health").status_code == 200, 10)


def test_leak_grows_memory(server: str) -> None:
    def rss() -> float:
        line = next(x for x in httpx.get(f"{server}/metrics").text.splitlines()
                    if x.startswith('memory_usage_bytes{device="cpu"}'))
        return float(line.rsplit(" ", 1)[1])

    before = rss()
    fault(server, leak_mb_per_step=8)
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    client.completions.create(model="deepseek-tiny", prompt="leak", max_tokens=8)
    fault(server, leak_mb_per_step=0)
    assert rss() - before > 32 * 2**20


def test_crash_exits_the_process(tiny_model_dir: Path, tmp_path: Path) -> None:
    proc, url = start_server(tiny_model_dir, tmp_path)
    fault(url, crash=True)
    with pytest.raises(httpx.HTTPError):
        httpx.post(f"{url}/v1/completions", json={"model": "deepseek-tiny", "prompt": "x", "max_tokens": 2}, timeout=30)
    assert proc.wait(30) == 70


def wait_until(fn: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fn():
            return True
        time.sleep(0.1)
    return False


def test_client_disconnect_aborts_the_request(tiny_model_dir: Path, tmp_path: Path) -> None:
    proc, url = start_server(tiny_model_dir, tmp_path)
    try:
        fault(url, latency_ms=50)
        body = {"model": "deepseek-tiny", "prompt": "x", "max_tokens": 400}
        with pytest.raises(httpx.ReadTimeout):  # non-streaming: the client gives up waiting
            httpx.post(f"{url}/v1/completions", timeout=0.5, json=body)
        with httpx.stream("POST", f"{url}/v1/completions", timeout=10, json={**body, "stream": True}) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i == 3:
                    break  # streaming: the client hangs up after a few chunks
        assert wait_until(lambda: '"finish_reason":"abort"' in (tmp_path / "inference.log").read_text()
                          and (tmp_path / "inference.log").read_text().count('"finish_reason":"abort"') == 2, 15)
        running = [x for x in httpx.get(f"{url}/metrics").text.splitlines()
                   if x.startswith("inference_num_requests_running ")]
        assert running == ["inference_num_requests_running 0.0"]
    finally:
        proc.terminate()
        proc.wait(30)


def test_device_map_with_disk_offload_serves_the_same_text(tiny_model_dir: Path, tmp_path: Path) -> None:
    plain, url = start_server(tiny_model_dir, tmp_path / "a")
    try:
        want = httpx.post(f"{url}/v1/completions", json={"model": "deepseek-tiny", "prompt": "The cluster is",
                                                          "max_tokens": 8, "temperature": 0}).json()
    finally:
        plain.terminate()
        plain.wait(30)
    placed, url = start_server(tiny_model_dir, tmp_path / "b", "--max-memory", "cpu=0.35MiB", "--offload-folder",
                               str(tmp_path / "offload"))
    try:
        got = httpx.post(f"{url}/v1/completions", json={"model": "deepseek-tiny", "prompt": "The cluster is",
                                                         "max_tokens": 8, "temperature": 0}).json()
        assert got["choices"][0]["text"] == want["choices"][0]["text"]
        assert (tmp_path / "offload" / "layer-001.safetensors").exists()
    finally:
        placed.terminate()
        placed.wait(30)
