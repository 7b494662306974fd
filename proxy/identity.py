"""Who the end user of a chat request is.

The user comes from the user header (default `X-Memory-User`), else the body's `user` field. The id is what the
store files memories under, so it is validated here, once, before anything else sees it, and put in the
caller's tenant namespace (proxy/auth.py).
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from proxy import logs
from proxy.auth import Gate, namespaced, one_header
from proxy.errors import BadRequest, Unauthorized
from proxy.models import check_user_id


def identify(request: Request, body: dict[str, Any], header: str, gate: Gate, tenant: str | None) -> str | None:
    """The store's id of the end user: the user header, else the body's `user` field (unless users must be
    signed), within the caller's tenant; None when no one is named.

    The header is ours: a malformed one (not UTF-8, sent twice, not a user id) is a 400 (BadRequest), a missing
    signature a 401 (Unauthorized); an empty one names no one (an app's anonymous user). The body's `user` is the
    upstream's field (OpenAI's end-user id): a value no memories can be filed under ("", not a string, too long)
    names no one and refuses nothing, so the request goes on without memory (`unusable_user` tells the chat path
    to say so)."""
    user = one_header(request, header, code="invalid_user")  # sent twice, or not UTF-8: 400
    param = header
    if user is not None and not user.strip(" \t"):  # HTTP's own blank (RFC 9110 OWS); any other is checked below
        user = None
    if user is None:
        if gate.signing_secret:
            return None  # an end user can write anything in `user`: only the gateway's signed header counts
        given = body.get("user")
        if given is None or unusable_user(body):
            return None
        user, param = given, "user"
    problem = check_user_id(user)
    if problem:
        raise BadRequest(problem, param=param, code="invalid_user")
    if not gate.signed(request, user):
        raise Unauthorized(f"{header} needs a valid X-Memory-User-Signature", code="invalid_signature")
    logs.identified(namespaced(tenant, user))  # the request's log lines name the user from here on
    return namespaced(tenant, user)


def unusable_user(body: dict[str, Any]) -> bool:
    """Whether the body names a `user` no memories can be filed under: present, but not a string, blank, or not
    a user id (proxy/models.py: check_user_id: over 256 characters, control characters, invisible marks)."""
    user = body.get("user")
    if user is None:
        return False
    return not isinstance(user, str) or check_user_id(user) is not None
