"""What a client may send and how slowly: bounds on the request head, the body, the path and the connections.

    HeadTimeoutProtocol   uvicorn's httptools protocol plus a deadline for the request head: from the connection
                          (or a kept-alive connection's next first byte) to the end of the headers, at most
                          `request_head_timeout` seconds, however the bytes trickle in; then 408 and close.
                          (uvicorn itself times only idle kept-alive connections, never a head in progress.)
    RequestLimits         ASGI: the whole body must arrive within `request_body_timeout` seconds of the head
                          (408 and close, `RequestTimeout`); any /v1 path with a dot segment (`..`, `%2e%2e`,
                          `.%2E`, `..;`, double-encoded, or between backslashes) is refused with 400 before anything
                          goes upstream, so nothing outside the upstream base path can be reached.

proxy/server.py's `server_options` runs uvicorn with the protocol above, `limit_concurrency`
(`max_client_connections`: a request on a connection past the bound is answered 503 and the connection closed)
and `timeout_keep_alive`.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from proxy.errors import BadRequest, ProxyError, error_body

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send


# The app's lifespan puts the setting in the lifespan state, which uvicorn hands every connection (`app_state`):
# so each worker process, and each test server, times heads by its own settings.
HEAD_TIMEOUT_STATE = "memory_proxy.request_head_timeout"
HEAD_TIMEOUT_DEFAULT = 10.0


def timed_out_response() -> bytes:
    body = orjson.dumps(error_body("the request head did not arrive in time", "invalid_request_error",
                                   code="request_timeout"))
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body))


class HeadTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline for each request head."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.head_timeout = float(self.app_state.get(HEAD_TIMEOUT_STATE, HEAD_TIMEOUT_DEFAULT))
        self._head_timer: asyncio.TimerHandle | None = None
        self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.write(timed_out_response())
            self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_head_timer()  # the next request on a kept-alive connection gets its own deadline

    def on_headers_complete(self) -> None:
        self._disarm_head_timer()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)


class RequestTimeout(ProxyError):
    """408: the body did not arrive in time. The connection is closed after the answer."""

    status = 408
    type = "invalid_request_error"
    code = "request_timeout"

    def response(self, headers: dict[str, str] | None = None) -> Any:
        return super().response({**(headers or {}), "connection": "close"})


FORWARDED = (b"/v1", b"/openai")  # the paths forwarded upstream: no dot segment may climb out of the base path
DOT_SEGMENT = re.compile(r"(?:^|[/\\])\.{1,2}(?:;[^/\\]*)?(?=$|[/\\])")
MAX_DECODES = 4  # %25252e... deeper than this is refused outright


def has_dot_segment(raw_path: bytes) -> bool:
    """Whether a path holds a `.` or `..` segment once percent-decoded (repeatedly: an upstream or a proxy in
    between may decode again), with `/` or `\\` as separators and `;parameters` ignored; also True for a path
    still percent-encoded after MAX_DECODES rounds or holding a control character (NUL, CR, LF...)."""
    path = raw_path.decode("latin-1")
    for _ in range(MAX_DECODES):
        if DOT_SEGMENT.search(path):
            return True
        decoded = unquote(path, encoding="latin-1")
        if decoded == path:
            return any(ord(c) < 32 or ord(c) == 127 for c in path)
        path = decoded
    return True


class RequestLimits:
    """ASGI middleware: the dot-segment refusal for /v1 and the body deadline (see the module docstring)."""

    def __init__(self, app: ASGIApp, body_timeout: float) -> None:
        self.app = app
        self.body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw: bytes = scope.get("raw_path") or scope["path"].encode()
        if raw.startswith(FORWARDED) and has_dot_segment(raw):
            problem = BadRequest("the path holds a dot segment ('.' or '..', encoded or not): refused",
                                 code="invalid_path")
            await problem.response()(scope, receive, send)
            return
        await self.app(scope, self.deadline(receive), send)

    def deadline(self, receive: Receive) -> Receive:
        """`receive`, but the body (every http.request message up to the last) must be in by the deadline."""
        until = time.monotonic() + self.body_timeout
        reading = True

        async def bounded() -> Message:
            nonlocal reading
            if not reading:  # the body is in: what is left to wait for is the disconnect, unbounded
                return await receive()
            try:
                async with asyncio.timeout(max(0.0, until - time.monotonic())):
                    message = await receive()
            except TimeoutError:
                reading = False
                raise RequestTimeout(f"the request body did not arrive within {self.body_timeout:g} s") from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                reading = False
            return message

        return bounded
