"""POST /v1/responses (the Responses API): the memory pipeline, readable top to bottom, as for chats.

    user      = identify(request)                      no user → forwarded byte for byte, no memory involved
    turn      = begin(request, chains.name(body))      the session: X-Memory-Session, metadata.session_id, the
                                                       `conversation`, else the previous_response_id chain's
    decided   = plan_response(body)                    where memories go; inline, background or off
    hits      = recall(user, newest user input)        within a time budget; a fault → answer without memory
    body      = rewrite_response(body, hits, decided)  text added to the client's instructions or input, no item
    response  = forward(body)                          unchanged bytes when nothing was added
    answer    = filter(response)                       no block in any place the answer's text appears; an answer
                                                       that may not hold one is relayed untouched
    remember(blocks), record(turn, answer)             queued once the answer is out, stored off the request path;
    submit(turn)                                       background mode: the turn goes to the extraction call

The upstream keeps a Responses conversation itself (`previous_response_id`, `conversation`), so the proxy neither
prepends stored turns nor trims the input (`session_history = "prepend"`, `context_window`, `context_budgets` are
for chats); sessions record the turns and recall past conversations.

    GET /v1/responses/{id}                             a stored response (or its stream) comes back without blocks
"""

from __future__ import annotations

import functools
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from proxy import chains, delivery, transcript
from proxy.delivery import Blocks, deliver, identified, operations, parts, recall
from proxy.errors import BadRequest
from proxy.extraction import Exchange
from proxy.passthrough import off_loop, relay, upstream_path
from proxy.plan import EXTRACTION_HEADER
from proxy.responses_input import plan_response, rewrite_response, turn_messages
from proxy.responses_output import filter_response, response_id
from proxy.responses_stream import ResponsesStreamFilter
from proxy.search import question as search_question
from proxy.upstream import Upstream, credentials, request_headers


async def create_response(request: Request) -> Response:
    settings, upstream, memories, sessions, extractor = parts(request)
    raw, body, user, unusable = await identified(request, settings, parse_request)
    path, query = upstream_path(request), request.scope["query_string"]
    if body is None or user is None or memories is None:
        return delivery.said(relay(await delivery.unless_client_leaves(request, upstream.send(
            "POST", path, query, request_headers(request.headers.raw, upstream.key), raw))), unusable)

    known: chains.Chains = request.app.state.chains
    messages = turn_messages(body)
    turn = sessions.begin(request, body, user, name=chains.name(request, body, known), messages=messages)
    decided = plan_response(body, settings.memory_placement, extraction=settings.extraction,
                            asked=request.headers.get(EXTRACTION_HEADER),
                            background_models=settings.background_patterns)
    question = search_question(messages) if decided.recall else ""  # with the user's message before, as in chat
    hits, fault = await recall(memories, user, question, settings.recall_budget_ms)
    excerpts = await sessions.recall(user, turn, question)
    upstream_body, aliases, fault = delivery.injected(rewrite_response, body, hits, decided, settings, excerpts,
                                                      fault)
    content = raw if upstream_body is body else await off_loop(len(raw), functools.partial(orjson.dumps, upstream_body))
    response = await delivery.unless_client_leaves(request, upstream.send(
        "POST", path, query, delivery.rewritable(request, upstream), content))

    ours = delivery.memory_headers(aliases, decided.extraction, fault)
    recalled = [hit for hit in hits if hit.memory.id in aliases.values()]
    background = decided.extraction == "background"
    stream = ResponsesStreamFilter(max_event=settings.filter_max_bytes, max_block=settings.memory_block_max_chars)

    def made(found: str | None) -> None:
        """The response's id is known: a turn that names it as its previous one is in this turn's session."""
        if turn is not None and found:
            turn.session = turn.session or found
            known.link(found, turn.session)

    def remember(blocks: Blocks, answer: bytes) -> None:
        memories.remember(user, operations(blocks, aliases, recalled, memories.max_chars))
        if turn is not None:
            made(stream.response_id or response_id(answer))
            sessions.record(turn, answer)
        if background and extractor is not None:
            extractor.submit(Exchange(user, transcript.said(messages), transcript.answer_text(answer),
                                      str(body.get("model") or ""), credentials(request.headers.raw)))

    def filter_body(parsed: Any, max_block: int) -> tuple[Any, Blocks]:
        made(parsed.get("id") if isinstance(parsed, dict) else None)  # before the client has it, not after
        return filter_response(parsed, max_block)

    keep = settings.filter_max_bytes if turn is not None or background else 0  # the raw answer, for the record
    return await deliver(response, remember, ours, settings, inline=decided.inline, keep_bytes=keep, stream=stream,
                         filter_body=filter_body)


async def retrieve_response(request: Request) -> Response:
    """A stored response (`GET /v1/responses/{id}`, `?stream=true` too) without the blocks its answer held."""
    settings = request.app.state.settings
    upstream: Upstream = request.app.state.upstream
    request.app.state.gate.client(request)
    response = await delivery.unless_client_leaves(request, upstream.send(
        "GET", upstream_path(request), request.scope["query_string"], delivery.rewritable(request, upstream), None))
    stream = ResponsesStreamFilter(max_event=settings.filter_max_bytes, max_block=settings.memory_block_max_chars)
    return await deliver(response, forget, [], settings, inline=True, keep_bytes=0, stream=stream,
                         filter_body=filter_response)


def forget(blocks: Blocks, answer: bytes) -> None:
    """A retrieved answer was remembered when it was made."""


def parse_request(body: bytes, max_items: int) -> dict[str, Any]:
    data = delivery.json_object(body)
    given = data.get("input")
    if given is not None and not isinstance(given, str | list):
        raise BadRequest("'input' must be a string or an array of input items", param="input", code="invalid_type")
    if isinstance(given, list) and len(given) > max_items:
        raise BadRequest(f"'input' holds {len(given)} items, over the limit of {max_items}", param="input",
                         code="too_many_messages")
    return data
