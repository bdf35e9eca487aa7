"""Sizing the KV cache from a memory budget (as vLLM's ``gpu_memory_utilization``), never from the
config's context length alone.

At load the engine measures what the model needs — the weights, the activation peak of a profiling
step of ``max_num_batched_tokens`` tokens, the runtime's own footprint — and gives the KV cache what
remains of the budget: ``memory_utilization`` × the device's memory, or an explicit ``kv_cache_memory``.
On a CPU host, where neither is given, the KV cache is what ``max_num_seqs`` sequences of a realistic
length need, capped at 4 GiB (``sizing.default_cpu_kv_bytes``, vLLM's CPU default): never a share of a host
that also runs other replicas, Prometheus and sentinel. ``plan_kv_cache`` is the pure arithmetic; ``device_memory`` and
``PeakMemory`` are the measurements.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from inference_core.sizing import GiB, default_cpu_kv_bytes, fmt_bytes, kv_bytes_per_token, parse_bytes
from inference_core.telemetry import memory_limit_bytes

__all__ = ["GiB", "KVCacheTooSmall", "KVPlan", "PeakMemory", "device_memory", "fmt_bytes", "kv_bytes_per_token",
           "parse_bytes", "plan_kv_cache"]

log = logging.getLogger(__name__)


class KVCacheTooSmall(RuntimeError):
    """The budget leaves no room for the KV cache a single sequence needs."""


def device_memory(device: torch.device, proc_root: Path = Path("/proc"),
                  cgroup_root: Path = Path("/sys/fs/cgroup"), limit: int | None = None) -> tuple[int, int]:
    """(total, available) bytes: the GPU's, or the host's (cgroup limit and MemAvailable) on a CPU, where
    ``limit`` (``--memory-limit``) caps both: what this process holds already counts against it."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(total), int(free)
    total = memory_limit_bytes(proc_root, cgroup_root)
    held = None
    if limit is not None and limit < total:
        total = limit
        for line in (proc_root / "self" / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                held = int(line.split()[1]) * 1024
    avail = total
    for line in (proc_root / "meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            avail = min(total, int(line.split()[1]) * 1024)
    try:
        current = int((cgroup_root / "memory.current").read_text())
        avail = min(avail, total - current)  # the cgroup's own headroom
    except (OSError, ValueError):
        pass
    if held is not None:  # --memory-limit: what this process holds counts against it (the host may have less)
        avail = min(avail, total - held)
    return total, max(0, avail)


class PeakMemory:
    """The peak memory a block of work adds: CUDA's allocator statistics, or on a CPU the process's
    high-water mark (VmHWM), reset through ``/proc/self/clear_refs`` first. ``bytes`` is None where
    the kernel does not let the mark be reset (the caller then estimates)."""

    def __init__(self, device: torch.device, proc_root: Path = Path("/proc")) -> None:
        self.device = device
        self.proc_root = proc_root
        self.bytes: int | None = None
        self._start = 0

    def _status(self, key: str) -> int:
        for line in (self.proc_root / "self" / "status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        try:
            (self.proc_root / "self" / "clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS
            self._start = self._status("VmRSS")
        except (OSError, KeyError):
            self._start = -1
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = int(torch.cuda.max_memory_allocated(self.device)) - self._start
        elif self._start >= 0:
            self.bytes = max(0, self._status("VmHWM") - self._start)


@dataclass(frozen=True)
class KVPlan:
    """What the KV cache gets, and why."""

    device: str
    total_bytes: int
    budget_bytes: int          # memory_utilization × total, or the explicit KV size
    weights_bytes: int
    activation_bytes: int
    runtime_bytes: int
    kv_budget_bytes: int
    bytes_per_token: int
    reserve_per_token: int     # transient memory per cached token (a decode step's gather of one layer)
    block_size: int
    num_blocks: int
    max_model_len: int
    max_num_seqs: int
    notes: tuple[str, ...] = ()

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def kv_bytes(self) -> int:
        return self.num_tokens * self.bytes_per_token

    @property
    def full_length_sequences(self) -> float:
        return self.num_tokens / self.max_model_len

    def describe(self) -> str:
        lines = [
            f"memory plan on {self.device}: total {fmt_bytes(self.total_bytes)}, budget {fmt_bytes(self.budget_bytes)}",
            f"  weights {fmt_bytes(self.weights_bytes)}, activation peak {fmt_bytes(self.activation_bytes)}, "
            f"runtime {fmt_bytes(self.runtime_bytes)}",
            f"  KV cache {fmt_bytes(self.kv_bytes)}: {self.num_blocks} blocks x {self.block_size} tokens = "
            f"{self.num_tokens} tokens ({self.bytes_per_token} B/token, plus {self.reserve_per_token} B/token "
            f"reserved for a decode step's gather); max_model_len {self.max_model_len}: "
            f"{self.full_length_sequences:.1f} full-length sequences (max_num_seqs {self.max_num_seqs})",
        ]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def _kv_budget(notes: list[str], device: str, total_bytes: int, available_bytes: int, used: int, activation_bytes: int,
               per_token: int, max_num_seqs: int, want_len: int, memory_utilization: float | None,
               kv_cache_memory: int | None) -> tuple[int, int]:
    """(the memory budget, the part of it for the KV cache): the CPU default, ``--kv-cache-memory``, or vLLM's
    ``--memory-utilization`` share of the device less what is resident; never past what is available now."""
    if kv_cache_memory is None and memory_utilization is None and device.startswith("cpu"):
        default = default_cpu_kv_bytes(per_token, max_num_seqs, want_len)
        headroom = max(0, available_bytes - activation_bytes)
        notes.append(f"CPU default: KV cache for {max_num_seqs} sequences of {default // per_token // max_num_seqs} "
                     f"tokens, at most 4 GiB (--kv-cache-memory or --memory-utilization to change it)")
        if default > headroom:
            notes.append(f"KV cache lowered from {fmt_bytes(default)} to the {fmt_bytes(headroom)} this host has "
                         "available now")
        budget = kv_budget = min(default, headroom)
    elif kv_cache_memory is not None:
        budget = kv_cache_memory
        kv_budget = kv_cache_memory
        if kv_cache_memory > available_bytes:
            notes.append(f"--kv-cache-memory {fmt_bytes(kv_cache_memory)} exceeds the {fmt_bytes(available_bytes)} "
                         "available now")
    else:
        memory_utilization = 0.9 if memory_utilization is None else memory_utilization
        if not 0.0 < memory_utilization <= 1.0:
            raise KVCacheTooSmall(f"--memory-utilization {memory_utilization} must be in (0, 1]")
        budget = int(memory_utilization * total_bytes)
        kv_budget = budget - used
        headroom = available_bytes - activation_bytes  # weights and runtime are resident already
        if kv_budget > headroom:
            notes.append(f"KV budget lowered from {fmt_bytes(kv_budget)} to the {fmt_bytes(max(headroom, 0))} "
                         "this host has available now")
            kv_budget = headroom
    return budget, kv_budget


def plan_kv_cache(*, device: str, total_bytes: int, available_bytes: int, weights_bytes: int, activation_bytes: int,
                  runtime_bytes: int, bytes_per_token: int, block_size: int, max_num_seqs: int,
                  reserve_per_token: int = 0,
                  config_max_len: int, max_model_len: int | None = None, memory_utilization: float | None = None,
                  kv_cache_memory: int | None = None) -> KVPlan:
    """Blocks for the KV cache within the budget; lowers the default max_model_len to what fits (with a
    note) and refuses (``KVCacheTooSmall``) when not even one sequence of an asked-for length fits.
    The pool never grows past what ``max_num_seqs`` full-length sequences can use."""
    notes: list[str] = []
    if max_model_len is not None and max_model_len > config_max_len:
        raise KVCacheTooSmall(f"--max-model-len {max_model_len} exceeds the model's context length {config_max_len}")
    want_len = max_model_len or config_max_len
    budget, kv_budget = _kv_budget(notes, device, total_bytes, available_bytes, weights_bytes + activation_bytes
                                   + runtime_bytes, activation_bytes, bytes_per_token + reserve_per_token,
                                   max_num_seqs, want_len, memory_utilization, kv_cache_memory)
    blocks = max(kv_budget, 0) // ((bytes_per_token + reserve_per_token) * block_size)
    flag = "--memory-utilization (or --kv-cache-memory)" if kv_cache_memory is None else "--kv-cache-memory"
    numbers = (f"budget {fmt_bytes(budget)} on {device} ({fmt_bytes(total_bytes)} total): weights "
               f"{fmt_bytes(weights_bytes)}, activation peak {fmt_bytes(activation_bytes)}, runtime "
               f"{fmt_bytes(runtime_bytes)}, leaving {fmt_bytes(max(kv_budget, 0))} for the KV cache at "
               f"{bytes_per_token} B/token = {blocks * block_size} tokens")
    if blocks == 0:
        raise KVCacheTooSmall(f"no room for a KV cache: {numbers}; raise {flag} or use a smaller model")
    if blocks * block_size < want_len:
        if max_model_len is not None:
            raise KVCacheTooSmall(f"one sequence of --max-model-len {max_model_len} tokens does not fit: {numbers}; "
                                  f"lower --max-model-len or raise {flag}")
        notes.append(f"max_model_len lowered from the config's {config_max_len} to {blocks * block_size}: "
                     "that is what the KV budget holds")
        want_len = blocks * block_size
    useful = max_num_seqs * -(-want_len // block_size)
    if blocks > useful:
        notes.append(f"KV cache capped at {useful} blocks: what {max_num_seqs} full-length sequences can use")
        blocks = useful
    return KVPlan(device, total_bytes, budget, weights_bytes, activation_bytes, runtime_bytes, max(kv_budget, 0),
                  bytes_per_token, reserve_per_token, block_size, blocks, want_len, max_num_seqs, tuple(notes))
