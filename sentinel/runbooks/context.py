"""Builds the checks' Context from the settings and, when sentinel is running, its up.json."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sentinel import logstore
from sentinel.runbooks.base import Context
from sentinel.settings import Settings

BUNDLED_MODEL = Path("models") / "deepseek-tiny"


def running_sentinel(state_dir: Path) -> dict[str, Any] | None:
    """The up.json of a live sentinel in ``state_dir`` (None when absent or its process is gone)."""
    try:
        doc: dict[str, Any] = json.loads((state_dir / "up.json").read_text())
    except (OSError, ValueError):
        return None
    pid = doc.get("pid")
    if isinstance(pid, int) and not os.path.exists(f"/proc/{pid}"):
        return None
    return doc


def log_store(settings: Settings) -> Any:
    """The configured log store for reading (Elasticsearch, else the local store if it exists), or None."""
    try:
        return logstore.open(settings)
    except logstore.NoLogStore:
        return None


def build_context(settings: Settings, alert_labels: dict[str, str] | None = None,
                  up: dict[str, Any] | None = None, logs: Any = None) -> Context:
    d = settings.diagnostics
    state = settings.state_dir.resolve()
    model_dir = settings.replicas.model_dir
    if model_dir is None and (state / BUNDLED_MODEL / "config.json").exists():
        model_dir = state / BUNDLED_MODEL
    if up is None:
        up = running_sentinel(state)
    replicas = tuple((r["name"], r["url"]) for r in (up or {}).get("replicas", []))
    files = tuple(Path(r["logFile"]) for r in (up or {}).get("replicas", []) if r.get("logFile"))
    return Context(proc=d.proc_root, sys=d.sys_root, dev=d.dev_root, var_log=d.var_log, nvidia_smi=d.nvidia_smi,
                   dmesg=d.dmesg, model_dir=model_dir, replicas=replicas, replica_logs=files,
                   prometheus_url=(up or {}).get("prometheus") or settings.prometheus.url,
                   alert_labels=dict(alert_labels or {}), logs=logs if logs is not None else log_store(settings))
