"""The steps the chat and Responses pipelines share, so that both keep the same promises.

    parts(request), identified(request)   the app's parts; the body read and parsed, and the end user
    json_object(body)                     a request body that must be a JSON object (else 400)
    unless_client_leaves(request, send)   the upstream call, cancelled the moment the client hangs up
    recall(memories, user, text, budget)  the user's memories within a time budget; a fault → none, and why
    untouched(...)                        the answer exactly as it came (a stream or not)
    filtered_stream(...)                  an SSE answer through a stream filter (`decode(bytes) -> [bytes]`,
                                          `flush()`, `.blocks`), in slices that leave the event loop free
    filtered_answer(...)                  a whole JSON answer through a body filter, or as it came when it is not
                                          the JSON the filter knows
    deliver(...)                          one of those (or the upstream's error as it came), our headers added
    operations(blocks, ...)               what the blocks ask the store to do

Each delivery calls `remember(blocks, raw answer)` once the answer is out (or the client has gone), never before:
the store never waits on, nor delays, the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any, Protocol

import httpx
import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from proxy import extract, jsontext
from proxy.config import Settings
from proxy.errors import BadRequest, ClientGone, ProxyError, UpstreamError, UpstreamTimeout
from proxy.extraction import Extractor
from proxy.identity import identify, unusable_user
from proxy.memories import Memories
from proxy.models import Hit, Operation
from proxy.passthrough import off_loop, read_body, relay
from proxy.sessions import Sessions
from proxy.sniff import Answer, read_answer
from proxy.upstream import RawHeaders, Upstream, close_quietly, request_headers, response_headers

log = logging.getLogger("memory_proxy.chat")
# We read the answer decoded and may change its length, so these are ours to set, not the upstream's.
FILTERED = frozenset({b"content-length", b"content-encoding"})
# We may re-serialise the body and read the answer decoded, so these are ours to set, not the client's.
REWRITTEN = frozenset({b"content-length", b"accept-encoding"})
Blocks = dict[int, list[str]]  # block bodies per choice (chat) or output item (Responses), in answer order
Remember = Callable[[Blocks, bytes], None]  # the blocks, and the answer as it came
BodyFilter = Callable[[Any, int], tuple[Any, Blocks]]  # (parsed body, max block chars) → (body, blocks)
Rewrite = Callable[..., tuple[dict[str, Any], dict[str, str]]]  # (body, hits, plan, …) → (body, aliases)
SLICE = 16 * 1024  # bytes of a stream filtered between two turns of the event loop (~1-3 ms of work)


class StreamFilter(Protocol):
    """An incremental SSE filter: proxy.stream.ChatStreamFilter, proxy.responses_stream.ResponsesStreamFilter."""

    @property
    def blocks(self) -> Blocks: ...

    def decode(self, chunk: bytes) -> list[bytes]: ...

    def flush(self, *, broken: bool = False) -> list[bytes]: ...


def parts(request: Request) -> tuple[Settings, Upstream, Memories | None, Sessions, Extractor | None]:
    """What a pipeline uses of the app, as its lifespan set it up (memories: None until it has)."""
    state = request.app.state
    return (state.settings, state.upstream, getattr(state, "memories", None), state.sessions,
            getattr(state, "extractor", None))


async def identified(request: Request, settings: Settings, parse: Callable[[bytes, int], dict[str, Any]]
                     ) -> tuple[bytes, dict[str, Any] | None, str | None, str | None]:
    """The request's raw body, the body `parse`d (with the most items allowed), its end user (None: nobody named;
    proxy/identity.py) and why memory must stay out of it (None, or an `x-memory-error` value), once the caller
    may use the proxy at all.

    A body memory cannot work on (not the JSON `parse` reads: NaN, a BOM, `messages` not an array, more items
    than allowed) is the upstream's to judge, not ours: body None, fault `request-unreadable`, and the request is
    forwarded as it came. So is a body whose `user` names no one memories can be filed under: `user-invalid`."""
    gate = request.app.state.gate
    tenant = gate.client(request)
    raw = await read_body(request, settings.max_body_bytes)
    try:
        body = await off_loop(len(raw), lambda: parse(raw, settings.max_messages))
    except BadRequest as exc:
        log.info("memory cannot read this request (%s): forwarded as it came, without memory", exc.message)
        identify(request, {}, settings.user_header, gate, tenant)  # a malformed user header is still ours to refuse
        return raw, None, None, "request-unreadable"
    user = identify(request, body, settings.user_header, gate, tenant)
    return raw, body, user, "user-invalid" if user is None and unusable_user(body) else None


def injected(rewrite: Rewrite, body: dict[str, Any], hits: list[Hit], decided: object, settings: Settings,
             excerpts: Sequence[str], fault: str | None) -> tuple[dict[str, Any], dict[str, str], str | None]:
    """`rewrite(body, hits, decided, …)` (proxy/rewrite.py, proxy/responses_input.py): the body to send, the
    aliases shown, and the fault so far. Stored rows meet the prompt here: one that no write path of ours makes
    (another writer's, an older version's) costs this turn its memories, never the chat (`recall-failed`)."""
    try:
        upstream_body, aliases = rewrite(body, hits, decided, instruction=extract.INSTRUCTION,
                                         max_chars=settings.inject_max_chars, excerpts=excerpts)
    except Exception:
        log.exception("the recalled memories could not be rendered: answering without memory")
        return body, {}, "recall-failed"
    return upstream_body, aliases, fault


def said(response: Response, fault: str | None) -> Response:
    """`response` with `x-memory-error: fault` added (when there is one)."""
    if fault:
        response.raw_headers.append((b"x-memory-error", fault.encode()))
    return response


def rewritable(request: Request, upstream: Upstream) -> RawHeaders:
    """The client's headers for a request whose body may change and whose answer is read decoded."""
    headers = request_headers(request.headers.raw, upstream.key, drop=REWRITTEN)
    headers.append((b"accept-encoding", b"identity"))
    return headers


def memory_headers(aliases: dict[str, str], extraction: str, fault: str | None) -> RawHeaders:
    """x-memory-recalled (memories shown), x-memory-extraction (how the turn is learned), x-memory-error."""
    ours = [(b"x-memory-recalled", str(len(aliases)).encode()), (b"x-memory-extraction", extraction.encode())]
    return ours + ([(b"x-memory-error", fault.encode())] if fault else [])


async def deliver(response: httpx.Response, remember: Remember, ours: RawHeaders, settings: Settings, *,
                  inline: bool, keep_bytes: int, stream: StreamFilter, filter_body: BodyFilter) -> Response:
    """The upstream's answer to the client, with our headers: an error as it came (the upstream's to say); the
    answer untouched when no block was asked for; else through `stream` or `filter_body`."""
    if not 200 <= response.status_code < 300:
        relayed = relay(response)
        relayed.raw_headers.extend(ours)
        return relayed
    try:
        answer = await read_answer(response, settings.filter_max_bytes)
    except httpx.TransportError as exc:  # broken off (or malformed) before anything reached the client: 502 / 504
        await response.aclose()
        failed = UpstreamTimeout if isinstance(exc, httpx.TimeoutException) else UpstreamError
        raise failed(f"the upstream {response.request.url.netloc.decode('ascii')} broke off its answer: "
                     f"{exc or type(exc).__name__}") from exc
    if not inline:
        return untouched(response, answer, remember, ours, keep_bytes=keep_bytes)
    if answer.streamed:
        return streamed(filtered_stream(response, answer, remember, stream, keep_bytes=keep_bytes), response, ours)
    return await filtered_answer(response, answer, remember, ours, filter_body, settings.memory_block_max_chars)


def json_object(body: bytes) -> dict[str, Any]:
    """A request body that must be a JSON object; BadRequest otherwise."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object", code="invalid_type")
    return data


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
    pending = 0  # bytes fed since the filter last let an event out: one large event is read in a thread
    try:
        async for chunk in answer.chunks():
            kept.add(chunk)
            for start in range(0, len(chunk), SLICE):
                if start:  # a large read is thousands of events: let other requests run between slices
                    await asyncio.sleep(0)
                piece = chunk[start:start + SLICE]
                pending += len(piece)
                events = await off_loop(pending, functools.partial(stream.decode, piece))
                if events:
                    pending = 0
                    yield b"".join(events)
        events = stream.flush()
        if events:
            yield b"".join(events)
    except httpx.TransportError as exc:
        log.warning("the upstream broke off a stream: %s", exc or type(exc).__name__)
        events = stream.flush(broken=True)  # text held back (`<mem` that never became a tag) is the client's
        if events:
            yield b"".join(events)
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

    def filtered() -> tuple[Blocks, bytes]:
        try:
            parsed = jsontext.loads(raw)
            body, blocks = filter_body(parsed, max_block)
            return blocks, raw if body is parsed else jsontext.dumps_like(raw, parsed, body)
        except (TypeError, ValueError, KeyError, AttributeError):
            # Not the JSON we know: hand it over as it came. Nothing to remember, nothing to hide.
            return {}, raw

    blocks, content = await off_loop(len(raw), filtered)
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
