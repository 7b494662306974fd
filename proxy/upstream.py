"""The one pooled HTTP client to the upstream, and the header hygiene around it.

Transport failures become our errors here, once: unreachable → UpstreamError (502), too slow → UpstreamTimeout
(504). Everything the upstream answers, errors included, is the upstream's to say and reaches the client as is.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterable, Iterable

import anyio
import httpx

from proxy.config import Settings
from proxy.errors import UpstreamError, UpstreamTimeout

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
    def __init__(self, settings: Settings, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.base = settings.upstream_base
        self.key = settings.upstream_key
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(connect=settings.connect_timeout, read=settings.read_timeout,
                                  write=settings.write_timeout, pool=settings.pool_timeout),
            limits=httpx.Limits(max_connections=settings.max_connections,
                                max_keepalive_connections=settings.max_keepalive),
            transport=transport,
            follow_redirects=False,
            # Responses are relayed as bytes; cookies belong to the client, never to the proxy's pool.
            cookies=None,
            trust_env=False,
        )

    def url(self, path: str, query: bytes = b"") -> str:
        """`path` is what follows /v1 in the client's request: /v1/models → <upstream>/models."""
        url = self.base + path
        return url + "?" + query.decode("latin-1") if query else url

    async def send(self, method: str, path: str, query: bytes, headers: RawHeaders,
                   content: bytes | AsyncIterable[bytes] | None) -> httpx.Response:
        """Send and return once the response headers are in; the body is read by the caller, who must close it."""
        request = self.client.build_request(method, self.url(path, query), headers=headers, content=content)
        try:
            return await self.client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(f"the upstream did not answer in time ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            raise UpstreamError(f"the upstream could not be reached: {exc or type(exc).__name__}") from exc

    async def aclose(self) -> None:
        await self.client.aclose()


async def close_quietly(response: httpx.Response) -> None:
    """Release the upstream connection even while our task is being cancelled by a client disconnect."""
    with anyio.CancelScope(shield=True):
        with contextlib.suppress(httpx.HTTPError):
            await response.aclose()
