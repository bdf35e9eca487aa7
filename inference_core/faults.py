"""Fault injection for drills. Present only when a replica is started with faults enabled."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

CUDA_ERROR_MESSAGE = "CUDA error: an illegal memory access was encountered"


class InjectedCudaError(RuntimeError):
    """Stands in for torch's ``RuntimeError: CUDA error: ...`` raised inside the forward pass."""


@dataclass
class FaultState:
    cuda_error: bool = False
    latency_ms: float = 0.0


class FaultSwitch:
    """Armed faults fire inside the model's forward pass (a hook the engine installs)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.state = FaultState()

    def arm(self, cuda_error: bool | None = None, latency_ms: float | None = None) -> FaultState:
        with self._lock:
            if cuda_error is not None:
                self.state.cuda_error = cuda_error
            if latency_ms is not None:
                if latency_ms < 0:
                    raise ValueError("latency_ms must be >= 0")
                self.state.latency_ms = latency_ms
            return FaultState(**vars(self.state))

    def before_forward(self) -> None:
        """Forward hook: raise the armed CUDA error (once), or add latency."""
        with self._lock:
            fire = self.state.cuda_error
            self.state.cuda_error = False
            delay = self.state.latency_ms
        if fire:
            raise InjectedCudaError(CUDA_ERROR_MESSAGE)
        if delay:
            time.sleep(delay / 1000.0)
