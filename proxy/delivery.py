"""The steps the chat and Responses pipelines share, so that both keep the same promises.

    unless_client_leaves(request, send)   the upstream call, cancelled the moment the client hangs up
    recall(memories, user, text, budget)  the user's memories within a time budget; a fault → none, and why
    untouched(...)                        the answer exactly as it came (a stream or not)
    filtered_stream(...)                  an SSE answer through a stream filter (`decode(bytes) -> [bytes]`,
                                          `flush()`, `.blocks`), in slices that leave the event loop free
    filtered_answer(...)                  a whole JSON answer through a body filter, or as it came when it is not
                                          the JSON the filter knows
    operations(blocks, ...)               what the blocks ask the store to do

Each delivery calls `remember(blocks, raw answer)` once the answer is out (or the client has gone), never before:
the store never waits on, nor delays, the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any, Protocol

import httpx
import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from proxy import extract
from proxy.errors import ClientGone, ProxyError, UpstreamError
from proxy.memories import Memories
from proxy.models import Hit, Operation
from proxy.sniff import Answer
from proxy.upstream import RawHeaders, close_quietly, response_headers

log = logging.getLogger("memory_proxy.chat")
# We read the answer decoded and may change its length, so these are ours to set, not the upstream's.
FILTERED = frozenset({b"content-length", b"content-encoding"})
Blocks = dict[int, list[str]]  # block bodies per choice (chat) or output item (Responses), in answer order
Remember = Callable[[Blocks, bytes], None]  # the blocks, and the answer as it came
BodyFilter = Callable[[Any, int], tuple[Any, Blocks]]  # (parsed body, max block chars) → (body, blocks)
SLICE = 16 * 1024  # bytes of a stream filtered between two turns of the event loop (~1-3 ms of work)


class StreamFilter(Protocol):
    """An incremental SSE filter: proxy.stream.ChatStreamFilter, proxy.responses_stream.ResponsesStreamFilter."""

    @property
    def blocks(self) -> Blocks: ...

    def decode(self, chunk: bytes) -> list[bytes]: ...

    def flush(self) -> list[bytes]: ...


async def unless_client_leaves(request: Request, sending: Coroutine[Any, Any, httpx.Response]) -> httpx.Response:
    """The upstream's response, unless the client hangs up first: then the upstream request is cancelled (its
    connection closed) at once, rather than held until the model answers, up to read_timeout, for nobody."""
    send = asyncio.ensure_future(sending)
    left = asyncio.ensure_future(hung_up(request.receive))
    try:
        await asyncio.wait((send, left), return_when=asyncio.FIRST_COMPLETED)
    finally:
        left.cancel()
        if not send.done():
            send.cancel()
            with contextlib.suppress(asyncio.CancelledError, ProxyError):
                await send
    if send.cancelled():
        raise ClientGone("the client closed the connection before the upstream answered")
    return send.result()


async def hung_up(receive: Receive) -> None:
    """Returns when the client disconnects (the body has been read: nothing else can arrive)."""
    with contextlib.suppress(Exception):  # a receive channel that breaks has lost its connection too
        while (await receive())["type"] != "http.disconnect":
            pass


async def recall(memories: Memories, user: str, text: str, budget_ms: float) -> tuple[list[Hit], str | None]:
    """The user's memories for this question, or none and the reason: memory never breaks a chat."""
    try:
        async with asyncio.timeout(budget_ms / 1000):
            return await memories.recall(user, text), None
    except TimeoutError:
        log.warning("recall took longer than %.0f ms: answering without memory", budget_ms)
        return [], "recall-timeout"
    except Exception:
        log.exception("recall failed: answering without memory")
        return [], "recall-failed"


async def filtered_stream(response: httpx.Response, answer: Answer, remember: Remember, stream: StreamFilter, *,
                          keep_bytes: int) -> AsyncIterator[bytes]:
    """The upstream's SSE through `stream`. Blocks are remembered when the stream ends, however it ends (the
    client may leave once it has its answer). The raw answer is kept up to `keep_bytes` (0: not at all)."""
    kept = Kept(keep_bytes)
    try:
        async for chunk in answer.chunks():
            kept.add(chunk)
            for start in range(0, len(chunk), SLICE):
                if start:  # a large read is thousands of events: let other requests run between slices
                    await asyncio.sleep(0)
                events = stream.decode(chunk[start:start + SLICE])
                if events:
                    yield b"".join(events)
        events = stream.flush()
        if events:
            yield b"".join(events)
    except httpx.TransportError as exc:
        log.warning("the upstream broke off a stream: %s", exc or type(exc).__name__)
        error = {"message": "the upstream broke off its answer", "type": "upstream_error", "param": None,
                 "code": "upstream_disconnected"}
        yield b"data: " + orjson.dumps({"error": error}) + b"\n\n"
    finally:
        await close_quietly(response)
        remember(stream.blocks, kept.value())


def streamed(body: AsyncIterator[bytes], response: httpx.Response, ours: RawHeaders) -> StreamingResponse:
    """A filtered stream with the upstream's status and headers (less those the filter invalidates) and ours."""
    relayed = StreamingResponse(body, status_code=response.status_code)
    relayed.raw_headers = response_headers(response.headers, drop=FILTERED) + ours
    return relayed


def untouched(response: httpx.Response, answer: Answer, remember: Remember, ours: RawHeaders, *,
              keep_bytes: int) -> Response:
    """The upstream's answer exactly as it came (a stream or not), then remembered as a turn with no blocks."""
    kept = Kept(keep_bytes)

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in answer.chunks():
                kept.add(chunk)
                yield chunk
        except httpx.TransportError as exc:
            raise UpstreamError(f"the upstream broke off its answer: {exc or type(exc).__name__}") from exc
        finally:
            await close_quietly(response)
            remember({}, kept.value())

    relayed = StreamingResponse(body(), status_code=response.status_code)
    relayed.raw_headers = response_headers(response.headers) + ours
    return relayed


async def filtered_answer(response: httpx.Response, answer: Answer, remember: Remember, ours: RawHeaders,
                          filter_body: BodyFilter, max_block: int) -> Response:
    """A whole JSON answer through `filter_body`; the very same bytes when nothing was taken out."""
    if not answer.complete:  # longer than anything a block could hide in: relayed as it comes, unfiltered
        return untouched(response, answer, remember, ours, keep_bytes=0)
    await close_quietly(response)
    raw = b"".join(answer.head)
    try:
        parsed = orjson.loads(raw)
        body, blocks = filter_body(parsed, max_block)
    except (orjson.JSONDecodeError, TypeError, ValueError, KeyError, AttributeError):
        # Not the JSON we know: hand it over as it came. Nothing to remember, nothing to hide.
        blocks, content = {}, raw
    else:
        content = raw if body is parsed else orjson.dumps(body)
    relayed = AnswerThenRemember(content, response.status_code, lambda: remember(blocks, raw))
    relayed.raw_headers = [*response_headers(response.headers, drop=FILTERED),
                           (b"content-length", str(len(content)).encode()), *ours]
    return relayed


class Kept:
    """The raw answer, kept for the session's record up to `limit` bytes; past it nothing is kept (a turn
    recorded half would mislead later turns more than a turn recorded without its answer)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self.chunks: list[bytes] = []

    def add(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size <= self.limit:
            self.chunks.append(chunk)
        elif self.chunks:
            self.chunks = []

    def value(self) -> bytes:
        return b"".join(self.chunks)


class AnswerThenRemember(Response):
    """A complete response that queues its blocks only once it has been sent (or the client has gone)."""

    def __init__(self, content: bytes, status_code: int, after: Callable[[], None]) -> None:
        super().__init__(content, status_code)
        self.after = after

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.after()


def operations(blocks: Blocks, aliases: dict[str, str], recalled: Sequence[Hit], max_chars: int) -> list[Operation]:
    """What the blocks of every choice ask for, as one deduplicated list (proxy.extract.resolve)."""
    asked = (op for index in sorted(blocks) for block in blocks[index] for op in extract.parse(block))
    return extract.resolve(asked, aliases, recalled, max_chars)
