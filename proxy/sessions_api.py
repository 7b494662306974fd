"""The sessions API: /sessions/{user}[/{session}], guarded like /memories (proxy/api.py).

Conversation chunks are searched through the memories API (`GET /memories/{user}/search?kind=conversation`), and
erasing a user there (`DELETE /memories/{user}`) erases their sessions too.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from proxy.api import MAX_LIST, guarded, int_param, json_response
from proxy.errors import NotFound
from proxy.routing import SegmentRoute
from proxy.sessions import Sessions, check_session
from proxy.store.sessions import SessionStore


def sessions_of(request: Request) -> tuple[Sessions, SessionStore, str]:
    """The session service, its store and the store's id of the route's user."""
    sessions: Sessions | None = getattr(request.app.state, "sessions", None)
    if sessions is None or sessions.store is None:
        raise NotFound("conversation memory is not available on this proxy's store")
    return sessions, sessions.store, request.state.user


def session_of(request: Request) -> str:
    """The route's session id, checked as the chat path checks it."""
    return check_session(request.path_params["session"], "session")


@guarded
async def list_sessions(request: Request) -> Response:
    _, store, user = sessions_of(request)
    limit = int_param(request, "limit", 100, 1, MAX_LIST)
    page = await store.list(user, limit + 1, before=request.query_params.get("after") or None)
    data = [session.to_dict() for session in page[:limit]]
    return json_response({"object": "list", "data": data, "has_more": len(page) > limit,
                          "last_id": data[-1]["id"] if data else None})


@guarded
async def get_session(request: Request) -> Response:
    """The session and its newest `limit` stored messages, oldest first."""
    _, store, user = sessions_of(request)
    name = session_of(request)
    limit = int_param(request, "limit", 100, 1, MAX_LIST)
    session, messages = await store.history(user, name, after_seq=0, limit=limit)
    if session is None:
        raise NotFound(f"no session {name!r} for this user", param="session")
    shown = [{"seq": m.seq, "created_at": m.created_at, "tokens": m.tokens, **m.message} for m in messages]
    return json_response({**session.to_dict(), "data": shown})


@guarded
async def delete_session(request: Request) -> Response:
    sessions, _, user = sessions_of(request)
    name = session_of(request)
    if not await sessions.delete(user, name):
        raise NotFound(f"no session {name!r} for this user", param="session")
    return json_response({"id": name, "object": "session.deleted", "deleted": True})


routes = [
    SegmentRoute("/sessions/{user}", list_sessions, methods=["GET"]),
    SegmentRoute("/sessions/{user}/{session}", get_session, methods=["GET"]),
    SegmentRoute("/sessions/{user}/{session}", delete_session, methods=["DELETE"]),
]
