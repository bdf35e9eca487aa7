"""Checks that need an NVIDIA GPU (skipped with a printed reason elsewhere). Short, so that one prepared
run on a lent GPU machine covers them: `.venv/bin/pytest -m gpu tests/gpu`."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from prometheus_client import CollectorRegistry, generate_latest

from inference_core.model.weights import load_model
from inference_core.telemetry import BusyTracker, DeviceCollector
from inference_core.tensor_parallel import init_process_group, shard_model
from sentinel.netutil import free_port
from sentinel.runbooks.base import REGISTRY, Context, Status

pytestmark = pytest.mark.gpu
IDS = [[5, 17, 42, 7, 99, 3, 250, 11]]


def test_bf16_load_on_the_gpu_matches_fp32_on_the_cpu(tiny_model_dir: Path) -> None:
    cpu = load_model(tiny_model_dir)
    gpu = load_model(tiny_model_dir, device="cuda", dtype=torch.bfloat16)
    assert next(gpu.parameters()).device.type == "cuda" and next(gpu.parameters()).dtype == torch.bfloat16
    ids = torch.tensor(IDS)
    pos = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        want = cpu(ids, pos)
        got = gpu(ids.cuda(), pos.cuda()).float().cpu()
    assert (got - want).abs().max() <= 0.05
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


def test_engine_on_the_gpu_gives_the_cpu_greedy_text(tiny_model_dir: Path) -> None:
    import logging

    from inference_core.engine import Engine, EngineConfig, SamplingParams
    from inference_core.telemetry import Metrics
    from inference_core.tokenizer import TextTokenizer

    tok = TextTokenizer.from_dir(tiny_model_dir)
    outs = []
    for device in ("cpu", "cuda"):
        reg, busy = CollectorRegistry(), BusyTracker()
        eng = Engine(load_model(tiny_model_dir, device=device), tok, Metrics(reg, busy), logging.getLogger("gpu"),
                     busy, None, EngineConfig(max_num_seqs=4))
        try:
            outs.append(asyncio.run(eng.generate(tok.encode("The cluster is"),
                                                 SamplingParams(max_tokens=16, temperature=0))).token_ids)
        finally:
            eng.shutdown()
    assert outs[0] == outs[1]


def test_decode_steps_replay_as_cuda_graphs_and_give_the_eager_tokens(tiny_model_dir: Path) -> None:
    """Three concurrent greedy requests: with CUDA graphs (the default) decode steps are captured (the batch
    padded to 4) and replayed, and the tokens equal --enforce-eager's."""
    import logging

    from inference_core.engine import Engine, EngineConfig, SamplingParams
    from inference_core.telemetry import Metrics
    from inference_core.tokenizer import TextTokenizer

    tok = TextTokenizer.from_dir(tiny_model_dir)
    prompts = ["The cluster is", "Restart the replica when", "GPU memory"]
    outs = {}
    for graphs in (True, False):
        reg, busy = CollectorRegistry(), BusyTracker()
        eng = Engine(load_model(tiny_model_dir, device="cuda"), tok, Metrics(reg, busy), logging.getLogger("gpu"),
                     busy, None, EngineConfig(max_num_seqs=4, cuda_graphs=graphs))
        try:
            async def run(e: Engine = eng) -> list[list[int]]:
                res = await asyncio.gather(*(e.generate(tok.encode(p), SamplingParams(max_tokens=24, temperature=0))
                                             for p in prompts))
                return [r.token_ids for r in res]

            outs[graphs] = asyncio.run(run())
            if graphs:
                assert eng.graphs is not None and eng.graphs.failed is None, eng.graphs and eng.graphs.failed
                assert eng.graphs.replays > 0 and (4, 256) in eng.graphs.shapes
                assert all(s.graph is not None for s in eng.graphs.shapes.values())
            else:
                assert eng.graphs is None
        finally:
            eng.shutdown()
    assert outs[True] == outs[False]


def test_nvml_figures_and_runbook_checks() -> None:
    reg = CollectorRegistry()
    reg.register(DeviceCollector(BusyTracker()))
    text = generate_latest(reg).decode()
    assert 'gpu_utilization{device="0"}' in text and 'memory_limit_bytes{device="0"}' in text
    for name in ("gpu", "nvidia_smi", "cuda"):
        chk = REGISTRY[name]
        f = chk.run(chk.params.model_validate({}), Context())
        assert f.status in (Status.OK, Status.WARN), (name, f.summary)


def _rank(rank: int, world: int, port: int, model_dir: str, out: str) -> None:
    torch.cuda.set_device(rank)
    init_process_group(rank, world, port, "nccl")
    try:
        model = shard_model(load_model(Path(model_dir), device=f"cuda:{rank}"), rank, world)
        ids = torch.tensor(IDS, device=f"cuda:{rank}")
        with torch.no_grad():
            logits = model(ids, torch.arange(ids.shape[1], device=ids.device)[None])
        if rank == 0:
            torch.save(logits.cpu(), out)
    finally:
        dist.destroy_process_group()


def test_nccl_tensor_parallel(tiny_model_dir: Path, tmp_path: Path) -> None:
    world = torch.cuda.device_count()
    if world < 2:
        pytest.skip(f"nccl tensor parallel needs 2+ GPUs; this machine has {world}")
    world = 4 if world >= 4 else 2
    out = tmp_path / "logits.pt"
    mp.start_processes(_rank, args=(world, free_port(), str(tiny_model_dir), str(out)), nprocs=world,
                       start_method="spawn")
    with torch.no_grad():
        want = load_model(tiny_model_dir)(torch.tensor(IDS), torch.arange(len(IDS[0]))[None])
    assert (torch.load(out) - want).abs().max() <= 1e-4
