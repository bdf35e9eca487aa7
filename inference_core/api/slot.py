"""The engine once the model has loaded, for the routes: typed, and a 503 until then."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import HTTPException

if TYPE_CHECKING:
    from inference_core.engine import Engine


class EngineSlot:
    """The engine once the model has loaded. Until then (or after a failed load) every route that needs it
    answers 503 (``require``), while /health stays up (liveness) and /ready says why it is not ready."""

    def __init__(self, engine: Engine | None = None) -> None:
        self.engine = engine
        self.load_error: str | None = None
        self.stage: str | None = None  # while loading: what the load is doing now (for progress displays)

    @property
    def loading(self) -> bool:
        return self.engine is None and self.load_error is None

    def require(self) -> Engine:
        """The engine, or the 503 that says why there is none yet."""
        if self.engine is None:
            raise HTTPException(503, f"model failed to load: {self.load_error}" if self.load_error else
                                "model is loading")
        return self.engine
