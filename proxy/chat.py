"""POST /v1/chat/completions: the memory pipeline, readable top to bottom.

    user      = identify(request)                      no user → forwarded byte for byte, no memory involved
                                                       (only a model's token budget may trim it)
    turn      = begin(request)                         the session the proxy keeps, if any (proxy/sessions.py)
    hits      = recall(user, last user message)        within a time budget; a fault → answer without memory
    body      = prepend(turn, body)                    prepend mode: the stored turns before the new ones
    body      = rewrite(request, hits)                 instruction + memories, earlier turns untouched
    body      = fit(turn, body)                        window / token budget; the summary for the turns cut
    response  = forward(body)
    answer    = filter(response)                       the <memory> block never reaches the client
    remember(blocks), record(turn, answer)             queued once the answer is out, stored off the request path
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

from proxy import extract
from proxy.errors import BadRequest, ClientGone, ProxyError
from proxy.identity import identify
from proxy.memories import Memories, clean_text
from proxy.models import Forget, Hit, NewMemory, Operation
from proxy.passthrough import read_body, relay
from proxy.rewrite import rewrite
from proxy.search import question as search_question
from proxy.sessions import Sessions
from proxy.stream import ChatStreamFilter, filter_completion
from proxy.upstream import RawHeaders, Upstream, close_quietly, request_headers, response_headers

log = logging.getLogger("memory_proxy.chat")
# We re-serialise the body and read the answer decoded, so these are ours to set, not the client's.
REWRITTEN = frozenset({b"content-length", b"accept-encoding"})
FILTERED = frozenset({b"content-length", b"content-encoding"})
Remember = Callable[[dict[int, list[str]], bytes], None]  # the blocks per choice, and the answer as it came


async def chat_completions(request: Request) -> Response:
    state = request.app.state
    settings = state.settings
    upstream: Upstream = state.upstream
    memories: Memories | None = getattr(state, "memories", None)
    sessions: Sessions = state.sessions
    tenant = state.gate.client(request)
    raw = await read_body(request, settings.max_body_bytes)
    body = parse_request(raw, settings.max_messages)
    user = identify(request, body, settings.user_header, state.gate, tenant)
    query = request.scope["query_string"]
    if user is None or memories is None:
        fitted = await sessions.fit(None, body)
        content, drop = (raw, frozenset()) if fitted is body else (orjson.dumps(fitted), REWRITTEN)
        forwarded = await unless_client_leaves(request, upstream.send(
            "POST", "/chat/completions", query, request_headers(request.headers.raw, upstream.key, drop=drop), content))
        return relay(forwarded)

    turn = sessions.begin(request, body, user)
    question = search_question(body["messages"])
    hits, fault = await recall(memories, user, question, settings.recall_budget_ms)
    excerpts = await sessions.recall(user, turn, question)
    body = await sessions.prepend(turn, body)
    upstream_body, aliases = rewrite(body, hits, instruction=extract.INSTRUCTION, max_chars=settings.inject_max_chars,
                                     excerpts=excerpts)
    upstream_body = await sessions.fit(turn, upstream_body)
    headers = request_headers(request.headers.raw, upstream.key, drop=REWRITTEN)
    headers.append((b"accept-encoding", b"identity"))
    response = await unless_client_leaves(
        request, upstream.send("POST", "/chat/completions", query, headers, orjson.dumps(upstream_body)))

    ours = [(b"x-memory-recalled", str(len(aliases)).encode())]
    if fault:
        ours.append((b"x-memory-error", fault.encode()))
    if not 200 <= response.status_code < 300:  # the upstream's errors are the upstream's to say
        relayed = relay(response)
        relayed.raw_headers.extend(ours)
        return relayed

    recalled = [hit for hit in hits if hit.memory.id in aliases.values()]

    def remember(blocks: dict[int, list[str]], answer: bytes) -> None:
        memories.remember(user, operations(blocks, aliases, recalled, memories.max_chars))
        sessions.record(turn, answer)

    if response.headers.get("content-type", "").startswith("text/event-stream"):
        streamed = StreamingResponse(filtered_stream(response, remember, keep_answer=turn is not None),
                                     status_code=response.status_code)
        streamed.raw_headers = response_headers(response.headers, drop=FILTERED) + ours
        return streamed
    return await filtered_answer(response, remember, ours)


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


async def filtered_stream(response: httpx.Response, remember: Remember, *, keep_answer: bool
                          ) -> AsyncIterator[bytes]:
    """The upstream's SSE with the blocks taken out. Blocks are remembered when the stream ends, however it ends
    (the client may leave once it has its answer), so the save never waits on, nor delays, the client. The raw
    answer is kept only when a session will record it."""
    stream = ChatStreamFilter()
    answer: list[bytes] = []
    try:
        async for chunk in response.aiter_bytes():
            if keep_answer:
                answer.append(chunk)
            for event in stream.decode(chunk):
                yield event
        for event in stream.flush():
            yield event
    except httpx.TransportError as exc:
        log.warning("the upstream broke off a stream: %s", exc or type(exc).__name__)
        error = {"message": "the upstream broke off its answer", "type": "upstream_error", "param": None,
                 "code": "upstream_disconnected"}
        yield b"data: " + orjson.dumps({"error": error}) + b"\n\n"
    finally:
        await close_quietly(response)
        remember(stream.blocks, b"".join(answer))


async def filtered_answer(response: httpx.Response, remember: Remember, ours: RawHeaders) -> Response:
    try:
        raw = await response.aread()
    finally:
        await close_quietly(response)
    try:
        body, blocks = filter_completion(orjson.loads(raw))
    except (orjson.JSONDecodeError, TypeError, ValueError, KeyError, AttributeError):
        # Not the JSON we know: hand it over as it came. Nothing to remember, nothing to hide.
        blocks, content = {}, raw
    else:
        content = orjson.dumps(body)
    answer = AnswerThenRemember(content, response.status_code, lambda: remember(blocks, raw))
    answer.raw_headers = [*response_headers(response.headers, drop=FILTERED),
                          (b"content-length", str(len(content)).encode()), *ours]
    return answer


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


def normalised(text: str) -> str:
    return " ".join(text.casefold().split()).rstrip(".!")


def operations(blocks: dict[int, list[str]], aliases: dict[str, str], recalled: Sequence[Hit],
               max_chars: int) -> list[Operation]:
    """What the blocks of every choice ask for, as one deduplicated list: short ids resolved to real ones,
    facts the model was just shown dropped (no feedback loop), unknown ids ignored."""
    seen = {normalised(hit.memory.text) for hit in recalled}
    result: list[Operation] = []
    forgotten: set[str] = set()
    for index in sorted(blocks):
        for block in blocks[index]:
            for op in extract.parse(block):
                if isinstance(op, Forget):
                    real = aliases.get(op.id)
                    if real and real not in forgotten:
                        forgotten.add(real)
                        result.append(Forget(real))
                    continue
                key = normalised(clean_text(op.text, max_chars))
                if not key or key in seen:
                    continue
                seen.add(key)
                result.append(NewMemory(op.text, op.category, "inline", op.ttl_seconds,
                                        aliases.get(op.replaces) if op.replaces else None))
    return result
