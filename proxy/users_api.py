"""GET /users: the end users the store holds anything about, so that an operator (and the inspector page) can
find a user without knowing the id beforehand. Guarded like /memories (proxy/api.py): a proxy key lists only
its own tenant's users; the admin token lists the tenant named by `X-Memory-Tenant`, or the users outside any
tenant when it names none."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy.api import MAX_LIST, int_param, json_response
from proxy.auth import namespaced
from proxy.errors import BadRequest, NotFound
from proxy.memories import Memories
from proxy.models import TENANT_SEPARATOR, check_name


def text_param(request: Request, name: str) -> str:
    """An optional part of a user id from the query: empty, or what `check_name` accepts (no control
    characters, which keeps the caller inside its tenant's namespace)."""
    value = request.query_params.get(name, "")
    problem = check_name(value) if value else None
    if problem:
        raise BadRequest(f"'{name}' is not a valid user id or part of one: {problem}", param=name)
    return value


async def list_users(request: Request) -> Response:
    """`?limit` (1-1000, default 100), `?after` (the last id of the previous page), `?prefix` (ids starting
    with it). Ids in the store's text order (binary in SQLite, the database collation in PostgreSQL)."""
    tenant = request.app.state.gate.manager(request)
    memories: Memories | None = getattr(request.app.state, "memories", None)
    if memories is None:
        raise NotFound("memory is not enabled on this proxy")
    limit = int_param(request, "limit", 100, 1, MAX_LIST)
    prefix, after = text_param(request, "prefix"), text_param(request, "after")
    found = await memories.store.users(namespaced(tenant, prefix), limit + 1,
                                       after=namespaced(tenant, after) if after else None)
    data = [{"object": "user", "id": user.rpartition(TENANT_SEPARATOR)[2]} for user in found[:limit]]
    return json_response({"object": "list", "data": data, "has_more": len(found) > limit,
                          "last_id": data[-1]["id"] if data else None})


routes = [Route("/users", list_users, methods=["GET"])]
