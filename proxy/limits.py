"""What a client may send and how slowly: bounds on the request head, the body, the path and the connections.

    HeadLimitsProtocol    uvicorn's httptools protocol plus a deadline for the request head: from the connection
                          (or a kept-alive connection's next first byte) to the end of the headers, at most
                          `request_head_timeout` seconds, however the bytes trickle in; then 408 and close.
                          (uvicorn itself times only idle kept-alive connections, never a head in progress.)
                          And a size: at most `max_request_head_bytes` bytes and MAX_HEADER_FIELDS fields, counted
                          as the bytes come; then 431 and close (uvicorn's httptools protocol has no bound at all).
                          A chunked body's trailer section gets the same bound; past it the connection is closed.
                          What the parser refuses is a 400 in OpenAI's error shape, as every error of ours is.
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
# Set in the scope of a request whose body the parser refused: the client got our 400, not a 499 (proxy/app.py).
BODY_REFUSED = "memory_proxy.body_refused"
HEAD_TIMEOUT_DEFAULT = 10.0
# The head's size comes with uvicorn's own knob for it (`h11_max_incomplete_event_size`, which bounds the h11
# protocol the same way): server_options sets it from `max_request_head_bytes`.
HEAD_BYTES_DEFAULT = 64 * 1024
LINGER = 2.0  # seconds a refused client's further bytes are read and dropped before the connection closes
MAX_HEADER_FIELDS = 1000  # each field costs a few hundred bytes of Python objects however short it is


def closing_response(status: bytes, message: str, code: str) -> bytes:
    """A whole HTTP/1.1 answer in OpenAI's error shape that ends the connection (`Connection: close`)."""
    body = orjson.dumps(error_body(message, "invalid_request_error", code=code))
    return (b"HTTP/1.1 %s\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n%s" % (status, len(body), body))


def timed_out_response() -> bytes:
    return closing_response(b"408 Request Timeout", "the request head did not arrive in time", "request_timeout")


class HeadLimitsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline and a size bound for each request head.

    The size is counted on the bytes as they come, before the parser sees them: httptools joins a header's
    pieces in memory until the field ends, so counting fields as they are parsed would come too late. Once a head
    has taken `h11_max_incomplete_event_size` bytes without ending, or MAX_HEADER_FIELDS fields, the client gets
    431 Request Header Fields Too Large (RFC 6585 §5) and the connection is closed; nothing past the bound is fed
    to the parser.
    """

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.head_timeout = float(self.app_state.get(HEAD_TIMEOUT_STATE, HEAD_TIMEOUT_DEFAULT))
        self.max_head = self.config.h11_max_incomplete_event_size or HEAD_BYTES_DEFAULT
        self._head_room: int | None = self.max_head  # bytes the head in progress may still take; None: in a body
        self._fields = 0
        self._refused = False
        self._framing = 0  # a body's bytes read since its last byte of content (chunk-size lines, trailers)
        self._body_seen = False  # whether the read being fed brought any content
        self._pending: bytes | None = None  # the refusal, once the requests before it are answered
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
        self._refuse(timed_out_response())

    def _refuse(self, response: bytes) -> None:
        """Answer `response` and close; while earlier (pipelined) requests are still being answered, once they
        have been, reading nothing more meanwhile.

        The close lingers (as nginx's `lingering_close`): our side is shut for writing, and what the client still
        sends is read and dropped for up to LINGER seconds. Closing at once with its bytes unread would reset the
        connection, and the client, still writing its head, would see the reset instead of the answer."""
        self._head_room = 0
        if self._refused or self.transport.is_closing():
            return
        self._refused = True
        if self.cycle is not None and not self.cycle.response_complete:
            self._pending = response
            self.flow.pause_reading()
            return
        self._answer_and_close(response)

    def _answer_and_close(self, response: bytes) -> None:
        self.transport.write(response)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER, self.transport.close)

    def on_response_complete(self) -> None:
        if self._pending is not None and not self.pipeline and not self.transport.is_closing():
            self.server_state.total_requests += 1
            self._answer_and_close(self._pending)
            self._pending = None
            return
        super().on_response_complete()

    def _too_large(self) -> None:
        self._refuse(closing_response(b"431 Request Header Fields Too Large",
                                      f"the request head is larger than {self.max_head} bytes or has more than "
                                      f"{MAX_HEADER_FIELDS} header fields", "request_header_fields_too_large"))

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # lingering: dropped unread
        while data:
            room = self._head_room
            if room is None:
                self._in_body(data)
                return
            if len(data) <= room:  # the head still has room for all of it
                self._head_room = room - len(data)
                super().data_received(data)
                return
            self._head_room = 0  # the head may take `room` more bytes: feed those, then see whether it ended
            if room:
                super().data_received(data[:room])
            if self._refused or self.transport.is_closing():
                return
            if self._head_room == 0:
                self._too_large()
                return
            data = data[room:]  # the head ended within them: a body or the next head follows, counted afresh

    def _in_body(self, data: bytes) -> None:
        """Feed body bytes. Reads that bring none of the body itself (chunk-size lines, and the trailer section a
        chunked body may end with, which httptools also joins in memory) get the head's bound between them; past
        it the connection is closed, as the request is already being answered."""
        self._body_seen = False
        super().data_received(data)
        if self._head_room is None and not self._body_seen:
            self._framing += len(data)
            if self._framing > self.max_head:
                self._head_room = 0
                self._refused = True
                self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """What the parser refuses (a bad request line, header or chunk size; Content-Length with
        Transfer-Encoding) is a 400 in OpenAI's error shape rather than uvicorn's plain text, and the connection
        closes. As with 431 (`_refuse`), requests before it on the connection are answered first, whole; a
        request whose body the parser refused is not run, or, already running, sees its client gone (its answer
        is never written: an answer already under way is cut off, never corrupted with ours)."""
        if self._refused or self.transport.is_closing():
            return
        refusal = closing_response(b"400 Bad Request", "the request is not valid HTTP/1.1 (its request line, a "
                                   "header or the body's framing)", "invalid_http_request")
        cycle = self.cycle
        if self._head_room is not None or cycle is None:  # in a head: no cycle of its own yet
            self._refuse(refusal)
            return
        queued = [entry for entry in self.pipeline if entry[0] is cycle]
        for entry in queued:  # not started: it never will be; the running request before it is answered first
            self.pipeline.remove(entry)
        cycle.disconnected = True  # a request reading its body gets http.disconnect (proxy/app.py)
        cycle.scope[BODY_REFUSED] = True  # type: ignore[literal-required]
        cycle.message_event.set()
        if queued:
            self._refuse(refusal)
            return
        self._head_room, self._refused = 0, True
        if cycle.response_started:
            self.transport.close()
        else:
            self._answer_and_close(refusal)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._fields = 0
        self._arm_head_timer()  # the next request on a kept-alive connection gets its own deadline

    def on_header(self, name: bytes, value: bytes) -> None:
        self._fields += 1
        if self._fields <= MAX_HEADER_FIELDS:
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm_head_timer()
        if self._fields > MAX_HEADER_FIELDS:
            self._too_large()  # the rest of this read is parsed, and dropped: the connection is closing
            return
        self._head_room, self._framing = None, 0
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self._head_room is None:
            self._body_seen, self._framing = True, 0
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._head_room is None:
            super().on_message_complete()
            self._head_room = self.max_head

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
