"""Who the end user of a chat request is.

The user comes from the user header (default `X-Memory-User`), else the body's `user` field. The id is what the
store files memories under, so it is validated here, once, before anything else sees it.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from proxy.errors import BadRequest
from proxy.models import check_user_id


def identify(request: Request, body: dict[str, Any], header: str) -> str | None:
    """The end user: the user header, else the body's `user` field; None when neither names one."""
    user = request.headers.get(header)
    param = header
    if user is None:
        user, param = body.get("user"), "user"
        if user is None:
            return None
        if not isinstance(user, str):
            raise BadRequest("'user' must be a string", param="user", code="invalid_user")
    problem = check_user_id(user)
    if problem:
        raise BadRequest(problem, param=param, code="invalid_user")
    return user
