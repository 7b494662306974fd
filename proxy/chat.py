"""POST /v1/chat/completions (and Azure's deployment routes): the memory pipeline, readable top to bottom.

    user      = identify(request)                      no user → forwarded byte for byte, no memory involved
                                                       (only a model's token budget may trim it)
    turn      = begin(request)                         the session the proxy keeps, if any (proxy/sessions.py)
    body      = prepend(turn, body)                    prepend mode: the stored turns before the new ones
    decided   = plan(body)                             where memories go; inline, background or off
    hits      = recall(user, last user message)        within a time budget; a fault → answer without memory
    body      = rewrite(body, hits, decided)           text added to messages the client sent, none added
    body      = fit(turn, body)                        window / token budget; the summary for the turns cut
    response  = forward(body)                          unchanged bytes when nothing was added
    answer    = filter(response)                       the <memory> block never reaches the client; an answer
                                                       that may not hold one is relayed untouched
    remember(blocks), record(turn, answer)             queued once the answer is out, stored off the request path;
    submit(turn)                                       background mode: the turn goes to the extraction call
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any

import httpx
import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from proxy import extract, transcript
from proxy.config import Settings
from proxy.errors import BadRequest, ClientGone, ProxyError, UpstreamError
from proxy.extraction import Exchange, Extractor
from proxy.identity import identify
from proxy.memories import Memories
from proxy.models import Hit, Operation
from proxy.passthrough import read_body, relay, upstream_path
from proxy.plan import EXTRACTION_HEADER, plan
from proxy.rewrite import rewrite
from proxy.search import question as search_question
from proxy.sessions import Sessions
from proxy.sniff import Answer, read_answer
from proxy.stream import ChatStreamFilter, filter_completion
from proxy.upstream import RawHeaders, Upstream, close_quietly, credentials, request_headers, response_headers

log = logging.getLogger("memory_proxy.chat")
# We re-serialise the body and read the answer decoded, so these are ours to set, not the client's.
REWRITTEN = frozenset({b"content-length", b"accept-encoding"})
FILTERED = frozenset({b"content-length", b"content-encoding"})
Remember = Callable[[dict[int, list[str]], bytes], None]  # the blocks per choice, and the answer as it came
SLICE = 16 * 1024  # bytes of a stream filtered between two turns of the event loop (~1-3 ms of work)


async def chat_completions(request: Request) -> Response:
    state = request.app.state
    settings = state.settings
    upstream: Upstream = state.upstream
    memories: Memories | None = getattr(state, "memories", None)
    sessions: Sessions = state.sessions
    extractor: Extractor | None = getattr(state, "extractor", None)
    tenant = state.gate.client(request)
    raw = await read_body(request, settings.max_body_bytes)
    body = parse_request(raw, settings.max_messages)
    user = identify(request, body, settings.user_header, state.gate, tenant)
    path, query = upstream_path(request), request.scope["query_string"]
    if user is None or memories is None:
        fitted = await sessions.fit(None, body)
        content, drop = (raw, frozenset()) if fitted is body else (orjson.dumps(fitted), REWRITTEN)
        forwarded = await unless_client_leaves(request, upstream.send(
            "POST", path, query, request_headers(request.headers.raw, upstream.key, drop=drop), content))
        return relay(forwarded)

    turn = sessions.begin(request, body, user)
    said = transcript.said(body["messages"])
    body = await sessions.prepend(turn, body)
    decided = plan(body, settings.memory_placement, extraction=settings.extraction,
                   asked=request.headers.get(EXTRACTION_HEADER), background_models=settings.background_patterns)
    question = search_question(body["messages"]) if decided.recall else ""
    hits, fault = await recall(memories, user, question, settings.recall_budget_ms)
    excerpts = await sessions.recall(user, turn, question)
    upstream_body, aliases = rewrite(body, hits, decided, instruction=extract.INSTRUCTION,
                                     max_chars=settings.inject_max_chars, excerpts=excerpts)
    upstream_body = await sessions.fit(turn, upstream_body)
    unchanged = upstream_body is body and not (turn is not None and turn.prepended)
    headers = request_headers(request.headers.raw, upstream.key, drop=REWRITTEN)
    headers.append((b"accept-encoding", b"identity"))
    response = await unless_client_leaves(request, upstream.send(
        "POST", path, query, headers, raw if unchanged else orjson.dumps(upstream_body)))

    ours = [(b"x-memory-recalled", str(len(aliases)).encode()), (b"x-memory-extraction", decided.extraction.encode())]
    if fault:
        ours.append((b"x-memory-error", fault.encode()))
    if not 200 <= response.status_code < 300:  # the upstream's errors are the upstream's to say
        relayed = relay(response)
        relayed.raw_headers.extend(ours)
        return relayed

    recalled = [hit for hit in hits if hit.memory.id in aliases.values()]
    background = decided.extraction == "background"

    def remember(blocks: dict[int, list[str]], answer: bytes) -> None:
        memories.remember(user, operations(blocks, aliases, recalled, memories.max_chars))
        sessions.record(turn, answer)
        if background and extractor is not None:
            extractor.submit(Exchange(user, said, transcript.answer_text(answer), str(body.get("model") or ""),
                                      credentials(request.headers.raw)))

    keep = turn is not None or background
    answer = await read_answer(response, settings.filter_max_bytes)
    if not decided.inline:  # no block was asked for: the answer is the upstream's, byte for byte
        return untouched(response, answer, remember, ours, keep_answer=keep, max_bytes=settings.filter_max_bytes)
    if answer.streamed:
        stream = filtered_stream(response, answer, remember, settings, keep_answer=keep)
        streamed = StreamingResponse(stream, status_code=response.status_code)
        streamed.raw_headers = response_headers(response.headers, drop=FILTERED) + ours
        return streamed
    return await filtered_answer(response, answer, remember, ours, settings)


def parse_request(body: bytes, max_messages: int) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object", code="invalid_type")
    if not isinstance(data.get("messages"), list):
        raise BadRequest("'messages' must be an array of message objects", param="messages", code="invalid_type")
    if len(data["messages"]) > max_messages:
        raise BadRequest(f"'messages' holds {len(data['messages'])} messages, over the limit of {max_messages}",
                         param="messages", code="too_many_messages")
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


async def filtered_stream(response: httpx.Response, answer: Answer, remember: Remember, settings: Settings, *,
                          keep_answer: bool) -> AsyncIterator[bytes]:
    """The upstream's SSE with the blocks taken out. Blocks are remembered when the stream ends, however it ends
    (the client may leave once it has its answer), so the save never waits on, nor delays, the client. The raw
    answer is kept (up to filter_max_bytes) only when a session will record it."""
    stream = ChatStreamFilter(max_event=settings.filter_max_bytes, max_block=settings.memory_block_max_chars)
    kept = Kept(settings.filter_max_bytes if keep_answer else 0)
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


def untouched(response: httpx.Response, answer: Answer, remember: Remember, ours: RawHeaders, *,
              keep_answer: bool, max_bytes: int) -> Response:
    """The upstream's answer exactly as it came (a stream or not), then remembered as a turn with no blocks."""
    kept = Kept(max_bytes if keep_answer else 0)

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
                          settings: Settings) -> Response:
    if not answer.complete:  # longer than anything a block could hide in: relayed as it comes, unfiltered
        return untouched(response, answer, remember, ours, keep_answer=False, max_bytes=0)
    await close_quietly(response)
    raw = b"".join(answer.head)
    try:
        parsed = orjson.loads(raw)
        body, blocks = filter_completion(parsed, settings.memory_block_max_chars)
    except (orjson.JSONDecodeError, TypeError, ValueError, KeyError, AttributeError):
        # Not the JSON we know: hand it over as it came. Nothing to remember, nothing to hide.
        blocks, content = {}, raw
    else:
        content = raw if body is parsed else orjson.dumps(body)  # nothing taken out: the very same bytes
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


def operations(blocks: dict[int, list[str]], aliases: dict[str, str], recalled: Sequence[Hit],
               max_chars: int) -> list[Operation]:
    """What the blocks of every choice ask for, as one deduplicated list (proxy.extract.resolve)."""
    asked = (op for index in sorted(blocks) for block in blocks[index] for op in extract.parse(block))
    return extract.resolve(asked, aliases, recalled, max_chars)
