"""Tensor-parallel serving: rank 0 is the server's engine; ranks 1..N-1 are these worker processes.

Each rank loads the checkpoint, keeps its shard (``tensor_parallel.shard_model``) and its share of the
KV cache (its key/value heads), and runs the same forward passes in lockstep: rank 0 broadcasts every
message before it runs its own part, the all-reduces inside the row-parallel layers join the ranks,
and only rank 0 samples. Messages (``torch.distributed.broadcast_object_list`` from rank 0):

- ``("alloc", num_blocks, block_size)`` — (re)allocate this rank's KV pool;
- ``("forward", chunks)`` — one packed forward pass (the ``SeqChunk`` list of the step);
- ``("stop",)`` — leave.

Backend: gloo on the CPU, nccl on GPUs. A worker leaves when its parent process is gone, so a killed
server leaves no rank behind; the server exits when a worker dies (``Peers.watch``).

Run by the server: ``python -m inference_core.tp_worker --model-dir DIR --rank R --world N --port P``.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from inference_core.kv_cache import FlatBatch, PagedKVCache
from inference_core.model.quantize import quantize_int8, release_mapped_pages
from inference_core.model.transformer import Attention, CausalLM, device_of
from inference_core.model.weights import load_model
from inference_core.tensor_parallel import init_process_group, shard_model


def threads_per_rank(world: int) -> int:
    """On a CPU the ranks share the cores: each gets its part (at least one)."""
    return max(1, (os.cpu_count() or 1) // world)


def load_shard(model_dir: Path, rank: int, world: int, quantization: str | None) -> CausalLM:
    model = shard_model(load_model(model_dir), rank, world)
    release_mapped_pages(model)  # the shard was copied out of the memory map; the rest is not ours
    if quantization == "int8":
        quantize_int8(model)
    return model


def pool_for(model: CausalLM, num_blocks: int, block_size: int) -> PagedKVCache:
    attns: list[Attention] = [layer.self_attn for layer in model.model.layers]  # type: ignore[misc]
    devices = [device_of(a.k_proj) for a in attns]
    return PagedKVCache.allocate(num_blocks, block_size, attns[0].k, attns[0].d, next(model.parameters()).dtype,
                                 devices)


class Peers:
    """Rank 0's side: starts the workers, joins the group, broadcasts each message to them."""

    def __init__(self, model_dir: Path, world: int, quantization: str | None = None) -> None:
        self.world = world
        with socket.socket() as sock:  # a free port on loopback for the group's rendezvous
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        self.procs: list[subprocess.Popen[bytes]] = []
        for rank in range(1, world):
            cmd = [sys.executable, "-m", "inference_core.tp_worker", "--model-dir", str(model_dir), "--rank",
                   str(rank), "--world", str(world), "--port", str(port)]
            if quantization:
                cmd += ["--quantization", quantization]
            self.procs.append(subprocess.Popen(cmd))
        torch.set_num_threads(threads_per_rank(world))
        init_process_group(0, world, port)

    def send(self, *msg: Any) -> None:
        dist.broadcast_object_list([msg], src=0)

    def watch(self, on_death: Callable[[str], None]) -> None:
        """Call ``on_death`` when a worker exits (the group cannot go on without it)."""

        def run() -> None:
            while True:
                for rank, p in enumerate(self.procs, start=1):
                    try:
                        code = p.wait(timeout=0.5)
                    except subprocess.TimeoutExpired:
                        continue
                    on_death(f"tensor-parallel rank {rank} exited with {code}")
                    return

        threading.Thread(target=run, name="tp-watch", daemon=True).start()

    def close(self) -> None:
        try:
            self.send("stop")
        finally:
            for p in self.procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()


def _die_with_parent() -> None:
    """Leave when the server goes (PR_SET_PDEATHSIG would fire when the server's *thread* that started
    us ends, and it does, after loading: watch the parent process instead)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


@torch.inference_mode()
def serve(model: CausalLM) -> None:
    pool: PagedKVCache | None = None
    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        msg = box[0]
        if msg[0] == "stop":
            return
        if msg[0] == "alloc":
            pool = None  # free the old pool before the new one is taken
            pool = pool_for(model, msg[1], msg[2])
        elif msg[0] == "forward":
            assert pool is not None, "forward before alloc"
            model.forward_flat(FlatBatch(msg[1], pool.block_size), pool)
        else:
            raise ValueError(f"unknown message {msg[0]!r}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="inference_core.tp_worker", description=__doc__)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--quantization", choices=["int8"], default=None)
    args = p.parse_args(argv)
    _die_with_parent()
    torch.set_num_threads(threads_per_rank(args.world))
    init_process_group(args.rank, args.world, args.port)
    try:
        serve(load_shard(args.model_dir, args.rank, args.world, args.quantization))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
