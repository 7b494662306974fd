"""The management API: /memories/{user}/… (outside /v1, so it can never shadow an OpenAI path)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from proxy import logs
from proxy.auth import namespaced
from proxy.errors import BadRequest, NotFound
from proxy.memories import Cleaning, Memories
from proxy.models import Memory, NewMemory, check_name, check_user_id, happened_at, is_unicode, whole_number
from proxy.passthrough import off_loop, read_body
from proxy.restore import MEMORY_ID, parse_lines, restore, shown, with_status
from proxy.routing import SegmentRoute
from proxy.sessions import Sessions

Handler = Callable[[Request], Awaitable[Response]]
MAX_LIST = 1000


def json_response(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def guarded(handler: Handler) -> Handler:
    """Require the admin token or a proxy key when either is configured (proxy/auth.py); check the user id of
    every route (check_name: an id an earlier release stored can still be read, exported and erased; adding
    memories takes check_user_id, `new_user`) and put it in the caller's tenant namespace (`request.state.user`)."""
    async def guarded_handler(request: Request) -> Response:
        tenant = request.app.state.gate.manager(request)
        problem = check_name(request.path_params["user"])
        if problem:
            raise BadRequest(problem, param="user", code="invalid_user")
        request.state.user = namespaced(tenant, request.path_params["user"])
        logs.identified(request.state.user)
        return await handler(request)
    return guarded_handler


def new_user(request: Request) -> None:
    """Refuse to file new memories under an id that shows as another (check_user_id), though it may be read."""
    problem = check_user_id(request.path_params["user"])
    if problem:
        raise BadRequest(problem, param="user", code="invalid_user")


def memories_of(request: Request) -> tuple[Memories, str]:
    """The memory service and the store's id of the route's user."""
    memories: Memories | None = getattr(request.app.state, "memories", None)
    if memories is None:
        raise NotFound("memory is not enabled on this proxy")
    return memories, request.state.user


def int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    value = whole_number(raw, low, high)
    if value is None:
        raise BadRequest(f"'{name}' must be a whole number from {low} to {high}", param=name)
    return value


async def json_body(request: Request) -> Any:
    body = await read_body(request, request.app.state.settings.max_body_bytes)
    try:
        return await off_loop(len(body), lambda: orjson.loads(body))
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}", code="invalid_json") from None


def new_memory(item: Any, *, param: str = "text", max_chars: int | None = None,
               cleaning: Cleaning | None = None) -> NewMemory:
    """A NewMemory from `{"text", "category"?, "ttl_seconds"?}`, cleaned as every write path cleans
    (proxy/memories.py `Cleaning`), or a clear 400 (a text over `max_chars` is refused rather than cut: the caller
    sent it on purpose and should know; a secret in any field is refused)."""
    if not isinstance(item, dict):
        raise BadRequest("each memory must be an object with a 'text'", param=param)
    text, category, ttl = item.get("text"), item.get("category", "fact"), item.get("ttl_seconds")
    if not isinstance(text, str) or not text.strip():
        raise BadRequest("'text' must be a non-empty string", param="text")
    if max_chars is not None and len(text) > max_chars:
        raise BadRequest(f"'text' is {len(text)} characters long, over the limit of {max_chars}", param="text",
                         code="text_too_long")
    if not isinstance(category, str) or not category.strip() or len(category) > 64:
        raise BadRequest("'category' must be a short string", param="category")
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int | float) or not math.isfinite(ttl)
                            or ttl <= 0):
        raise BadRequest("'ttl_seconds' must be a positive number", param="ttl_seconds")
    when = happened_at(item.get("happened_at"))
    if item.get("happened_at") is not None and when is None:
        raise BadRequest("'happened_at' must be an ISO 8601 date or date-time (2024, 2024-05, 2024-05-12, "
                         "2024-05-12T18:30Z)", param="happened_at")
    cleaning = cleaning or Cleaning(max_chars or len(text))
    return cleaning.item(NewMemory(text=text, category=category, source="api", ttl_seconds=ttl, happened_at=when,
                                   keep_category="category" not in item), param="" if param == "text" else param)


@guarded
async def list_memories(request: Request) -> Response:
    memories, user = memories_of(request)
    limit = int_param(request, "limit", 100, 1, MAX_LIST)
    history = request.query_params.get("include_history", "").lower() in {"1", "true"}
    after = request.query_params.get("after") or None
    if after is not None and not MEMORY_ID.fullmatch(after):  # else every id sorts before it: all, silently
        raise BadRequest("'after' must be a memory id (the previous page's last_id: 20 hex digits)", param="after")
    page = await memories.store.list(user, limit + 1, before=after, include_history=history)
    data = [m.to_dict() for m in page[:limit]]
    return json_response({"object": "list", "data": data, "has_more": len(page) > limit,
                          "last_id": data[-1]["id"] if data else None})


@guarded
async def add_memories(request: Request) -> Response:
    new_user(request)
    memories, user = memories_of(request)
    body = await json_body(request)
    items = await asyncio.to_thread(  # checked off the event loop: ~0.25 ms an item, and an array may be long
        lambda: [new_memory(item, max_chars=memories.max_chars, cleaning=memories.cleaning)
                 for item in (body if isinstance(body, list) else [body])])
    if not items:
        raise BadRequest("give a memory object or a non-empty array of them")
    return listed_with_status(with_status(await memories.add(user, items)))


def listed_with_status(done: list[tuple[Memory, str]]) -> Response:
    """Each memory with what happened to it ("created", "updated", "unchanged"): 201 when any was created, else
    200 (every item was a near-duplicate, or already there, and updated the memory it repeats)."""
    return json_response({"object": "list", "data": shown(done)},
                         status=201 if any(status == "created" for _, status in done) else 200)


@guarded
async def search_memories(request: Request) -> Response:
    memories, user = memories_of(request)
    query = request.query_params.get("q", "")
    if not query.strip():
        raise BadRequest("'q' is required: the text to search for", param="q")
    k = int_param(request, "k", memories.k, 1, 100)
    kind = request.query_params.get("kind", "memory")
    if kind == "conversation":  # excerpts of past conversations (proxy/sessions.py)
        sessions: Sessions = request.app.state.sessions
        return json_response({"object": "list", "data": [c.to_dict() for c in await sessions.search(user, query, k)]})
    if kind != "memory":
        raise BadRequest("'kind' must be memory or conversation", param="kind")
    hits = await memories.recall(user, query, k=k, min_similarity=-1.0, profile=False)
    return json_response({"object": "list", "data": [h.to_dict() for h in hits]})


def memory_id(request: Request) -> str:
    """The route's memory id; one that could never have been stored is simply not found."""
    value: str = request.path_params["id"]
    if not is_unicode(value):
        raise NotFound(f"no memory {value!r} for this user", param="id")
    return value


async def _one(request: Request) -> tuple[Memories, str, Memory]:
    memories, user = memories_of(request)
    memory = await memories.store.get(user, memory_id(request))
    if memory is None:
        raise NotFound(f"no memory {request.path_params['id']!r} for this user", param="id")
    return memories, user, memory


@guarded
async def get_memory(request: Request) -> Response:
    return json_response((await _one(request))[2].to_dict())


@guarded
async def patch_memory(request: Request) -> Response:
    memories, user, memory = await _one(request)
    body = await json_body(request)
    if not isinstance(body, dict) or not {"text", "category", "ttl_seconds", "happened_at"} & body.keys():
        raise BadRequest("give at least one of 'text', 'category', 'ttl_seconds', 'happened_at'")
    patch = new_memory({"text": memory.text, "category": memory.category, **body}, max_chars=memories.max_chars,
                       cleaning=memories.cleaning)
    text = patch.text if "text" in body else None
    vector = (await memories.embedder.embed([text]))[0] if text else None
    expires_at = time.time() + patch.ttl_seconds if "ttl_seconds" in body and patch.ttl_seconds else None
    updated = await memories.store.update(user, memory.id, text=text, vector=vector,
                                          category=patch.category if "category" in body else None,
                                          expires_at=expires_at, happened_at=patch.happened_at)
    if updated is None:
        raise NotFound(f"no memory {memory.id!r} for this user", param="id")
    return json_response(updated.to_dict())


@guarded
async def delete_memory(request: Request) -> Response:
    memories, user = memories_of(request)
    deleted = await memories.store.forget(user, memory_id(request))
    if not deleted:
        raise NotFound(f"no memory {request.path_params['id']!r} for this user", param="id")
    return json_response({"id": request.path_params["id"], "object": "memory.deleted", "deleted": True})


@guarded
async def erase_user(request: Request) -> Response:
    memories, user = memories_of(request)
    deleted = await memories.store.erase(user)
    sessions = await request.app.state.sessions.erase(user)  # their conversations go too
    return json_response({"object": "user.erased", "user": request.path_params["user"], "deleted": deleted,
                          "sessions_deleted": sessions})


@guarded
async def export_memories(request: Request) -> Response:
    memories, user = memories_of(request)

    async def lines() -> AsyncIterator[bytes]:
        before = None
        while True:
            page = await memories.store.list(user, 500, before=before, include_history=True)
            for memory in page:
                yield orjson.dumps(memory.to_dict()) + b"\n"
            if len(page) < 500:
                return
            before = page[-1].id

    return StreamingResponse(lines(), media_type="application/x-ndjson")


@guarded
async def import_memories(request: Request) -> Response:
    """JSON Lines (as exported) or a JSON array; ids, dates and history are kept (proxy/restore.py), so importing
    the same file twice changes nothing."""
    new_user(request)
    memories, user = memories_of(request)
    body = await read_body(request, request.app.state.settings.max_body_bytes)
    items = await asyncio.to_thread(parse_lines, body)
    return listed_with_status(await restore(memories, user, items, lambda item, where: new_memory(
        item, param=where, max_chars=memories.max_chars, cleaning=memories.cleaning)))


routes = [
    SegmentRoute("/memories/{user}", list_memories, methods=["GET"]),
    SegmentRoute("/memories/{user}", add_memories, methods=["POST"]),
    SegmentRoute("/memories/{user}", erase_user, methods=["DELETE"]),
    SegmentRoute("/memories/{user}/search", search_memories, methods=["GET"]),
    SegmentRoute("/memories/{user}/export", export_memories, methods=["GET"]),
    SegmentRoute("/memories/{user}/import", import_memories, methods=["POST"]),
    SegmentRoute("/memories/{user}/{id}", get_memory, methods=["GET"]),
    SegmentRoute("/memories/{user}/{id}", patch_memory, methods=["PATCH"]),
    SegmentRoute("/memories/{user}/{id}", delete_memory, methods=["DELETE"]),
]
