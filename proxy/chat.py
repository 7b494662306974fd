"""POST /v1/chat/completions: the memory pipeline, readable top to bottom."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import StreamingResponse

from proxy.errors import BadRequest
from proxy.passthrough import read_body, relay
from proxy.upstream import Upstream, request_headers


def parse_request(body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object", code="invalid_type")
    if not isinstance(data.get("messages"), list):
        raise BadRequest("'messages' must be an array of message objects", param="messages", code="invalid_type")
    return data


async def chat_completions(request: Request) -> StreamingResponse:
    upstream: Upstream = request.app.state.upstream
    body = await read_body(request, request.app.state.settings.max_body_bytes)
    parse_request(body)
    response = await upstream.send("POST", "/chat/completions", request.scope["query_string"],
                                   request_headers(request.headers.raw, upstream.key), body)
    return relay(response)
