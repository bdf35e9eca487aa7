"""Tensor parallelism over ``torch.distributed``: a transform of a built model, as in gpt-fast.

Column-parallel: q/k/v, gate and up (each rank keeps a slice of the output features: its heads, its
share of the MLP). Row-parallel: o and down (each rank multiplies its slice of the inputs; an
all-reduce sums the partial outputs). Embeddings, norms and the LM head are replicated. When there are
more ranks than key/value heads, each rank keeps the one key/value head its query heads use (vLLM's
replication). Backend: gloo on the CPU, nccl on GPUs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F

from inference_core.model.transformer import Attention, CausalLM, DecoderLayer


class RowParallelLinear(nn.Module):
    """A linear layer holding a slice of the input features; the partial outputs are all-reduced."""

    def __init__(self, weight: Tensor, bias: Tensor | None, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.group = group

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self.weight)
        dist.all_reduce(out, group=self.group)
        return out if self.bias is None else out + self.bias


def _rows(lin: nn.Linear, start: int, stop: int) -> nn.Linear:
    new = nn.Linear(lin.in_features, stop - start, bias=lin.bias is not None, device="meta")
    new.weight = nn.Parameter(lin.weight[start:stop].clone(), requires_grad=False)
    if lin.bias is not None:
        new.bias = nn.Parameter(lin.bias[start:stop].clone(), requires_grad=False)
    return new


def _shard_attention(attn: Attention, rank: int, world: int, group: dist.ProcessGroup | None) -> None:
    h, k, d = attn.h, attn.k, attn.d
    if h % world:
        raise ValueError(f"{h} attention heads cannot be split over {world} ranks")
    h_local = h // world
    if k % world == 0:
        k_local, k_first = k // world, rank * (k // world)
    elif world % k == 0:
        k_local, k_first = 1, (rank * h_local) // (h // k)  # the kv head this rank's query heads use
    else:
        raise ValueError(f"{k} key/value heads cannot be split or replicated over {world} ranks")
    attn.q_proj = _rows(attn.q_proj, rank * h_local * d, (rank + 1) * h_local * d)
    attn.k_proj = _rows(attn.k_proj, k_first * d, (k_first + k_local) * d)
    attn.v_proj = _rows(attn.v_proj, k_first * d, (k_first + k_local) * d)
    o = attn.o_proj
    attn.o_proj = RowParallelLinear(o.weight[:, rank * h_local * d:(rank + 1) * h_local * d].clone(),  # type: ignore[assignment,unused-ignore]
                                    o.bias, group)
    attn.h, attn.k = h_local, k_local


def shard_model(model: CausalLM, rank: int, world: int, group: dist.ProcessGroup | None = None) -> CausalLM:
    """Keep this rank's shard of every decoder layer (in place). The process group must be initialised."""
    for layer in model.model.layers:
        assert isinstance(layer, DecoderLayer)
        _shard_attention(layer.self_attn, rank, world, group)
        mlp = layer.mlp
        inter = mlp.gate_proj.out_features
        if inter % world:
            raise ValueError(f"intermediate size {inter} cannot be split over {world} ranks")
        step = inter // world
        mlp.gate_proj = _rows(mlp.gate_proj, rank * step, (rank + 1) * step)
        mlp.up_proj = _rows(mlp.up_proj, rank * step, (rank + 1) * step)
        down = mlp.down_proj
        mlp.down_proj = RowParallelLinear(down.weight[:, rank * step:(rank + 1) * step].clone(), down.bias,  # type: ignore[assignment,unused-ignore]
                                          group)
    return model


def init_process_group(rank: int, world: int, master_port: int, backend: str | None = None) -> str:
    """Join a process group on loopback; gloo on the CPU, nccl when CUDA is available."""
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{master_port}", rank=rank, world_size=world)
    return backend
