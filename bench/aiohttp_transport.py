"""aiohttp as the proxy's upstream client, for `python -m bench.transports` only: the well-kept candidate that
would replace our HTTP/1.1 transport (proxy/h1.py) if it met the speed targets. An httpx transport over one
aiohttp ClientSession, as thin as it can be while staying faithful: no cookie jar (it would carry one user's
Set-Cookie to the next), no added headers, no decompression, the path sent as the client wrote it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import httpx
import yarl

from proxy.errors import ProxyError


class _Body(httpx.AsyncByteStream):
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.response.content.iter_any():
                yield chunk
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise httpx.ReadTimeout(str(exc)) from exc
        except aiohttp.ClientError as exc:
            raise httpx.ReadError(str(exc) or type(exc).__name__) from exc

    async def aclose(self) -> None:
        self.response.release()


class AiohttpTransport(httpx.AsyncBaseTransport):
    def __init__(self, limits: httpx.Limits, timeout: httpx.Timeout) -> None:
        self.limit = limits.max_connections or 0
        self.timeout = aiohttp.ClientTimeout(total=None, connect=timeout.pool, sock_connect=timeout.connect,
                                             sock_read=timeout.read)
        self.session: aiohttp.ClientSession | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.session is None:  # made on the running loop
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.limit, keepalive_timeout=5),
                cookie_jar=aiohttp.DummyCookieJar(), skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
                auto_decompress=False, timeout=self.timeout)
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw
                   if k.lower() != b"transfer-encoding"]  # aiohttp frames the body itself
        data = request.content if isinstance(request.stream, httpx.ByteStream) else request.stream
        try:
            response = await self.session.request(request.method, yarl.URL(str(request.url), encoded=True),
                                                  headers=headers, data=data or None, allow_redirects=False)
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise httpx.ConnectTimeout(str(exc)) from exc
        except aiohttp.ClientError as exc:
            if isinstance(exc.__cause__, ProxyError):  # our body stream refused the client's body (413)
                raise exc.__cause__ from None
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc
        return httpx.Response(response.status, headers=response.raw_headers, stream=_Body(response),
                              extensions={"http_version": b"HTTP/1.1"})

    async def aclose(self) -> None:
        if self.session is not None:
            await self.session.close()
