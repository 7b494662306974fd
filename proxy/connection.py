"""One HTTP/1.1 connection to the upstream: an asyncio protocol fed to httptools' C parser (the one uvicorn uses
for the other side), one request at a time, with flow control both ways. The pool that owns connections, and
the forward-proxy routes they take, are in proxy/h1.py."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator
from typing import cast

import httptools
import httpx

RawHeaders = list[tuple[bytes, bytes]]
JOIN_LIMIT = 64 * 1024  # bodies up to this size go out in the same write as the head
HIGH_WATER = 256 * 1024  # buffered response bytes at which we stop reading from the upstream socket
# The most a response head (status line, headers, any 1xx heads before it) may take: bytes, counted as they come
# (httptools joins a header's pieces in memory until it ends), and fields (each costs Python objects however short
# it is). Generous beside real servers' few KiB, and beside clients' own bounds (curl: 300 KiB, h11: 16 KiB).
MAX_HEAD_BYTES = 256 * 1024
MAX_HEADER_FIELDS = 1000


class Connection(asyncio.Protocol):
    """One connection to the upstream; one request at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.lost = False
        self.writable: asyncio.Future[None] | None = None
        self.waiter: asyncio.Future[bool] | None = None
        self.idle_since = 0.0
        self.absolute = b""  # "http://host:port" when requests go through a forward proxy in absolute form
        self.proxy_authorization: bytes | None = None
        self.reset(head=False)

    def reset(self, *, head: bool) -> None:
        self.head = head  # a HEAD answer announces a body that never comes: the parser must not wait for it
        self.status = 0
        self.headers: RawHeaders = []
        self.trailers = 0  # trailer fields of a chunked answer: bounded on their own, never part of the head
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.head_room = MAX_HEAD_BYTES  # bytes the response head may still take
        self.framing = 0  # body bytes read since the last byte of content
        self.content_seen = False
        self.headers_in = self.complete = self.keep_alive = self.paused = self.answered = False
        self.error: httpx.TransportError | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.answered = True
        if self.headers_in:
            # Reads with no content in them (chunk-size lines, a trailer section, which httptools joins in memory
            # too) get the head's bound between them.
            self.content_seen = False
            self._feed(data)
            if not self.content_seen and not self.complete:
                self.framing += len(data)
                if self.framing > MAX_HEAD_BYTES:
                    self.fail(httpx.RemoteProtocolError(f"the upstream sent more than {MAX_HEAD_BYTES} bytes of "
                                                        "chunk framing or trailers without content"))
            return
        room = self.head_room
        self.head_room = max(0, room - len(data))
        self._feed(data[:room] if len(data) > room else data)
        if not self.headers_in and self.head_room == 0:
            self._too_large(f"larger than {MAX_HEAD_BYTES} bytes")
        elif len(data) > room and not self.error:
            self._feed(data[room:])  # the head ended within its room: the rest is body

    def _feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.fail(httpx.RemoteProtocolError(f"the upstream sent invalid HTTP: {exc}"))

    def _too_large(self, how: str) -> None:
        self.fail(httpx.RemoteProtocolError(f"the upstream's response head is {how}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.headers_in and not self.complete and not self._framed():
            self.complete = True  # a body delimited by the end of the connection
        elif not self.complete and not self.error:
            self.error = httpx.RemoteProtocolError("the upstream closed the connection before its answer was complete")
        self._wake()
        if self.writable and not self.writable.done():
            self.writable.set_result(None)

    def pause_writing(self) -> None:
        self.writable = self.loop.create_future()

    def resume_writing(self) -> None:
        if self.writable and not self.writable.done():
            self.writable.set_result(None)
        self.writable = None

    # httptools callbacks
    def on_status(self, _status: bytes) -> None:
        self.status = self.parser.get_status_code()

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.headers_in:  # a trailer field: the answer's head is out already, and a trailer adds nothing to it
            self.trailers += 1
            if self.trailers > MAX_HEADER_FIELDS:
                self._too_large(f"more than {MAX_HEADER_FIELDS} trailer fields")
                raise httptools.HttpParserError("too many trailer fields")
            return
        if len(self.headers) >= MAX_HEADER_FIELDS:
            self._too_large(f"more than {MAX_HEADER_FIELDS} header fields")
            raise httptools.HttpParserError("too many header fields")  # stops the parser at once
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if 100 <= self.status < 200:  # an interim answer (100 Continue): the real one follows
            self.headers = []
            return
        self.headers_in = True
        if self.head:
            self.complete = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.content_seen, self.framing = True, 0
        if self.headers_in and not self.complete:
            self.chunks.append(body)
            self.buffered += len(body)
            if self.buffered > HIGH_WATER and not self.paused and self.transport:
                self.paused = True
                self.transport.pause_reading()
            self._wake()

    def on_message_complete(self) -> None:
        if self.headers_in and not self.complete:
            self.complete = True
            self.keep_alive = self.parser.should_keep_alive()
            self._wake()

    # our side
    def _framed(self) -> bool:
        return any(k.lower() in (b"content-length", b"transfer-encoding") for k, _ in self.headers)

    def fail(self, error: httpx.TransportError) -> None:
        self.error = self.error or error
        self.close()
        self._wake()

    def close(self) -> None:
        if self.transport and not self.transport.is_closing():
            self.transport.close()
        self.lost = True

    def _wake(self) -> None:
        if self.waiter and not self.waiter.done():
            self.waiter.set_result(True)

    async def wait(self, seconds: float | None, expired: type[httpx.TimeoutException]) -> None:
        waiter = self.waiter = self.loop.create_future()
        timer = self.loop.call_later(seconds, expire, waiter) if seconds is not None else None
        try:
            if not await waiter:
                self.close()
                raise expired("timed out waiting for the upstream")
        finally:
            self.waiter = None
            if timer:
                timer.cancel()

    async def send(self, request: httpx.Request, timeouts: dict[str, float | None]) -> None:
        """Write the request, then wait for the response headers."""
        assert self.transport is not None
        self.reset(head=request.method == "HEAD")
        head = [b"%s %s%s HTTP/1.1\r\n" % (request.method.encode(), self.absolute, request.url.raw_path)]
        head += [b"%s: %s\r\n" % pair for pair in request.headers.raw]
        if self.proxy_authorization:
            head.append(b"Proxy-Authorization: %s\r\n" % self.proxy_authorization)
        head.append(b"\r\n")
        if isinstance(request.stream, httpx.ByteStream) and len(request.content) > JOIN_LIMIT:
            self.transport.write(b"".join(head))  # a large body is not copied once more just to join it
            self.transport.write(request.content)
        elif isinstance(request.stream, httpx.ByteStream):
            head.append(request.content)
            self.transport.write(b"".join(head))  # one write: one packet for an ordinary request
        else:
            await self._write_stream(b"".join(head), request, timeouts.get("write"))
        while not self.headers_in:
            if self.error:
                raise self.error
            await self.wait(timeouts.get("read"), httpx.ReadTimeout)

    async def _write_stream(self, head: bytes, request: httpx.Request, seconds: float | None) -> None:
        assert self.transport is not None
        chunked = request.headers.get("transfer-encoding", "").lower() == "chunked"
        self.transport.write(head)
        async for chunk in cast(AsyncIterable[bytes], request.stream):
            if self.lost or self.headers_in:  # the upstream answered (or left) before taking the whole body
                return
            if chunk:
                self.transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
            if self.writable:
                try:
                    await asyncio.wait_for(asyncio.shield(self.writable), seconds)
                except TimeoutError:
                    self.close()
                    raise httpx.WriteTimeout("timed out sending the request body upstream") from None
        if chunked and not self.lost:
            self.transport.write(b"0\r\n\r\n")

    async def body(self, read_timeout: float | None) -> AsyncIterator[bytes]:
        while True:
            if self.chunks:
                data = self.chunks.popleft() if len(self.chunks) == 1 else b"".join(self.chunks)
                self.chunks.clear()
                self.buffered = 0
                if self.paused and self.transport:
                    self.paused = False
                    self.transport.resume_reading()
                yield data
            elif self.error:
                raise self.error
            elif self.complete:
                return
            else:
                await self.wait(read_timeout, httpx.ReadTimeout)

    @property
    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.lost and not self.error and not self.head


def expire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)
