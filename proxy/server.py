"""How the proxy is served: the uvicorn options `serve` and the tests share, and the Date header they imply.

uvicorn adds its own `Date` and `Server` headers to every response, so a proxied answer would carry two of each
(the upstream's and ours). Both are off; `DateHeader` adds a Date only to responses that have none (our own:
errors, the management API, health), as RFC 9110 §6.6.1 asks of a server with a clock.
"""

from __future__ import annotations

import time
from email.utils import formatdate
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

UVICORN_OPTIONS: dict[str, Any] = {"server_header": False, "date_header": False}


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
