"""The engine in-process on the bundled model: batched equals alone, preemption, stop strings,
cancellation, static mode, and failures."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from inference_core.engine import (
    Delta,
    Engine,
    EngineConfig,
    EngineUnhealthy,
    RequestFailed,
    Result,
    SamplingParams,
)
from inference_core.faults import FaultSwitch
from inference_core.model.weights import load_model
from inference_core.telemetry import BusyTracker, Metrics
from inference_core.tokenizer import TextTokenizer

PROMPTS = ["The cluster is", "Why did the alert fire? Because the error rate went over the threshold for five",
           "GPU", "Memory usage must keep twenty percent of headroom below the limit, or the next large",
           "def add(a, b):", "Numbers: 0 1 2 3", "A", "Grafana draws the dashboards that platform engineers import"]


def make_engine(model_dir: Path, faults: FaultSwitch | None = None, **cfg: object) -> Engine:
    registry = CollectorRegistry()
    busy = BusyTracker()
    logger = logging.getLogger(f"test-engine-{id(registry)}")
    return Engine(load_model(model_dir), TextTokenizer.from_dir(model_dir), Metrics(registry, busy), logger, busy,
                  faults, EngineConfig(**cfg))  # type: ignore[arg-type]


def greedy(n: int = 12, **kw: object) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, **kw)  # type: ignore[arg-type]


async def run_all(engine: Engine, prompts: list[str], params: SamplingParams) -> list[Result]:
    return list(await asyncio.gather(*(engine.generate(engine.tokenizer.encode(p), params) for p in prompts)))


def test_batched_equals_each_request_alone(tiny_model_dir: Path) -> None:
    alone = make_engine(tiny_model_dir, max_num_seqs=1)
    batched = make_engine(tiny_model_dir, max_num_seqs=8, max_num_batched_tokens=24)  # forces chunked prefill
    try:
        ref = [asyncio.run(alone.generate(alone.tokenizer.encode(p), greedy())).token_ids for p in PROMPTS]
        got = asyncio.run(run_all(batched, PROMPTS, greedy()))
        assert [r.token_ids for r in got] == ref
        assert max(r.batch_size for r in got) > 1  # they really ran together
    finally:
        alone.shutdown()
        batched.shutdown()


def test_preemption_keeps_outputs_identical(tiny_model_dir: Path) -> None:
    roomy = make_engine(tiny_model_dir, max_num_seqs=8)
    tight = make_engine(tiny_model_dir, max_num_seqs=8, block_size=4, num_kv_blocks=128)
    try:
        ref = asyncio.run(run_all(roomy, PROMPTS, greedy(100)))
        got = asyncio.run(run_all(tight, PROMPTS, greedy(100)))
        assert [r.token_ids for r in got] == [r.token_ids for r in ref]
        assert tight.scheduler.num_preemptions > 0
    finally:
        roomy.shutdown()
        tight.shutdown()


def test_static_mode_gives_the_same_greedy_output(tiny_model_dir: Path) -> None:
    cont = make_engine(tiny_model_dir, max_num_seqs=4)
    static = make_engine(tiny_model_dir, max_num_seqs=4, mode="static")
    try:
        a = asyncio.run(run_all(cont, PROMPTS, greedy()))
        b = asyncio.run(run_all(static, PROMPTS, greedy()))
        assert [r.token_ids for r in a] == [r.token_ids for r in b]
    finally:
        cont.shutdown()
        static.shutdown()


def test_stop_strings_and_streamed_text(tiny_model_dir: Path) -> None:
    engine = make_engine(tiny_model_dir)
    try:
        full = asyncio.run(engine.generate(engine.tokenizer.encode(PROMPTS[0]), greedy(24))).text
        stop = full[len(full) // 2: len(full) // 2 + 2]
        assert stop and stop in full

        async def streamed() -> tuple[str, Result]:
            rid = engine.submit(engine.tokenizer.encode(PROMPTS[0]), greedy(24, stop=(stop,)))
            text, final = "", None
            async for item in engine.stream(rid):
                if isinstance(item, Delta):
                    text += item.text
                else:
                    final = item
            assert final is not None
            return text, final

        text, res = asyncio.run(streamed())
        assert res.finish_reason == "stop" and res.text == full[:full.find(stop)] == text
        assert stop not in text
    finally:
        engine.shutdown()


def test_cancelled_stream_frees_its_blocks(tiny_model_dir: Path) -> None:
    engine = make_engine(tiny_model_dir, max_num_seqs=2)

    async def scenario() -> Result:
        rid = engine.submit(engine.tokenizer.encode("A"), greedy(400))
        stream = engine.stream(rid)
        first = await stream.__anext__()
        assert isinstance(first, Delta)
        await stream.aclose()  # the client went away
        assert rid not in engine.live and not engine.scheduler.running
        return await engine.generate(engine.tokenizer.encode("GPU"), greedy(4))

    try:
        assert asyncio.run(scenario()).finish_reason in ("stop", "length")
        blocks = engine.scheduler.blocks
        assert not blocks.tables and blocks.num_free == blocks.num_blocks and blocks.usage == 0.0
    finally:
        engine.shutdown()


def test_oom_fails_one_batch_and_cuda_error_is_sticky(tiny_model_dir: Path) -> None:
    faults = FaultSwitch()
    engine = make_engine(tiny_model_dir, faults)
    ids = engine.tokenizer.encode("GPU")
    try:
        faults.arm(oom=True)
        with pytest.raises(RequestFailed, match="CUDA out of memory"):
            asyncio.run(engine.generate(ids, greedy(4)))
        assert engine.healthy
        assert asyncio.run(engine.generate(ids, greedy(4))).token_ids
        faults.arm(cuda_error=True)
        with pytest.raises(RequestFailed, match="illegal memory access"):
            asyncio.run(engine.generate(ids, greedy(4)))
        assert not engine.healthy

        async def submit() -> None:
            engine.submit(ids, greedy(4))

        with pytest.raises(EngineUnhealthy):
            asyncio.run(submit())
    finally:
        engine.shutdown()


def test_gpu_figures_come_from_nvml_when_present() -> None:
    """NVML cannot run here (no GPU): the stand-in module answers from a committed fixture."""
    from prometheus_client import generate_latest

    from inference_core.telemetry import DeviceCollector
    from tests.conftest import ROOT
    from tests.unit.fake_nvml import FakeNvml

    reg = CollectorRegistry()
    reg.register(DeviceCollector(BusyTracker(), nvml=FakeNvml(ROOT / "tests/fixtures/nvml/a100-remap-failure.json")))
    text = generate_latest(reg).decode()
    assert 'gpu_utilization{device="1"} 97.0' in text and 'memory_limit_bytes{device="0"} 8.589934592e+10' in text
    cpu = CollectorRegistry()
    cpu.register(DeviceCollector(BusyTracker(), nvml=FakeNvml(None, library_missing=True)))
    cpu_text = generate_latest(cpu).decode()
    assert "gpu_utilization" not in cpu_text  # a CPU's busy ratio is not GPU utilization (#13)
    assert "inference_engine_busy_percent 0.0" in cpu_text and "inference_engine_busy_percent" in text


def test_memory_limit_caps_the_plan_and_the_reported_limit(tmp_path: Path) -> None:
    """``--memory-limit`` on a CPU: the plan's total is the limit, what the process holds already counts
    against it, the host's own availability still bounds it, and memory_limit_bytes reports it."""
    from prometheus_client import generate_latest

    from inference_core.memory import GiB, device_memory
    from inference_core.telemetry import DeviceCollector
    from tests.unit.fake_nvml import FakeNvml

    proc, cgroup = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    cgroup.mkdir()  # no memory.max: an unlimited cgroup
    (proc / "meminfo").write_text("MemTotal: 25165824 kB\nMemAvailable: 20971520 kB\n")  # 24 GiB, 20 free
    (proc / "self" / "status").write_text("VmRSS: 524288 kB\n")  # the process holds 512 MiB
    cpu = torch.device("cpu")
    assert device_memory(cpu, proc, cgroup) == (24 * GiB, 20 * GiB)
    assert device_memory(cpu, proc, cgroup, limit=2 * GiB) == (2 * GiB, 2 * GiB - GiB // 2)
    (proc / "meminfo").write_text("MemTotal: 25165824 kB\nMemAvailable: 262144 kB\n")  # the host: 256 MiB free
    assert device_memory(cpu, proc, cgroup, limit=2 * GiB) == (2 * GiB, GiB // 4)
    assert device_memory(cpu, proc, cgroup, limit=64 * GiB)[0] == 24 * GiB  # above the host: no change
    reg = CollectorRegistry()
    reg.register(DeviceCollector(BusyTracker(), proc_root=proc, nvml=FakeNvml(None, library_missing=True),
                                 limit=2 * GiB))
    text = generate_latest(reg).decode()
    assert 'memory_limit_bytes{device="cpu"} 2.147483648e+09' in text
    assert 'memory_usage_bytes{device="cpu"} 5.36870912e+08' in text


OOM_KILLED = """
import sys, time
sys.path.insert(0, sys.argv[1])
from inference_core.faults import FaultSwitch
from inference_core.telemetry import rss_bytes
f = FaultSwitch(memory_limit=rss_bytes() + 64 * 2**20)
f.arm(leak_mb_per_s=400.0)
for _ in range(400):  # forward passes, 10 ms apart: 4 MiB each, the limit after about 16
    time.sleep(0.01)
    f.before_forward()
print("survived", f.state.leaked_bytes)
"""


def test_a_leak_past_the_memory_limit_meets_the_simulated_oom_killer() -> None:
    """The memory-leak fault grows resident memory at its rate while forward passes run; past --memory-limit
    the process is SIGKILLed, as the kernel's OOM killer kills a container over its limit."""
    import signal
    import subprocess
    import sys

    from tests.conftest import ROOT

    p = subprocess.run([sys.executable, "-c", OOM_KILLED, str(ROOT)], capture_output=True, text=True, timeout=60,
                       check=False)
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stdout, p.stderr)
    assert "memory limit exceeded" in p.stderr and "survived" not in p.stdout
