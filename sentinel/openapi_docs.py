"""The OpenAPI documents of both APIs, generated from the apps themselves (checked in under deploy/openapi/
and kept in step by a test), for clients, gateways and schemathesis."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry


def sentinel_spec() -> dict[str, Any]:
    from sentinel.alerts.store import Store
    from sentinel.api import FixedControls, authenticator, create_app
    from sentinel.rules.evaluator import Evaluator

    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "s.db")
        app = create_app(Evaluator(store, None, None), store, CollectorRegistry(), FixedControls(),
                         authenticator(None))
        spec: dict[str, Any] = app.openapi()
        store.close()
    return spec


def inference_spec() -> dict[str, Any]:
    from inference_core.api.app import create_app
    from inference_core.api.slot import EngineSlot

    spec: dict[str, Any] = create_app(EngineSlot(), "deepseek-tiny", CollectorRegistry()).openapi()
    return spec


def render(spec: dict[str, Any]) -> str:
    return json.dumps(spec, indent=2, sort_keys=True) + "\n"


def write(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, spec in (("sentinel.json", sentinel_spec()), ("inference.json", inference_spec())):
        path = out_dir / name
        path.write_text(render(spec))
        paths.append(path)
    return paths
