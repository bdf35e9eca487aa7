"""Fault injection for drills. Present only when a replica is started with faults enabled.

Faults: a CUDA error raised inside the forward pass (sticky: the replica turns unhealthy, as a real
illegal-address error leaves the CUDA context unusable), added latency per forward pass, a hang (the
step loop stops until cleared), a crash (the process exits), an out-of-memory error (one batch fails),
a memory leak (memory grows by ``leak_mb_per_step`` every step, or at ``leak_mb_per_s`` while steps run), a
plain exception inside the
forward pass (``step_error``: one batch fails, the engine goes on) and a bug in the step loop's own
bookkeeping (``engine_bug``: the engine fails every request, /health fails and the process exits).

A leaking replica started with ``--memory-limit`` meets the OOM killer, simulated: once its resident
memory passes the limit it is killed with SIGKILL, as the kernel kills a container over its cgroup's
limit. The memory-leak drill is won only when sentinel restarts the replica before that happens.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

from inference_core.telemetry import rss_bytes

CUDA_ERROR_MESSAGE = "CUDA error: an illegal memory access was encountered"
OOM_MESSAGE = "CUDA out of memory. Tried to allocate 2.00 GiB (injected by the fault switch)"


class InjectedCudaError(RuntimeError):
    """Stands in for torch's ``RuntimeError: CUDA error: ...`` raised inside the forward pass."""


class InjectedOutOfMemory(RuntimeError):
    """Stands in for ``torch.cuda.OutOfMemoryError``."""


class InjectedStepError(ValueError):
    """Stands in for any other exception inside the forward pass (a shape bug, a bad input)."""


class InjectedEngineBug(AssertionError):
    """Stands in for a bug in the step loop's bookkeeping, outside the forward pass."""


@dataclass
class FaultState:
    cuda_error: bool = False
    latency_ms: float = 0.0
    hang: bool = False
    crash: bool = False
    oom: bool = False
    leak_mb_per_step: float = 0.0
    leak_mb_per_s: float = 0.0
    leaked_bytes: int = 0
    step_error: bool = False
    engine_bug: bool = False


@dataclass
class FaultSwitch:
    """Armed faults fire inside the model's forward pass (a hook the engine installs)."""

    state: FaultState = field(default_factory=FaultState)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    memory_limit: int | None = None  # --memory-limit: past it, a leaking replica is killed (the OOM killer)
    _leak: list[bytearray] = field(default_factory=list)
    _leak_at: float = 0.0

    def arm(self, **changes: float | bool | None) -> FaultState:
        with self._lock:
            for name, value in changes.items():
                if value is None:
                    continue
                if name not in {"cuda_error", "latency_ms", "hang", "crash", "oom", "leak_mb_per_step", "leak_mb_per_s",
                                "step_error", "engine_bug"}:
                    raise ValueError(f"unknown fault {name!r}")
                if isinstance(value, float | int) and not isinstance(value, bool) and value < 0:
                    raise ValueError(f"{name} must be >= 0")
                setattr(self.state, name, value)
                if name == "leak_mb_per_s":
                    self._leak_at = time.monotonic()  # the rate counts from now
            return FaultState(**vars(self.state))

    def before_forward(self) -> None:
        """Forward hook: fire whatever is armed."""
        with self._lock:
            st = self.state
            cuda, oom, crash, error = st.cuda_error, st.oom, st.crash, st.step_error
            st.cuda_error = st.oom = st.step_error = False
            delay, leak = st.latency_ms, st.leak_mb_per_step
            if st.leak_mb_per_s:
                now = time.monotonic()
                leak += st.leak_mb_per_s * (now - self._leak_at)
                self._leak_at = now
            if leak:
                self._leak.append(_resident(int(leak * 2**20)))
                st.leaked_bytes += int(leak * 2**20)
        if leak and self.memory_limit is not None and rss_bytes() > self.memory_limit:
            print(f"memory limit exceeded: resident {rss_bytes() / 2**20:.0f} MiB > --memory-limit "
                  f"{self.memory_limit / 2**20:.0f} MiB; killed (the kernel's OOM killer, simulated by the fault "
                  "switch)", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        if crash:
            os._exit(70)  # the process dies mid-step, as after a fatal driver error
        while self.state.hang:
            time.sleep(0.05)
        if cuda:
            raise InjectedCudaError(CUDA_ERROR_MESSAGE)
        if oom:
            raise InjectedOutOfMemory(OOM_MESSAGE)
        if error:
            raise InjectedStepError("injected exception inside the forward pass")
        if delay:
            time.sleep(delay / 1000.0)

    def before_step(self) -> None:
        """Step hook, outside the forward pass: the engine-bug drill fires here (once)."""
        with self._lock:
            bug, self.state.engine_bug = self.state.engine_bug, False
        if bug:
            raise InjectedEngineBug("injected bug in the step loop's bookkeeping")


def _resident(n: int) -> bytearray:
    """``n`` bytes that count in the resident set: every page written once."""
    buf = bytearray(n)
    buf[::4096] = b"\xa5" * len(range(0, n, 4096))
    return buf
