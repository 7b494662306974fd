"""Every /v1 call the proxy has no business with: streamed both ways, bytes untouched."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import httpx
from starlette.requests import Request
from starlette.responses import StreamingResponse

from proxy.errors import BadRequest, PayloadTooLarge, UpstreamError
from proxy.models import whole_number
from proxy.upstream import Upstream, close_quietly, request_headers, response_headers


def upstream_path(request: Request) -> str:
    """The path after /v1, still percent-encoded as the client sent it (a decoded %2F would change the route)."""
    raw: bytes = request.scope.get("raw_path") or request.scope["path"].encode()
    return raw[3:].decode("latin-1") if raw.startswith(b"/v1") else raw.decode("latin-1")


def declared_length(request: Request, limit: int) -> int | None:
    value = request.headers.get("content-length")
    if value is None:
        return None
    length = whole_number(value)
    if length is None:
        raise BadRequest("invalid Content-Length header", code="invalid_content_length")
    if length > limit:
        raise PayloadTooLarge(f"request body of {length} bytes is over the limit of {limit} bytes")
    return length


T = TypeVar("T")
OFF_LOOP = 256 * 1024  # bytes of JSON read in a thread rather than on the event loop (~1 ms of orjson and up)


async def off_loop(size: int, work: Callable[[], T]) -> T:
    """`work()` (reading `size` bytes of JSON, and what follows from it), in a thread when `size` is large enough
    to hold up every other request: 30 MB of `[],` take orjson 2-3 s to read."""
    return await asyncio.to_thread(work) if size > OFF_LOOP else work()


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing more than `limit` bytes whether or not Content-Length was declared."""
    declared_length(request, limit)
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _limited(request: Request, limit: int) -> AsyncIterator[bytes]:
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
        if chunk:
            yield chunk


async def passthrough(request: Request) -> StreamingResponse:
    request.app.state.gate.client(request)  # with proxy keys on, nobody spends the upstream key without one
    upstream: Upstream = request.app.state.upstream
    limit: int = request.app.state.settings.max_body_bytes
    length = declared_length(request, limit)
    chunked = "chunked" in request.headers.get("transfer-encoding", "").lower()
    # A GET sent with a chunked empty body confuses some servers: only stream a body the client sent one.
    content = _limited(request, limit) if length or chunked else None
    response = await upstream.send(request.method, upstream_path(request), request.scope["query_string"],
                                   request_headers(request.headers.raw, upstream.key), content)
    return relay(response)


def relay(response: httpx.Response) -> StreamingResponse:
    """The upstream's answer as it came: status, headers (less hop-by-hop) and raw, still-encoded bytes."""
    relayed = StreamingResponse(raw_body(response), status_code=response.status_code)
    relayed.raw_headers = response_headers(response.headers)
    return relayed


async def raw_body(response: httpx.Response) -> AsyncIterator[bytes]:
    try:
        async for chunk in response.aiter_raw():
            yield chunk
    except httpx.TransportError as exc:
        # Headers are out already: all we can do is cut the connection so the client sees an incomplete body.
        raise UpstreamError(f"the upstream broke off its answer: {exc or type(exc).__name__}") from exc
    finally:
        await close_quietly(response)
