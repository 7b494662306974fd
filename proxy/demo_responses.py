"""The demo upstream's Responses API: `POST /v1/responses` (streamed or not) and `GET /v1/responses/{id}`.

The same pattern matcher as proxy/demo.py answers the request's `instructions` and `input` (a string, or message
items whose content is a string or `input_text` parts), in OpenAI's response object and streaming event sequence
(https://platform.openai.com/docs/api-reference/responses-streaming: created, in_progress, output_item.added,
content_part.added, output_text.delta..., output_text.done, content_part.done, output_item.done, completed, each
with its `sequence_number`). bench/upstream.py sends the same shapes. It remembers its last RECENT responses for
`GET`; `previous_response_id` is not followed (the proxy keeps its own record of a chain for recall).
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from proxy.demo import MODEL, answer, pieces
from proxy.errors import error_response

RECENT = 256  # responses kept for GET /v1/responses/{id}
ROLES = frozenset({"system", "developer", "user", "assistant"})


def response_object(response_id: str, item_id: str, model: str, text: str, *, created_at: int,
                    usage: dict[str, int] | None = None) -> dict[str, Any]:
    """A completed Responses API `response` holding one assistant message whose text is `text` (fields trimmed
    to those clients read; `usage` in tokens, omitted as null when not given)."""
    message = {"id": item_id, "type": "message", "status": "completed", "role": "assistant",
               "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}
    return {"id": response_id, "object": "response", "created_at": created_at, "status": "completed",
            "model": model, "output": [message], "error": None, "incomplete_details": None, "usage": usage}


def response_events(response: dict[str, Any], deltas: Sequence[str]) -> list[bytes]:
    """The SSE events of `response` (a completed one from response_object) streamed as `deltas`, whose
    concatenation is its text: `event: TYPE` and `data: JSON` lines, a blank line after each."""
    message = response["output"][0]
    text = message["content"][0]["text"]
    pending = {**response, "status": "in_progress", "output": [], "usage": None}
    where = {"item_id": message["id"], "output_index": 0, "content_index": 0}
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    sequence: list[dict[str, Any]] = [
        {"type": "response.created", "response": pending},
        {"type": "response.in_progress", "response": pending},
        {"type": "response.output_item.added", "output_index": 0,
         "item": {**message, "status": "in_progress", "content": []}},
        {"type": "response.content_part.added", **where, "part": part},
        *({"type": "response.output_text.delta", **where, "delta": delta, "logprobs": []} for delta in deltas),
        {"type": "response.output_text.done", **where, "text": text, "logprobs": []},
        {"type": "response.content_part.done", **where, "part": {**part, "text": text}},
        {"type": "response.output_item.done", "output_index": 0, "item": message},
        {"type": "response.completed", "response": response},
    ]
    return [b"event: %s\ndata: %s\n\n" % (event["type"].encode(), orjson.dumps({**event, "sequence_number": n}))
            for n, event in enumerate(sequence)]


def messages_of(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The request as chat messages (`instructions` first, as a system message); None when `input` is neither a
    string nor a list. Items that are not messages (function call outputs, reasoning) are left out."""
    items = body.get("input")
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    if not isinstance(items, list):
        return None
    instructions = body.get("instructions")
    messages = [{"role": "system", "content": instructions}] if isinstance(instructions, str) else []
    return messages + [{"role": item["role"], "content": item.get("content")} for item in items
                       if isinstance(item, dict) and item.get("role") in ROLES
                       and item.get("type", "message") == "message"]


class DemoResponses:
    """The two endpoints, with the last RECENT responses made."""

    def __init__(self) -> None:
        self.recent: OrderedDict[str, dict[str, Any]] = OrderedDict()

    async def create(self, request: Request) -> Response:
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError as exc:
            return error_response(400, f"the request body is not valid JSON: {exc}", "invalid_request_error",
                                  code="invalid_json")
        messages = messages_of(body) if isinstance(body, dict) else None
        if messages is None:
            return error_response(400, "'input' must be a string or an array of items", "invalid_request_error",
                                  param="input")
        text = answer(messages)
        words = sum(len(str(message["content"]).split()) for message in messages)
        usage = {"input_tokens": words, "output_tokens": len(text.split()), "total_tokens": words + len(text.split())}
        model = body.get("model") if isinstance(body.get("model"), str) else MODEL
        response = response_object(f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}", model, text,
                                   created_at=int(time.time()), usage=usage)
        self.recent[response["id"]] = response
        while len(self.recent) > RECENT:
            self.recent.popitem(last=False)
        if body.get("stream") is True:
            events: Iterator[bytes] = iter(response_events(response, pieces(text)))
            return StreamingResponse(events, media_type="text/event-stream")
        return Response(orjson.dumps(response), media_type="application/json")

    async def retrieve(self, request: Request) -> Response:
        response = self.recent.get(request.path_params["response_id"])
        if response is None:
            return error_response(404, f"no response {request.path_params['response_id']!r} (the demo upstream keeps "
                                  f"its last {RECENT})", "invalid_request_error", code="not_found")
        return Response(orjson.dumps(response), media_type="application/json")
