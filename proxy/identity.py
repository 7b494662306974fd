"""Who the end user of a chat request is.

The user comes from the user header (default `X-Memory-User`), else the body's `user` field. The id is what the
store files memories under, so it is validated here, once, before anything else sees it, and put in the
caller's tenant namespace (proxy/auth.py).
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from proxy import logs
from proxy.auth import Gate, namespaced
from proxy.errors import BadRequest, Unauthorized
from proxy.models import check_user_id


def identify(request: Request, body: dict[str, Any], header: str, gate: Gate, tenant: str | None) -> str | None:
    """The store's id of the end user: the user header, else the body's `user` field (unless users must be
    signed), within the caller's tenant; None when no one is named."""
    user = header_text(request.headers.get(header))
    param = header
    if user is None:
        if gate.signing_secret:
            return None  # an end user can write anything in `user`: only the gateway's signed header counts
        user, param = body.get("user"), "user"
        if user is None:
            return None
        if not isinstance(user, str):
            raise BadRequest("'user' must be a string", param="user", code="invalid_user")
    problem = check_user_id(user)
    if problem:
        raise BadRequest(problem, param=param, code="invalid_user")
    if not gate.signed(request, user):
        raise Unauthorized(f"{header} needs a valid X-Memory-User-Signature", code="invalid_signature")
    logs.identified(namespaced(tenant, user))  # the request's log lines name the user from here on
    return namespaced(tenant, user)


def header_text(value: str | None) -> str | None:
    """A header value as the client meant it. Starlette decodes header bytes as Latin-1; clients send a
    non-ASCII user id as UTF-8, and it must name the same user as the body's `user` or the API's path does.
    Bytes that are not UTF-8 keep their Latin-1 reading (RFC 9110 §5.5: opaque octets)."""
    if value is None or value.isascii():
        return value
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeDecodeError:
        return value
