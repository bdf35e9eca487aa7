"""The operational endpoints: liveness (/health), readiness (/ready), load for balancers (/load), metrics,
and the admin endpoints (drain; the fault switch for drills, only where faults are enabled). Their
documents are ``inference_core.client``'s types, which every caller reads them with."""

from __future__ import annotations

import hmac
import os
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from inference_core.api.schemas import FaultRequest
from inference_core.api.slot import EngineSlot
from inference_core.client import Drain, Health, Load, Ready
from inference_core.faults import FaultSwitch


class AdminAuth:
    """``Authorization: Bearer <admin token>`` for /admin/*; no token configured: every call is refused."""

    def __init__(self, token: str | None) -> None:
        self.token = token

    def __call__(self, authorization: Annotated[str | None, Header()] = None) -> None:
        expected = f"Bearer {self.token}" if self.token else None
        if expected is None or not hmac.compare_digest((authorization or "").encode(), expected.encode()):
            raise HTTPException(401, "admin endpoints need 'Authorization: Bearer <admin token>'")


def ops_router(slot: EngineSlot, registry: CollectorRegistry, faults: FaultSwitch | None,
               admin_token: str | None) -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health() -> JSONResponse:
        engine = slot.engine
        if engine is None:  # alive while loading; a failed load is not healthy
            if slot.load_error:
                return JSONResponse(Health(status="unhealthy", load_error=slot.load_error).body(), status_code=503)
            return JSONResponse(Health(status="loading", pid=os.getpid(), stage=slot.stage).body())
        if engine.healthy:  # layout: "moving" while the weights move into huge pages after ready, then "done"
            return JSONResponse(Health(status="ok", pid=os.getpid(),
                                       layout="moving" if engine.layout_pending else "done").body())
        return JSONResponse(Health(status="unhealthy", cuda_error=engine.cuda_error, stalled=engine.stalled,
                                   pid=os.getpid()).body(), status_code=503)

    @router.get("/ready")
    async def ready() -> JSONResponse:
        engine = slot.engine
        if engine is None:
            return JSONResponse(Ready(ready=False, loading=slot.loading, load_error=slot.load_error,
                                      stage=slot.stage if slot.loading else None).body(), status_code=503)
        if not engine.healthy or engine.draining:
            return JSONResponse(Ready(ready=False, draining=engine.draining, healthy=engine.healthy).body(),
                                status_code=503)
        return JSONResponse(Ready(ready=True).body())

    @router.get("/load")
    async def load() -> JSONResponse:
        """What a load balancer needs, cheaply: whether to send anything, and the work outstanding here
        (tokens still to compute: prompts not yet prefilled plus completions not yet generated)."""
        engine = slot.engine
        if engine is None:
            return JSONResponse(Load(ready=False, loading=slot.loading, load_error=slot.load_error).body(),
                                status_code=503)
        doc = Load(ready=engine.healthy and not engine.draining, healthy=engine.healthy,
                   draining=engine.draining, **engine.load())
        return JSONResponse(doc.body(), status_code=200 if doc.ready else 503)

    @router.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    _admin_routes(router, slot, faults, AdminAuth(admin_token))
    return router


def _admin_routes(router: APIRouter, slot: EngineSlot, faults: FaultSwitch | None, admin: AdminAuth) -> None:
    @router.post("/admin/drain")
    async def drain(authorization: Annotated[str | None, Header()] = None) -> dict[str, Any]:
        admin(authorization)
        engine = slot.require()
        engine.draining = True  # new requests get 503 (and /ready 503, so balancers stop sending)
        return Drain(draining=True, in_flight=engine.in_flight).body()

    if faults is not None:
        switch = faults

        @router.post("/admin/faults")
        async def set_faults(body: FaultRequest,
                             authorization: Annotated[str | None, Header()] = None) -> dict[str, Any]:
            admin(authorization)
            return vars(switch.arm(**body.model_dump()))
