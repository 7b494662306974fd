"""Liveness and readiness."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse


async def healthz(request: Request) -> JSONResponse:
    """Liveness: 200 for as long as the process serves requests."""
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> JSONResponse:
    """Readiness: 200 once every part (upstream client, model, store) is loaded; 503 before and after."""
    parts: dict[str, bool] = getattr(request.app.state, "parts", {})
    ready = bool(parts) and all(parts.values())
    return JSONResponse({"status": "ready" if ready else "starting", "parts": parts},
                        status_code=200 if ready else 503)
