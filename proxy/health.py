"""Liveness and readiness."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse

from proxy.upstream import Upstream


async def healthz(request: Request) -> JSONResponse:
    """Liveness: 200 for as long as the process serves requests."""
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> JSONResponse:
    """Readiness: 200 once this process's own parts (model, store) are loaded, 503 before and after, and while
    the store cannot take writes in a way only a restart mends (its SQLite file deleted or replaced).

    The upstream is reported, not required: `parts.upstream` is whether the last exchange with it got an HTTP
    answer (refreshed at most every `upstream_check_seconds`, proxy/upstream.py), with the reason in
    `upstream.error`. Every replica shares the upstream, so a load balancer that dropped them all for its outage
    would turn clear 502s into refused connections and take the memory API down with it. `?require=upstream`
    makes it count (503 while unreachable) for deployments that want that."""
    parts: dict[str, bool] = dict(getattr(request.app.state, "parts", {}))
    upstream: Upstream | None = getattr(request.app.state, "upstream", None)
    seen = await upstream.reachability() if parts and upstream is not None else None
    local = bool(parts) and all(parts.values())
    body: dict[str, object] = {}
    memories = getattr(request.app.state, "memories", None)
    problem = await memories.store.problem() if local and memories is not None else None
    if problem:
        local, parts["store"] = False, False
        body["problem"] = problem
    if seen is not None:
        parts["upstream"] = bool(seen.reachable)
    required = request.query_params.get("require") == "upstream"
    ready = local and (not required or parts.get("upstream", False))
    status = "ready" if ready else "store-unavailable" if problem else "starting" if not local \
        else "upstream-unreachable"
    body = {"status": status, "parts": parts, "upstream": seen.to_dict() if seen else None, **body}
    return JSONResponse(body, status_code=200 if ready else 503)
