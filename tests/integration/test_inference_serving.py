"""The served path at real-server fidelity: memory plans that refuse to start, the integrity check,
out-of-vocabulary ids, failures inside and outside the forward pass, prefix caching and preemption
under memory pressure — over HTTP with the official `openai` client."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from sentinel.netutil import free_port, wait_http_ok

pytestmark = pytest.mark.integration
TOKEN = "test-admin-token-0123456789"
MODEL = "deepseek-tiny"


class Server:
    def __init__(self, model_dir: Path, log_dir: Path, *extra: str, wait: bool = True) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "inference_core.server", "--model-dir", str(model_dir), "--served-model-name", MODEL,
             "--port", str(self.port), "--log-dir", str(log_dir), "--enable-faults", *extra],
            env={**os.environ, "INFERENCE_ADMIN_TOKEN": TOKEN}, stderr=subprocess.PIPE, text=True)
        if wait:
            assert wait_http_ok(f"{self.url}/ready", 60, alive=lambda: self.proc.poll() is None), self.stderr()
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0)

    def stderr(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.communicate(timeout=30)[1]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.communicate(timeout=30)

    def metric(self, name: str) -> float:
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def fault(self, **kw: object) -> None:
        r = httpx.post(f"{self.url}/admin/faults", json=kw, headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tiny_model_dir, tmp_path_factory.mktemp("logs"))
    yield s
    s.close()


def test_the_memory_plan_is_printed_and_exported(tiny_model_dir: Path, tmp_path: Path) -> None:
    s = Server(tiny_model_dir, tmp_path, "--kv-cache-memory", "1MiB")
    try:
        blocks = s.metric("inference_kv_cache_blocks")
        per_token = 2 * 2 * 2 * 16 * 4  # layers x (k, v) x kv heads x head dim x fp32
        assert s.metric("inference_kv_cache_bytes") == blocks * 16 * per_token <= 2**20
        assert blocks >= 2**20 // (16 * per_token) // 2  # the decode-gather reserve takes at most half
        assert s.metric("inference_max_model_len_tokens") == 512
    finally:
        err = s.stderr()
    assert "memory plan on cpu" in err and "KV cache" in err and "full-length sequences" in err


def test_a_kv_budget_too_small_refuses_to_start_naming_numbers_and_flag(tiny_model_dir: Path, tmp_path: Path) -> None:
    s = Server(tiny_model_dir, tmp_path, "--kv-cache-memory", "64KiB", "--max-model-len", "512", wait=False)
    assert s.proc.wait(60) == 2
    err = s.stderr()
    assert "one sequence of --max-model-len 512 tokens does not fit" in err
    assert "B/token" in err and "lower --max-model-len or raise --kv-cache-memory" in err


def test_default_length_is_lowered_to_what_the_budget_holds(tiny_model_dir: Path, tmp_path: Path) -> None:
    s = Server(tiny_model_dir, tmp_path, "--kv-cache-memory", "64KiB")
    try:
        assert s.client.models.list().data[0].model_extra["max_model_len"] < 512  # type: ignore[index]
        too_long = list(range(3, 300))
        with pytest.raises(openai.BadRequestError, match="exceeds the context length"):
            s.client.completions.create(model=MODEL, prompt=too_long, max_tokens=4)
    finally:
        assert "max_model_len lowered from the config's 512" in s.stderr()


def test_a_file_that_fails_the_integrity_check_is_not_served(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(cfg, indent=3))  # same meaning, other bytes
    s = Server(model, tmp_path, wait=False)
    try:
        assert wait_http_ok(f"{s.url}/openapi.json", 60, alive=lambda: s.proc.poll() is None)
        deadline = time.monotonic() + 60
        r = httpx.get(f"{s.url}/ready")
        while not r.json().get("load_error") and time.monotonic() < deadline:
            time.sleep(0.2)
            r = httpx.get(f"{s.url}/ready")
        assert r.status_code == 503
        assert "config.json: size" in r.json()["load_error"] and "--skip-integrity-check" in r.json()["load_error"]
        err = httpx.post(f"{s.url}/v1/completions", json={"model": MODEL, "prompt": "x"})
        assert err.status_code == 503 and err.json()["error"]["type"] == "server_error"
        assert "config.json" in err.json()["error"]["message"]
    finally:
        s.close()
    ok = Server(model, tmp_path, "--skip-integrity-check")
    try:
        assert ok.client.completions.create(model=MODEL, prompt="GPU", max_tokens=2).usage.completion_tokens >= 1
    finally:
        ok.close()


def test_out_of_vocabulary_ids_are_a_400_and_the_replica_keeps_serving(server: Server) -> None:
    for bad in ([1, 2, 10**6], [-1], [2**40]):
        with pytest.raises(openai.BadRequestError) as info:
            server.client.completions.create(model=MODEL, prompt=bad, max_tokens=2)
        msg = str(info.value)  # a negative id is refused by the schema, a too large one by the vocabulary
        assert str(bad[-1]) in msg and ("outside the vocabulary" in msg or "greater than or equal to 0" in msg), msg
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert server.client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=3).usage.completion_tokens >= 1


def test_an_exception_in_the_forward_pass_fails_that_batch_only(server: Server) -> None:
    server.fault(step_error=True)
    with pytest.raises(openai.InternalServerError, match="injected exception"):
        server.client.completions.create(model=MODEL, prompt="GPU", max_tokens=4)
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert server.client.completions.create(model=MODEL, prompt="GPU", max_tokens=3).usage.completion_tokens >= 1


def test_a_bug_in_the_step_loop_fails_fast_and_exits(tiny_model_dir: Path, tmp_path: Path) -> None:
    s = Server(tiny_model_dir, tmp_path)
    try:
        s.fault(engine_bug=True)
        t0 = time.monotonic()
        with pytest.raises(openai.InternalServerError, match="engine failed"):
            s.client.completions.create(model=MODEL, prompt="GPU", max_tokens=4, timeout=30)
        assert time.monotonic() - t0 < 10  # an error at once, never a hang
        assert s.proc.wait(30) == 70
    finally:
        err = s.stderr()
    assert "engine failed, exiting: InjectedEngineBug" in err


def test_logprobs_and_echo(server: Server) -> None:
    c = server.client.completions.create(model=MODEL, prompt="The cluster is", max_tokens=6, temperature=0,
                                         logprobs=3)
    lp = c.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs and lp.text_offset is not None
    assert "".join(lp.tokens) == c.choices[0].text and len(lp.tokens) == c.usage.completion_tokens
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 3 and abs(chosen - max(top.values())) < 1e-4  # greedy takes the best
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    e = server.client.completions.create(model=MODEL, prompt="The cluster is", max_tokens=6, temperature=0,
                                         logprobs=1, echo=True)
    elp = e.choices[0].logprobs
    assert e.choices[0].text == "The cluster is" + c.choices[0].text
    assert elp is not None and elp.token_logprobs is not None and elp.tokens is not None
    assert elp.token_logprobs[0] is None and all(x is not None for x in elp.token_logprobs[1:])
    assert len(elp.tokens) == e.usage.prompt_tokens + e.usage.completion_tokens
    assert elp.token_logprobs[-6:] == pytest.approx(lp.token_logprobs, abs=1e-4)
    streamed = list(server.client.completions.create(model=MODEL, prompt="The cluster is", max_tokens=6,
                                                     temperature=0, logprobs=1, echo=True, stream=True))
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == e.choices[0].text
    lps = [x for ch in streamed if ch.choices and ch.choices[0].logprobs for x in ch.choices[0].logprobs.token_logprobs]
    assert lps[0] is None and len(lps) == len(elp.token_logprobs)
    assert lps[1:] == pytest.approx(elp.token_logprobs[1:], abs=1e-4)


def test_chat_logprobs(server: Server) -> None:
    c = server.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Status?"}],
                                              max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    content = c.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == c.usage.completion_tokens  # type: ignore[union-attr]
    assert "".join(t.token for t in content) == c.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content)
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        server.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                              top_logprobs=2)


def test_vllm_extensions_min_tokens_and_ignore_eos(server: Server) -> None:
    r = server.client.completions.create(model=MODEL, prompt="GPU", max_tokens=40, temperature=0,
                                         extra_body={"ignore_eos": True, "min_tokens": 40})
    assert r.usage.completion_tokens == 40 and r.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError, match="seed"):
        server.client.completions.create(model=MODEL, prompt="x", seed=10**23)  # type: ignore[arg-type]


def test_a_repeated_preamble_hits_the_prefix_cache(server: Server) -> None:
    preamble = ("You are the on-call assistant of the inference platform. Answer briefly, cite the alert, "
                "never guess. ") * 3
    hits0 = server.metric("inference_prefix_cache_hits_tokens_total")
    first = server.client.completions.create(model=MODEL, prompt=preamble + "GPU?", max_tokens=4, temperature=0)
    second = server.client.completions.create(model=MODEL, prompt=preamble + "Memory?", max_tokens=4, temperature=0)
    details = second.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens and details.cached_tokens >= first.usage.prompt_tokens - 20
    assert server.metric("inference_prefix_cache_hits_tokens_total") - hits0 == details.cached_tokens
    assert 0 < server.metric("inference_prefix_cache_hit_rate") <= 1


def test_preemption_under_memory_pressure_keeps_outputs(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A KV cache of 40 blocks for 8 concurrent sequences of up to 9 blocks: the scheduler must preempt;
    every output equals the one the same request gets alone."""
    s = Server(tiny_model_dir, tmp_path, "--kv-cache-memory", "240KiB", "--block-size", "4", "--max-num-seqs", "8",
               "--no-enable-prefix-caching")
    prompts = [f"Alert {i}: the error budget burns at {i + 2} times the sustainable rate" for i in range(8)]
    try:
        alone = [s.client.completions.create(model=MODEL, prompt=p, max_tokens=24, temperature=0,
                                             extra_body={"ignore_eos": True}).choices[0].text for p in prompts]
        aclient = openai.AsyncOpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0)

        async def together() -> list[str]:
            rs = await asyncio.gather(*(aclient.completions.create(
                model=MODEL, prompt=p, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
                for p in prompts))
            return [r.choices[0].text for r in rs]

        assert asyncio.run(together()) == alone
        assert s.metric("inference_num_preemptions_total") > 0
        assert s.metric("inference_kv_cache_blocks") <= 64
    finally:
        s.close()


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(x) for x in (task / "children").read_text().split()]
    return kids


def test_tensor_parallel_serving_equals_one_process_and_fails_as_a_group(tiny_model_dir: Path, tmp_path: Path,
                                                                         server: Server) -> None:
    """--tensor-parallel-size 2 (gloo: ranks as processes): the same greedy tokens as one process for
    concurrent requests; a rank killed takes the server down (exit 70), and a killed server its ranks."""
    prompts = ["The cluster is", "Why did the alert fire?", "GPU", "def add(a, b):"]
    body = {"max_tokens": 16, "temperature": 0, "extra_body": {"ignore_eos": True, "return_token_ids": True}}

    def tokens(url: str) -> list[list[int]]:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

        async def run() -> list[list[int]]:
            rs = await asyncio.gather(*(client.completions.create(model=MODEL, prompt=p, **body)  # type: ignore[call-overload]
                                        for p in prompts))
            return [r.choices[0].model_extra["token_ids"] for r in rs]

        return asyncio.run(run())

    tp = Server(tiny_model_dir, tmp_path, "--tensor-parallel-size", "2")
    try:
        assert tokens(tp.url) == tokens(server.url)
        (worker,) = [k for k in _children(tp.proc.pid)
                     if b"inference_core.tp_worker" in Path(f"/proc/{k}/cmdline").read_bytes()]
        os.kill(worker, 9)
        assert tp.proc.wait(30) == 70
    finally:
        assert "tensor-parallel rank 1 exited with -9" in tp.stderr()
    tp2 = Server(tiny_model_dir, tmp_path, "--tensor-parallel-size", "2")
    (worker,) = [k for k in _children(tp2.proc.pid)
                 if b"inference_core.tp_worker" in Path(f"/proc/{k}/cmdline").read_bytes()]
    tp2.proc.kill()
    tp2.proc.wait(30)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{worker}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{worker}").exists() or "Z" in Path(f"/proc/{worker}/stat").read_text().split()[2]


def test_int8_quantization_serves_a_quarter_of_the_weights(tiny_model_dir: Path, tmp_path: Path,
                                                           server: Server) -> None:
    prompts = ["The cluster is", "Why did the alert fire? Because the error rate", "Memory usage must keep"]

    def first_tokens(s: Server) -> list[int]:
        rs = [s.client.completions.create(model=MODEL, prompt=p, max_tokens=1, temperature=0,
                                          extra_body={"return_token_ids": True}) for p in prompts]
        return [r.choices[0].model_extra["token_ids"][0] for r in rs]  # type: ignore[index]

    q = Server(tiny_model_dir, tmp_path, "--quantization", "int8")
    try:
        assert first_tokens(q) == first_tokens(server)  # top-1 agreement where the model is confident
    finally:
        err = q.stderr()
    weights = next(line for line in err.splitlines() if "weights" in line and "activation peak" in line)
    mib = float(weights.split("weights ")[1].split(" MiB")[0])
    assert mib < 0.35 * (tiny_model_dir / "model.safetensors").stat().st_size / 2**20, weights


ZH = "监控告警：推理服务的延迟超过五百毫秒，请检查显卡。"


def zh_prompt() -> str:
    """The chat template's rendering of a user turn with the sentence's first seven characters."""
    from tokenizers import Tokenizer, models

    from inference_core.tokenizer import TextTokenizer

    return TextTokenizer(Tokenizer(models.BPE()), {}).apply_chat_template([{"role": "user", "content": ZH[:7]}])


@pytest.fixture(scope="module")
def zh_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The bundled tokenizer and model shape, fitted to a chat whose answer is one Chinese sentence: greedy
    decoding gives that answer, each character split over three byte tokens (the tokenizer learned no Chinese
    merges)."""
    from inference_core.model.weights import make_tiny_checkpoint

    corpus = (zh_prompt() + ZH[7:] + "<|im_end|>\n") * 30
    d = make_tiny_checkpoint(tmp_path_factory.mktemp("zh") / "model", seed=0, corpus=corpus)
    s = Server(d, tmp_path_factory.mktemp("zh-logs"))
    yield s
    s.close()


def test_chat_logprob_bytes_join_a_character_split_across_tokens(zh_server: Server) -> None:
    c = zh_server.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": ZH[:7]}], max_tokens=12, temperature=0, logprobs=True,
        top_logprobs=5, extra_body={"ignore_eos": True})
    text = c.choices[0].message.content
    content = c.choices[0].logprobs.content  # type: ignore[union-attr]
    assert text and any(ord(ch) > 0x2E80 for ch in text), text  # greedy output with Chinese characters
    assert content is not None and any(t.token == "\ufffd" for t in content)  # some token is part of one
    assert bytes(b for t in content for b in (t.bytes or [])).decode() == text
    assert all(t.bytes != [239, 191, 189] for t in content)


def test_completion_top_logprobs_never_lose_an_entry_and_token_ids_on_request(zh_server: Server) -> None:
    """Byte tokens that are parts of characters all read U+FFFD: five asked, five given at every position
    (vLLM gives fewer), the likelier token under the text; `return_tokens_as_token_ids` keys them by id."""
    c = zh_server.client.completions.create(model=MODEL, prompt=zh_prompt(), max_tokens=9, temperature=0, logprobs=5,
                                            extra_body={"ignore_eos": True})
    lp = c.choices[0].logprobs
    assert lp is not None and lp.top_logprobs is not None and lp.tokens is not None
    assert all(len(top) == 5 for top in lp.top_logprobs), lp.top_logprobs
    assert any(k.startswith("token_id:") for top in lp.top_logprobs for k in top)  # a collision happened
    for token, chosen, top in zip(lp.tokens, lp.token_logprobs or [], lp.top_logprobs, strict=True):
        assert top[token] == pytest.approx(chosen)  # greedy: the chosen token is the best, under its text
    ids = zh_server.client.completions.create(model=MODEL, prompt=zh_prompt(), max_tokens=9, temperature=0, logprobs=5,
                                              extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    got = ids.choices[0].logprobs
    assert got is not None and got.tokens is not None and got.top_logprobs is not None
    assert all(t.startswith("token_id:") for t in got.tokens)
    assert [int(t.split(":")[1]) for t in got.tokens] == \
        zh_server.client.completions.create(model=MODEL, prompt=zh_prompt(), max_tokens=9, temperature=0,
                                            extra_body={"ignore_eos": True, "return_token_ids": True}
                                            ).choices[0].model_extra["token_ids"]  # type: ignore[index]
    assert all(len(top) == 5 and all(k.startswith("token_id:") for k in top) for top in got.top_logprobs)


def test_ready_before_the_weights_move_into_huge_pages_and_they_move_while_idle(server: Server) -> None:
    """The replica is ready as soon as the weights are mapped; the copy into huge pages happens after, from
    the step thread, and /health says when it is done ("done" at once where there is nothing to move)."""
    deadline = time.monotonic() + 30
    while (layout := httpx.get(f"{server.url}/health").json()["layout"]) == "moving" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert layout == "done", "the weights did not finish moving within 30 s of idle time"
    assert server.client.completions.create(model=MODEL, prompt="GPU", max_tokens=3).usage.completion_tokens >= 1
    # (the bundled model's ~1 MB arena is under one 2 MiB page: test_paged.py checks the move itself)
