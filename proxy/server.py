"""How the proxy is served: the uvicorn options `serve` and the tests share, and the Date header they imply.

uvicorn adds its own `Date` and `Server` headers to every response, so a proxied answer would carry two of each
(the upstream's and ours). Both are off; `DateHeader` adds a Date only to responses that have none (our own:
errors, the management API, health), as RFC 9110 §6.6.1 asks of a server with a clock.
"""

from __future__ import annotations

import time
from email.utils import formatdate
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from proxy.config import Settings

UVICORN_OPTIONS: dict[str, Any] = {"server_header": False, "date_header": False}


def server_options(settings: Settings) -> dict[str, Any]:
    """The uvicorn.Config options `serve` and the tests both run with: no Date or Server header of uvicorn's own,
    and the bounds on what clients can hold (proxy/limits.py): a deadline for each request head (the protocol;
    the deadline itself comes from the app's lifespan state, the size bound from `h11_max_incomplete_event_size`,
    which bounds uvicorn's h11 protocol too), `limit_concurrency` and `timeout_keep_alive`."""
    from proxy.limits import HeadLimitsProtocol

    return {**UVICORN_OPTIONS, "http": HeadLimitsProtocol, "limit_concurrency": settings.max_client_connections,
            "timeout_keep_alive": settings.keep_alive_timeout,
            "h11_max_incomplete_event_size": settings.max_request_head_bytes}


class DateHeader:
    """ASGI middleware: a `Date` header on every HTTP response that does not already carry one."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._second = 0
        self._value = b""

    def now(self) -> bytes:
        second = int(time.time())
        if second != self._second:
            self._second, self._value = second, formatdate(second, usegmt=True).encode()
        return self._value

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def dated(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(name.lower() == b"date" for name, _ in headers):
                    message = {**message, "headers": [*headers, (b"date", self.now())]}
            await send(message)

        await self.app(scope, receive, dated)
