"""A lean HTTP/1.1 transport to the upstream, with forward-proxy support (proxy/egress.py).

httpx's default transport (httpcore over anyio, h11 parsing) spends ~2/3 of a pass-through's CPU, and its pool
polls every open connection's socket on each request, so it gets slower as concurrency grows; aiohttp, measured
side by side behind the same proxy (README, Speed), adds 0.2-0.5 ms more per request than this one and drops the
bytes already received when a connection resets. This transport speaks HTTP/1.1 on asyncio protocols with
httptools' C parser (proxy/connection.py), keeps idle connections per origin (newest first), and raises httpx's
exceptions, so callers cannot tell the difference.

Through a forward proxy: an https:// upstream is reached with `CONNECT host:port` and TLS started inside the
tunnel (the proxy sees only ciphertext); an http:// upstream gets its requests in absolute form
(`GET http://host/path`). Either way `Proxy-Authorization` goes to the proxy only. A proxy that refuses (407,
403, 502...) is an httpx.ProxyError naming its answer.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator

import httptools
import httpx

from proxy.connection import Connection
from proxy.egress import Egress

Origin = tuple[bytes, bytes, int]  # scheme, host, port

KEEPALIVE_EXPIRY = 5.0  # seconds an idle connection is trusted, as httpx's default


class _Body(httpx.AsyncByteStream):
    def __init__(self, pool: H1Transport, key: Origin, conn: Connection,
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
    """A pool of HTTP/1.1 connections, `limits.max_connections` at most, idle ones kept for reuse; `egress` says
    whether they go through a forward proxy and which TLS context verifies https:// origins."""

    def __init__(self, limits: httpx.Limits, egress: Egress | None = None,
                 keepalive_expiry: float = KEEPALIVE_EXPIRY) -> None:
        self.egress = egress or Egress(None, None)
        self.max_connections = limits.max_connections or 1_000_000
        self.max_idle = limits.max_keepalive_connections or 0
        self.expiry = keepalive_expiry
        self.active = 0  # requests holding a connection, open or opening
        self.queue: deque[asyncio.Future[None]] = deque()  # requests waiting for a free slot
        self.idle: dict[Origin, list[Connection]] = {}
        self.idle_count = 0
        self.ssl = self.egress.ssl

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

    def _idle(self, key: Origin) -> Connection | None:
        idle = self.idle.get(key)
        now = asyncio.get_running_loop().time()
        while idle:
            conn = idle.pop()
            self.idle_count -= 1
            if not conn.lost and now - conn.idle_since < self.expiry:
                return conn
            conn.close()
        return None

    async def _connect(self, key: Origin, seconds: float | None) -> Connection:
        """A new connection to the origin: straight, or through the forward proxy (a CONNECT tunnel for https)."""
        scheme, host, port = key
        proxy = self.egress.proxy
        if scheme == b"https" and self.ssl is None:
            self.ssl = httpx.create_ssl_context(trust_env=False)
        try:
            async with asyncio.timeout(seconds):
                if proxy is None:
                    return await self._open(host.decode("ascii"), port, self.ssl if scheme == b"https" else None)
                conn = await self._open(proxy.host, proxy.port, None)
                try:
                    if scheme == b"https":
                        await self._tunnel(conn, host, port)
                    else:
                        conn.absolute = b"http://" + authority(host, port)
                        conn.proxy_authorization = proxy.authorization
                except BaseException:
                    conn.close()
                    raise
                return conn
        except TimeoutError:
            raise httpx.ConnectTimeout("timed out connecting") from None
        except OSError as exc:  # refused, unreachable, DNS, TLS verification (ssl.SSLError is an OSError)
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc

    async def _open(self, host: str, port: int, tls: ssl.SSLContext | None) -> Connection:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: Connection(loop), host, port, ssl=tls,
                                               server_hostname=host if tls else None)
        return conn

    async def _tunnel(self, conn: Connection, host: bytes, port: int) -> None:
        """CONNECT through the proxy, then TLS with the origin inside the tunnel (RFC 9110 §9.3.6)."""
        assert conn.transport is not None and self.egress.proxy is not None
        target = authority(host, port)
        head = b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n" % (target, target)
        if self.egress.proxy.authorization:
            head += b"Proxy-Authorization: %s\r\n" % self.egress.proxy.authorization
        conn.reset(head=True)  # a 2xx answer to CONNECT has no body: the tunnel starts right after its head
        conn.transport.write(head + b"\r\n")
        while not conn.headers_in:
            if conn.error:
                raise httpx.ProxyError(f"the proxy closed the connection during CONNECT: {conn.error}")
            await conn.wait(None, httpx.ConnectTimeout)  # bounded by the caller's connect timeout
        if not 200 <= conn.status < 300:
            wants = " (it wants credentials: user:password@ in the proxy URL)" if conn.status == 407 else ""
            raise httpx.ProxyError(f"the proxy answered {conn.status} to CONNECT {target.decode()}{wants}")
        conn.parser = httptools.HttpResponseParser(conn)  # what follows is the origin's, inside TLS
        loop = asyncio.get_running_loop()
        assert self.ssl is not None
        conn.transport = await loop.start_tls(conn.transport, conn, self.ssl, server_hostname=host.decode("ascii"))

    def release(self, key: Origin, conn: Connection) -> None:
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


def authority(host: bytes, port: int) -> bytes:
    """host:port as a request target or Host value, an IPv6 address in brackets."""
    return b"[%s]:%d" % (host, port) if b":" in host else b"%s:%d" % (host, port)
