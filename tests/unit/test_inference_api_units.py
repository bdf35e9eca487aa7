"""inference_core.api's units before a model has loaded: the slot's 503s, the admin token, the ops routes'
documents while loading and after a failed load, and the route families the app composes (the routes with a
loaded engine run over real HTTP in tests/integration/test_inference_server.py)."""

from __future__ import annotations

import pytest
from fastapi import HTTPException
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from inference_core.api.app import create_app
from inference_core.api.ops import AdminAuth
from inference_core.api.slot import EngineSlot
from inference_core.apidoc import flat_routes
from inference_core.client import Health, Load, Ready
from inference_core.faults import FaultSwitch


def test_the_slot_answers_503_saying_why_until_the_engine_is_in() -> None:
    slot = EngineSlot()
    assert slot.loading
    with pytest.raises(HTTPException) as info:
        slot.require()
    assert (info.value.status_code, info.value.detail) == (503, "model is loading")
    slot.load_error = "WeightsError: model.safetensors: header too large"
    assert not slot.loading
    with pytest.raises(HTTPException, match="model failed to load: WeightsError"):
        slot.require()


def test_admin_auth_refuses_without_a_configured_token_and_a_wrong_one() -> None:
    with pytest.raises(HTTPException, match="admin endpoints need"):
        AdminAuth(None)("Bearer anything")
    with pytest.raises(HTTPException):
        AdminAuth("s3cret")("Bearer s3cre")
    AdminAuth("s3cret")("Bearer s3cret")  # no exception


def test_ops_and_model_routes_while_loading_and_after_a_failed_load() -> None:
    slot = EngineSlot()
    app = create_app(slot, "m", CollectorRegistry(), FaultSwitch(), admin_token="t")
    paths = {getattr(r, "path", "") for r in flat_routes(app.routes)}
    assert {"/health", "/ready", "/load", "/metrics", "/admin/drain", "/admin/faults", "/v1/models",
            "/v1/completions", "/v1/chat/completions"} <= paths
    with TestClient(app) as http:
        assert Health.model_validate(http.get("/health").json()).status == "loading"
        r = http.get("/ready")
        assert r.status_code == 503 and Ready.model_validate(r.json()).loading is True
        slot.stage = "loading the weights"  # what a progress display (sentinel up's) shows while it loads
        assert Ready.model_validate(http.get("/ready").json()).stage == "loading the weights"
        assert Health.model_validate(http.get("/health").json()).stage == "loading the weights"
        models = http.get("/v1/models")
        assert models.status_code == 503 and models.json()["error"]["message"] == "model is loading"
        drain = http.post("/admin/drain", headers={"Authorization": "Bearer t"})
        assert drain.status_code == 503  # nothing to drain before the engine is in
        assert http.post("/admin/drain").status_code == 401
        wrong = http.post("/health")  # the Allow header names the methods of routes in included routers too
        assert wrong.status_code == 405 and wrong.headers["allow"] == "GET"
        bad = http.post("/v1/completions", json={"model": "m", "prompt": [-1]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt.0"
        slot.load_error = "ValueError: no config.json"
        h = http.get("/health")
        assert h.status_code == 503 and Health.model_validate(h.json()).problem == "ValueError: no config.json"
        load = Load.model_validate(http.get("/load").json())
        assert not load.ready and load.load_error == "ValueError: no config.json"
