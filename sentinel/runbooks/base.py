"""What every check shares: its result, the context it reads through, and the registry of checks."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict


class Status(enum.StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"
    SKIPPED = "skipped"


SEVERITY = {Status.SKIPPED: 0, Status.OK: 0, Status.WARN: 1, Status.FAIL: 2}


@dataclass
class Finding:
    """A check's answer: a status, a one-line summary, the evidence behind it and what to do."""

    status: Status
    summary: str
    evidence: dict[str, Any] = field(default_factory=dict)
    remedy: str | None = None


@dataclass(frozen=True)
class Context:
    """Where checks read from. Every root is injectable so tests use committed fixture files.

    Alert labels are carried for the report only: no check reads them into a command or a path.
    """

    proc: Path = Path("/proc")
    sys: Path = Path("/sys")
    dev: Path = Path("/dev")
    var_log: Path = Path("/var/log")
    nvidia_smi: str = "nvidia-smi"
    dmesg: str = "dmesg"
    model_dir: Path | None = None
    replicas: tuple[tuple[str, str], ...] = ()          # (name, base URL)
    replica_logs: tuple[Path, ...] = ()
    prometheus_url: str | None = None
    nvml: Any = None                                    # the pynvml module, or a stand-in in tests
    torch: Any = None                                   # the torch module, or a stand-in in tests
    logs: Any = None                                    # the log store (``search``): Elasticsearch or local
    alert_labels: dict[str, str] = field(default_factory=dict)


class Params(BaseModel):
    """Base of a check's parameters: validated when the runbook loads."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Check:
    name: str
    params: type[Params]
    run: Callable[[Any, Context], Finding]
    doc: str


REGISTRY: dict[str, Check] = {}


def check(name: str, params: type[Params]) -> Callable[[Callable[[Any, Context], Finding]],
                                                        Callable[[Any, Context], Finding]]:
    """Register a check function under ``name`` with its parameter model."""

    def deco(fn: Callable[[Any, Context], Finding]) -> Callable[[Any, Context], Finding]:
        REGISTRY[name] = Check(name, params, fn, (fn.__doc__ or "").strip().splitlines()[0])
        return fn

    return deco
