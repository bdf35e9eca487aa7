"""Tensor parallelism with gloo on the CPU, 2 and 4 ranks: the same logits as one process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from inference_core.model.transformer import KVCache
from inference_core.model.weights import load_model
from inference_core.tensor_parallel import init_process_group, shard_model
from sentinel.netutil import free_port

IDS = [[5, 17, 42, 7, 99, 3, 250, 11]]


def _rank(rank: int, world: int, port: int, model_dir: str, out: str) -> None:
    torch.set_num_threads(1)
    init_process_group(rank, world, port, "gloo")
    try:
        model = shard_model(load_model(Path(model_dir)), rank, world)
        ids = torch.tensor(IDS)
        with torch.no_grad():
            full = model(ids, torch.arange(ids.shape[1])[None])
            cache = KVCache.empty(model.config.num_hidden_layers)  # and decoding with a cache
            model(ids[:, :6], torch.arange(6)[None], cache)
            step = model(ids[:, 6:], torch.tensor([[6, 7]]), cache)
        if rank == 0:
            torch.save({"full": full, "step": step}, out)
        dist.barrier()  # nobody leaves while a peer still talks to it
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_logits_equal_single_process(world: int, tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "logits.pt"
    mp.start_processes(_rank, args=(world, free_port(), str(tiny_model_dir), str(out)), nprocs=world,
                       start_method="spawn")
    got = torch.load(out)
    model = load_model(tiny_model_dir)
    ids = torch.tensor(IDS)
    with torch.no_grad():
        want = model(ids, torch.arange(ids.shape[1])[None])
    assert (got["full"] - want).abs().max().item() <= 1e-5
    assert (got["step"] - want[:, 6:]).abs().max().item() <= 1e-5
