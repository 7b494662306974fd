"""The one pooled HTTP client to the upstream, and the header hygiene around it.

Transport failures become our errors here, once: unreachable → UpstreamError (502), too slow → UpstreamTimeout
(504), each naming the upstream's host:port (and the forward proxy's, if one is used), never a credential, path
or query. Everything the upstream answers, errors included, is the upstream's to say and reaches the client as is.

The outcome of the last exchange is kept for /readyz (`Upstream.reachability`): any HTTP answer means reachable,
a transport failure means not; when that knowledge is older than `upstream_check_seconds`, one probe
(`GET <upstream>/models` without credentials) refreshes it, so readiness probes never reach the upstream more
often than that, however often they come.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterable, Iterable
from dataclasses import dataclass
from typing import Any

import anyio
import httpx

from proxy.config import Settings
from proxy.egress import Egress
from proxy.errors import UpstreamError, UpstreamTimeout
from proxy.h1 import H1Transport
from proxy.instrumentation import TimedTransport

# RFC 9110 §7.6.1 hop-by-hop headers, plus those httpx or the server recompute for each hop.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"proxy-connection", b"te",
    b"trailer", b"trailers", b"transfer-encoding", b"upgrade", b"host",
})
PROXY_HEADER_PREFIX = b"x-memory-"
AZURE_PREFIX = "/openai/"
# The headers that say who the client is to the upstream: calls the proxy makes on a client's behalf (summaries,
# background extraction) carry these, and no other of the client's headers.
CREDENTIAL_HEADERS = frozenset({b"authorization", b"api-key", b"openai-organization", b"openai-project"})
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


def credentials(raw: Iterable[tuple[bytes, bytes]]) -> RawHeaders:
    """The client's credential headers (CREDENTIAL_HEADERS), for a call made on its behalf."""
    return [(k, v) for k, v in raw if k.lower() in CREDENTIAL_HEADERS]


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


PROBE_WAIT = 0.5  # seconds /readyz waits for a probe under way before it answers with what it knows


@dataclass(frozen=True, slots=True)
class Reachability:
    """What the last exchange with the upstream showed: `reachable` is None before any; `age` in seconds."""

    reachable: bool | None
    error: str | None
    age: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"reachable": self.reachable, "error": self.error,
                "checked_seconds_ago": None if self.age is None else round(self.age, 3)}


class Upstream:
    """Sends requests straight to the transport: httpx's client layer adds nothing a proxy wants (its cookie jar
    would even carry one user's Set-Cookie to the next), and costs a tenth of the CPU of a pass-through."""

    def __init__(self, settings: Settings, transport: httpx.AsyncBaseTransport | None = None, *,
                 egress: Egress | None = None) -> None:
        """`egress` (proxy/egress.py) routes the connections; by default straight, verified with certifi's CAs."""
        self.base = settings.upstream_base
        self.root = str(httpx.URL(self.base).copy_with(path="/", query=None)).rstrip("/")  # scheme://host:port
        self.key = settings.upstream_key
        self.timeout = httpx.Timeout(connect=settings.connect_timeout, read=settings.read_timeout,
                                     write=settings.write_timeout, pool=settings.pool_timeout).as_dict()
        self.egress = egress or Egress.from_environ({}, self.base)
        url = httpx.URL(self.base)
        self.origin = f"{url.host}:{url.port or (443 if url.scheme == 'https' else 80)}"
        via = f" through the proxy {self.egress.proxy.origin}" if self.egress.proxy else ""
        self.described = f"the upstream {self.origin}{via}"
        self.transport = TimedTransport(transport or H1Transport(  # metrics: waits and failures
            httpx.Limits(max_connections=settings.max_connections, max_keepalive_connections=settings.max_keepalive),
            self.egress))
        self.check_seconds = settings.upstream_check_seconds
        self.last: tuple[float, str | None] | None = None  # (monotonic time, error or None) of the last exchange
        self.probe: asyncio.Task[None] | None = None

    def url(self, path: str, query: bytes = b"") -> str:
        """`path` is what follows /v1 in the client's request: /v1/models → <upstream>/models. Azure's classic
        routes, /openai/deployments/..., keep their whole path on the upstream's origin (scheme, host, port)."""
        url = (self.root if path.startswith(AZURE_PREFIX) else self.base) + path
        return url + "?" + query.decode("latin-1") if query else url

    async def send(self, method: str, path: str, query: bytes, headers: RawHeaders,
                   content: bytes | AsyncIterable[bytes] | None) -> httpx.Response:
        """Send and return once the response headers are in; the body is read by the caller, who must close it.
        Raises UpstreamTimeout (504) or UpstreamError (502), naming the upstream's host:port."""
        # httpx.Request adds Host and Content-Length / Transfer-Encoding, and nothing else.
        request = httpx.Request(method, self.url(path, query), headers=headers, content=content,
                                extensions={"timeout": self.timeout})
        try:
            response = await self.transport.handle_async_request(request)
        except httpx.TimeoutException as exc:
            self.last = (time.monotonic(), f"{type(exc).__name__}: {exc}")
            raise UpstreamTimeout(f"{self.described} did not answer in time ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            self.last = (time.monotonic(), str(exc) or type(exc).__name__)
            failed = "broke HTTP/1.1" if isinstance(exc, httpx.RemoteProtocolError) else "could not be reached"
            raise UpstreamError(f"{self.described} {failed}: {exc or type(exc).__name__}") from exc
        self.last = (time.monotonic(), None)
        response.request = request
        return response

    async def reachability(self) -> Reachability:
        """What the last exchange showed; when that is older than `check_seconds` (or there was none), one probe
        at a time refreshes it, waited for PROBE_WAIT seconds at most."""
        if self.last is None or time.monotonic() - self.last[0] >= self.check_seconds:
            if self.probe is None or self.probe.done():
                self.probe = asyncio.create_task(self._probe(), name="upstream-probe")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.probe), PROBE_WAIT)
        if self.last is None:
            return Reachability(None, "not checked yet", None)
        at, error = self.last
        return Reachability(error is None, None if error is None else f"{self.described}: {error}",
                            time.monotonic() - at)

    async def _probe(self) -> None:
        with contextlib.suppress(UpstreamError):
            await close_quietly(await self.send("GET", "/models", b"", [], None))

    async def aclose(self) -> None:
        if self.probe is not None:
            self.probe.cancel()
        await self.transport.aclose()


async def close_quietly(response: httpx.Response) -> None:
    """Release the upstream connection even while our task is being cancelled by a client disconnect."""
    with anyio.CancelScope(shield=True):
        with contextlib.suppress(httpx.HTTPError):
            await response.aclose()
