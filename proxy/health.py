"""Liveness and readiness."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse


async def healthz(request: Request) -> JSONResponse:
    """Liveness: 200 for as long as the process serves requests."""
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> JSONResponse:
    """Readiness: 200 once every part (upstream client, model, store) is loaded; 503 before and after, and while
    the store cannot take writes in a way only a restart mends (its SQLite file deleted or replaced)."""
    parts: dict[str, bool] = dict(getattr(request.app.state, "parts", {}))
    ready = bool(parts) and all(parts.values())
    body: dict[str, object] = {"status": "ready" if ready else "starting", "parts": parts}
    memories = getattr(request.app.state, "memories", None)
    problem = await memories.store.problem() if ready and memories is not None else None
    if problem:
        ready, parts["store"] = False, False
        body.update(status="store-unavailable", problem=problem)
    return JSONResponse(body, status_code=200 if ready else 503)
