"""POST /v1/chat/completions (and Azure's deployment routes): the memory pipeline, readable top to bottom.

    user      = identify(request)                      no user → forwarded byte for byte, no memory involved
                                                       (only a model's token budget may trim it); so is a
                                                       body memory cannot read (the upstream's to judge)
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

import functools
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from proxy import delivery, transcript
from proxy.delivery import Blocks, deliver, identified, operations, parts, recall
from proxy.errors import BadRequest
from proxy.extraction import Exchange
from proxy.passthrough import off_loop, relay, upstream_path
from proxy.plan import EXTRACTION_HEADER, plan
from proxy.rewrite import rewrite
from proxy.search import question as search_question
from proxy.stream import ChatStreamFilter, filter_completion
from proxy.upstream import credentials, request_headers


async def chat_completions(request: Request) -> Response:
    settings, upstream, memories, sessions, extractor = parts(request)
    raw, body, user, unusable = await identified(request, settings, parse_request)
    path, query = upstream_path(request), request.scope["query_string"]
    if body is None or user is None or memories is None:
        fitted = body if body is None else await sessions.fit(None, body)
        content, drop = (raw, frozenset()) if fitted is body else (orjson.dumps(fitted), delivery.REWRITTEN)
        forwarded = await delivery.unless_client_leaves(request, upstream.send(
            "POST", path, query, request_headers(request.headers.raw, upstream.key, drop=drop), content))
        return delivery.said(relay(forwarded), unusable)

    turn = sessions.begin(request, body, user)
    said = transcript.said(body["messages"])
    body = await sessions.prepend(turn, body)
    decided = plan(body, settings.memory_placement, extraction=settings.extraction,
                   asked=request.headers.get(EXTRACTION_HEADER), background_models=settings.background_patterns)
    question = search_question(body["messages"]) if decided.recall else ""
    hits, fault = await recall(memories, user, question, settings.recall_budget_ms)
    excerpts = await sessions.recall(user, turn, question)
    upstream_body, aliases, fault = delivery.injected(rewrite, body, hits, decided, settings, excerpts, fault)
    upstream_body = await sessions.fit(turn, upstream_body)
    unchanged = upstream_body is body and not (turn is not None and turn.prepended)
    content = raw if unchanged else await off_loop(len(raw), functools.partial(orjson.dumps, upstream_body))
    response = await delivery.unless_client_leaves(request, upstream.send(
        "POST", path, query, delivery.rewritable(request, upstream), content))

    ours = delivery.memory_headers(aliases, decided.extraction, fault)
    recalled = [hit for hit in hits if hit.memory.id in aliases.values()]
    background = decided.extraction == "background"

    def remember(blocks: Blocks, answer: bytes) -> None:
        memories.remember(user, operations(blocks, aliases, recalled, memories.max_chars))
        sessions.record(turn, answer)
        if background and extractor is not None:
            extractor.submit(Exchange(user, said, transcript.answer_text(answer), str(body.get("model") or ""),
                                      credentials(request.headers.raw)))

    keep = settings.filter_max_bytes if turn is not None or background else 0  # the raw answer, for the record
    stream = ChatStreamFilter(max_event=settings.filter_max_bytes, max_block=settings.memory_block_max_chars)
    return await deliver(response, remember, ours, settings, inline=decided.inline, keep_bytes=keep, stream=stream,
                         filter_body=filter_completion)


def parse_request(body: bytes, max_messages: int) -> dict[str, Any]:
    data = delivery.json_object(body)
    if not isinstance(data.get("messages"), list):
        raise BadRequest("'messages' must be an array of message objects", param="messages", code="invalid_type")
    if len(data["messages"]) > max_messages:
        raise BadRequest(f"'messages' holds {len(data['messages'])} messages, over the limit of {max_messages}",
                         param="messages", code="too_many_messages")
    return data
