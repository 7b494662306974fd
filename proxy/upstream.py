"""The one pooled HTTP client to the upstream, and the header hygiene around it.

Transport failures become our errors here, once: unreachable → UpstreamError (502), too slow → UpstreamTimeout
(504). Everything the upstream answers, errors included, is the upstream's to say and reaches the client as is.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import Any, cast

import anyio
import httpx

try:
    import httptools

    HAVE_HTTPTOOLS = True
except ImportError:  # pragma: no cover - uvicorn[standard] installs it everywhere
    HAVE_HTTPTOOLS = False

from proxy.config import Settings
from proxy.errors import UpstreamError, UpstreamTimeout
from proxy.instrumentation import TimedTransport

# RFC 9110 §7.6.1 hop-by-hop headers, plus those httpx or the server recompute for each hop.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"proxy-connection", b"te",
    b"trailer", b"trailers", b"transfer-encoding", b"upgrade", b"host",
})
PROXY_HEADER_PREFIX = b"x-memory-"
RawHeaders = list[tuple[bytes, bytes]]


def request_headers(raw: Iterable[tuple[bytes, bytes]], upstream_key: str = "", *,
                    drop: frozenset[bytes] = frozenset()) -> RawHeaders:
    """Client headers fit to send upstream: no hop-by-hop, no X-Memory-*, the upstream key if one is set."""
    raw = list(raw)
    listed = _connection_listed(raw)
    headers = [
        (k, v) for k, v in raw
        if k not in HOP_BY_HOP and k not in listed and k not in drop and not k.startswith(PROXY_HEADER_PREFIX)
        and not (upstream_key and k == b"authorization")
    ]
    if upstream_key:
        headers.append((b"authorization", b"Bearer " + upstream_key.encode("latin-1")))
    return headers


def response_headers(headers: httpx.Headers, *, drop: frozenset[bytes] = frozenset()) -> RawHeaders:
    raw = headers.raw
    listed = _connection_listed(raw)
    return [(k.lower(), v) for k, v in raw
            if k.lower() not in HOP_BY_HOP and k.lower() not in listed and k.lower() not in drop]


def _connection_listed(raw: list[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Headers named in `Connection:` are hop-by-hop too."""
    names: set[bytes] = set()
    for k, v in raw:
        if k.lower() == b"connection":
            names.update(part.strip().lower() for part in v.split(b","))
    return frozenset(names)


class Upstream:
    """Sends requests straight to the transport: httpx's client layer adds nothing a proxy wants (its cookie jar
    would even carry one user's Set-Cookie to the next), and costs a tenth of the CPU of a pass-through."""

    def __init__(self, settings: Settings, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.base = settings.upstream_base
        self.key = settings.upstream_key
        self.timeout = httpx.Timeout(connect=settings.connect_timeout, read=settings.read_timeout,
                                     write=settings.write_timeout, pool=settings.pool_timeout).as_dict()
        self.transport = TimedTransport(transport or h1_transport(settings))  # metrics: waits and failures

    def url(self, path: str, query: bytes = b"") -> str:
        """`path` is what follows /v1 in the client's request: /v1/models → <upstream>/models."""
        url = self.base + path
        return url + "?" + query.decode("latin-1") if query else url

    async def send(self, method: str, path: str, query: bytes, headers: RawHeaders,
                   content: bytes | AsyncIterable[bytes] | None) -> httpx.Response:
        """Send and return once the response headers are in; the body is read by the caller, who must close it."""
        # httpx.Request adds Host and Content-Length / Transfer-Encoding, and nothing else.
        request = httpx.Request(method, self.url(path, query), headers=headers, content=content,
                                extensions={"timeout": self.timeout})
        try:
            response = await self.transport.handle_async_request(request)
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(f"the upstream did not answer in time ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            raise UpstreamError(f"the upstream could not be reached: {exc or type(exc).__name__}") from exc
        response.request = request
        return response

    async def aclose(self) -> None:
        await self.transport.aclose()


def h1_transport(settings: Settings) -> httpx.AsyncBaseTransport:
    """Our HTTP/1.1 pool where httptools is installed (uvicorn[standard] brings it), else httpx's own."""
    limits = httpx.Limits(max_connections=settings.max_connections, max_keepalive_connections=settings.max_keepalive)
    if H1Transport.available():
        return H1Transport(limits)
    return httpx.AsyncHTTPTransport(limits=limits, trust_env=False)


async def close_quietly(response: httpx.Response) -> None:
    """Release the upstream connection even while our task is being cancelled by a client disconnect."""
    with anyio.CancelScope(shield=True):
        with contextlib.suppress(httpx.HTTPError):
            await response.aclose()


# ---- A lean HTTP/1.1 transport -------------------------------------------------------------------------------
# httpx's default transport (httpcore over anyio, h11 parsing) spends ~2/3 of a pass-through's CPU, and its pool
# polls every open connection's socket on each request, so it gets slower as concurrency grows. This one speaks
# HTTP/1.1 on asyncio protocols with httptools' C parser (the one uvicorn uses for the other side), keeps idle
# connections per origin (newest first), and raises httpx's exceptions, so callers cannot tell the difference.

HIGH_WATER = 256 * 1024  # buffered response bytes at which we stop reading from the upstream socket
KEEPALIVE_EXPIRY = 5.0  # seconds an idle connection is trusted, as httpx's default


class _Connection(asyncio.Protocol):
    """One connection to the upstream; one request at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.lost = False
        self.writable: asyncio.Future[None] | None = None
        self.waiter: asyncio.Future[bool] | None = None
        self.idle_since = 0.0
        self.reset(head=False)

    def reset(self, *, head: bool) -> None:
        self.head = head  # a HEAD answer announces a body that never comes: the parser must not wait for it
        self.status = 0
        self.headers: RawHeaders = []
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.headers_in = self.complete = self.keep_alive = self.paused = self.answered = False
        self.error: httpx.TransportError | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.answered = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.fail(httpx.RemoteProtocolError(f"the upstream sent invalid HTTP: {exc}"))

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

    async def _wait(self, seconds: float | None, expired: type[httpx.TimeoutException]) -> None:
        waiter = self.waiter = self.loop.create_future()
        timer = self.loop.call_later(seconds, _expire, waiter) if seconds is not None else None
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
        head = [b"%s %s HTTP/1.1\r\n" % (request.method.encode(), request.url.raw_path)]
        head += [b"%s: %s\r\n" % pair for pair in request.headers.raw]
        head.append(b"\r\n")
        if isinstance(request.stream, httpx.ByteStream):
            head.append(request.content)
            self.transport.write(b"".join(head))
        else:
            await self._write_stream(b"".join(head), request, timeouts.get("write"))
        while not self.headers_in:
            if self.error:
                raise self.error
            await self._wait(timeouts.get("read"), httpx.ReadTimeout)

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
                await self._wait(read_timeout, httpx.ReadTimeout)

    @property
    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.lost and not self.error and not self.head


def _expire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


class _Body(httpx.AsyncByteStream):
    def __init__(self, pool: H1Transport, key: tuple[bytes, bytes, int], conn: _Connection,
                 read_timeout: float | None) -> None:
        self.pool, self.key, self.conn, self.read_timeout = pool, key, conn, read_timeout
        self.released = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self.conn.body(self.read_timeout)

    async def aclose(self) -> None:
        if not self.released:
            self.released = True
            self.pool.release(self.key, self.conn)


class H1Transport(httpx.AsyncBaseTransport):
    def __init__(self, limits: httpx.Limits, keepalive_expiry: float = KEEPALIVE_EXPIRY) -> None:
        self.max_connections = limits.max_connections or 1_000_000
        self.max_idle = limits.max_keepalive_connections or 0
        self.expiry = keepalive_expiry
        self.active = 0  # requests holding a connection, open or opening
        self.queue: deque[asyncio.Future[None]] = deque()  # requests waiting for a free slot
        self.idle: dict[tuple[bytes, bytes, int], list[_Connection]] = {}
        self.idle_count = 0
        self.ssl: Any = None

    @staticmethod
    def available() -> bool:
        return HAVE_HTTPTOOLS

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        url = request.url
        key = (url.raw_scheme, url.raw_host, url.port or (443 if url.raw_scheme == b"https" else 80))
        await self._acquire(timeouts.get("pool"))
        conn = None
        try:
            conn = self._idle(key)
            if conn is not None:
                try:
                    await conn.send(request, timeouts)
                except httpx.RemoteProtocolError:
                    # The upstream closed an idle connection as we reused it: once more on a new one, if we can.
                    if conn.answered or not isinstance(request.stream, httpx.ByteStream):
                        raise
                    conn = None
            if conn is None:
                conn = await self._connect(key, timeouts.get("connect"))
                await conn.send(request, timeouts)
        except BaseException:
            if conn is not None:
                conn.close()
            self._release_slot()
            raise
        return httpx.Response(conn.status, headers=conn.headers, stream=_Body(self, key, conn, timeouts.get("read")),
                              extensions={"http_version": b"HTTP/1.1"})

    async def _acquire(self, seconds: float | None) -> None:
        if self.active < self.max_connections and not self.queue:
            self.active += 1
            return
        slot = asyncio.get_running_loop().create_future()
        self.queue.append(slot)
        try:
            await asyncio.wait_for(slot, seconds)
        except TimeoutError:
            raise httpx.PoolTimeout("no free upstream connection in time") from None
        except BaseException:
            if slot.done() and not slot.cancelled():  # handed a slot just as we were cancelled: pass it on
                self._release_slot()
            raise

    def _release_slot(self) -> None:
        while self.queue:
            slot = self.queue.popleft()
            if not slot.done():
                slot.set_result(None)  # the slot passes straight to the next waiting request
                return
        self.active -= 1

    def _idle(self, key: tuple[bytes, bytes, int]) -> _Connection | None:
        idle = self.idle.get(key)
        now = asyncio.get_running_loop().time()
        while idle:
            conn = idle.pop()
            self.idle_count -= 1
            if not conn.lost and now - conn.idle_since < self.expiry:
                return conn
            conn.close()
        return None

    async def _connect(self, key: tuple[bytes, bytes, int], seconds: float | None) -> _Connection:
        scheme, host, port = key
        loop = asyncio.get_running_loop()
        tls = None
        if scheme == b"https":
            self.ssl = self.ssl or httpx.create_ssl_context(trust_env=False)
            tls = self.ssl
        try:
            _, conn = await asyncio.wait_for(loop.create_connection(
                lambda: _Connection(loop), host.decode("ascii"), port, ssl=tls,
                server_hostname=host.decode("ascii") if tls else None), seconds)
        except TimeoutError:
            raise httpx.ConnectTimeout("timed out connecting to the upstream") from None
        except OSError as exc:
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc
        return conn

    def release(self, key: tuple[bytes, bytes, int], conn: _Connection) -> None:
        """The response is closed: keep its connection for the next request if it is clean, else drop it."""
        if conn.reusable and self.idle_count < self.max_idle:
            conn.idle_since = asyncio.get_running_loop().time()
            self.idle.setdefault(key, []).append(conn)
            self.idle_count += 1
        else:
            conn.close()
        self._release_slot()

    async def aclose(self) -> None:
        for conns in self.idle.values():
            for conn in conns:
                conn.close()
        self.idle.clear()
        self.idle_count = 0
