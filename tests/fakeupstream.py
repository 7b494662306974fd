"""A fake OpenAI-compatible upstream: the only stand-in in the end-to-end tests (the remote LLM).

It records every request it receives and answers chat completions from a script the test sets
(`FakeUpstream.replies`), streamed or not as the client asked.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from proxy.extract import EXTRACTION_PROMPT
from tests.fakeresponses import Output, ResponsesAPI, unparseable

CREATED = 1_700_000_000  # fixed, so two answers to the same request are byte-identical


@dataclass
class Recorded:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The body as Python servers (FastAPI's `request.json()`, so vLLM's and llama-cpp-python's) read it:
        the standard library's parser, which takes NaN, Infinity, escaped lone surrogates and a UTF-8 BOM."""
        return json.loads(self.body)



@dataclass
class Reply:
    """What the next chat completion answers: text per choice, how it is cut into stream chunks, and faults."""

    text: str | list[str] = "Hello!"
    chunk_size: int = 3
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    drop_after: int | None = None  # cut the connection after this many stream chunks
    delay: float = 0.0  # seconds between stream chunks
    wait: float = 0.0  # seconds before answering at all (a model's time to its first token)
    media_type: str | None = None  # a server that labels its stream (or body) wrongly
    tool_calls: list[dict[str, Any]] | None = None  # the model calls these tools (content null)
    output: Output | None = None  # a Responses API answer: reasoning, message, calls (default: from `text`)
    split_seed: int | None = None  # Responses API: the body sent in pieces cut at random bytes
    # The answer's bytes as a server wrote them (a body, or a stream's chunks; drop_after applies): what orjson
    # never writes, as Python's json.dumps does (`-Infinity`, escaped lone surrogates, `1E2`, big integers).
    raw: bytes | list[bytes] | None = None


# What real chat templates say when a request's role layout does not fit them (vLLM / llama.cpp / Ollama
# render the template and answer 400 with the template's own exception text).
TEMPLATE_ERRORS = {
    "qwen3": "System message must be at the beginning.",  # Qwen2.5/Qwen3 templates
    "no-system": "System role not supported",  # Gemma-style templates
}


# How servers without structured outputs refuse `response_format` json_schema. llama-cpp-python's server (0.3.36,
# measured) answers its request validation error with a 500 that quotes it, the traceback's last frame included.
SCHEMA_REFUSALS: dict[str, tuple[int, dict[str, Any]]] = {
    "400": (400, {"message": "response_format is not supported", "type": "BadRequestError",
                  "param": "response_format", "code": 400}),
    "llama-cpp-python": (500, {"message": "1 validation error:\n  {'type': 'literal_error', 'loc': ('body', "
                               "'response_format', 'type'), 'msg': \"Input should be 'text' or 'json_object'\", "
                               "'input': 'json_schema', 'ctx': {'expected': \"'text' or 'json_object'\"}}\n\n  "
                               "File \"/venv/lib/python3.11/site-packages/llama_cpp/server/app.py\", line 376, in "
                               "create_chat_completion\n    POST /v1/chat/completions",
                               "type": "internal_server_error", "param": None, "code": None}),
}


def is_extraction(body: Any) -> bool:
    """A background extraction call of the proxy (its prompt opens the one user message)."""
    try:
        return str(body["messages"][0]["content"]).startswith(EXTRACTION_PROMPT[:60])
    except (KeyError, IndexError, TypeError):
        return False


class FakeUpstream:
    def __init__(self, template: str | None = None) -> None:
        self.template = template
        self.extraction_replies: deque[Reply] = deque()
        self.refuse_schema: str | None = None  # a key of SCHEMA_REFUSALS
        self.reasoning = False  # refuses `max_tokens` in an extraction call, as OpenAI's reasoning models do
        self.requests: list[Recorded] = []
        self.replies: deque[Reply] = deque()
        self.streams_open = 0
        self.streams_closed = 0
        self.sent_at: list[float] = []  # when each content chunk of a stream was sent (time.monotonic())
        self.responses_api = ResponsesAPI(self)
        self.app = Starlette(routes=[
            Route("/v1/models", self.models),
            Route("/v1/embeddings", self.embeddings, methods=["POST"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/openai/deployments/{deployment}/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/deployments/{deployment}/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/responses", self.responses_api.create, methods=["POST"]),
            Route("/openai/responses", self.responses_api.create, methods=["POST"]),
            Route("/openai/v1/responses", self.responses_api.create, methods=["POST"]),
            Route("/v1/responses/{rid}", self.responses_api.retrieve, methods=["GET"]),
            Route("/v1/slow", self.slow),
            Route("/v1/{path:path}", self.echo, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
        ])

    def reply(self, *replies: Reply | str) -> None:
        self.replies.extend(Reply(r) if isinstance(r, str) else r for r in replies)

    async def record(self, request: Request) -> Recorded:
        recorded = Recorded(request.method, request.url.path, request.url.query,
                            dict(request.headers), await request.body())
        self.requests.append(recorded)
        return recorded

    @property
    def chats(self) -> list[Recorded]:
        """The chat requests, background extraction calls left out."""
        return [r for r in self.requests if r.path.endswith("/chat/completions") and not is_extraction(r.json())]

    @property
    def responses(self) -> list[Recorded]:
        """The Responses API requests (`POST /v1/responses`)."""
        return [r for r in self.requests if r.method == "POST" and r.path.endswith("/responses")]

    @property
    def extractions(self) -> list[Recorded]:
        return [r for r in self.requests if r.path.endswith("/chat/completions") and is_extraction(r.json())]

    async def extract(self, body: dict[str, Any]) -> Response:
        """The extraction model: answers from `extraction_replies` (a Reply whose text is the JSON it writes).
        Like servers that lack structured outputs, it can refuse `response_format` (`refuse_schema`), each server
        in its own way (SCHEMA_REFUSALS)."""
        if self.reasoning and "max_tokens" in body:  # OpenAI's o-series, word for word
            return JSONResponse({"error": {
                "message": "Unsupported parameter: 'max_tokens' is not supported with this model. Use "
                           "'max_completion_tokens' instead.", "type": "invalid_request_error", "param": "max_tokens",
                "code": "unsupported_parameter"}}, status_code=400)
        if self.refuse_schema and "response_format" in body:
            status, error = SCHEMA_REFUSALS[self.refuse_schema]
            return JSONResponse({"error": error}, status_code=status)
        reply = self.extraction_replies.popleft() if self.extraction_replies else Reply('{"memories": []}')
        if reply.delay:
            await asyncio.sleep(reply.delay)
        if reply.status != 200:
            return JSONResponse({"error": reply.error or {"message": "overloaded", "type": "server_error",
                                                          "param": None, "code": None}},
                                status_code=reply.status, headers=reply.headers)
        text = reply.text if isinstance(reply.text, str) else reply.text[0]
        return JSONResponse({"id": "chatcmpl-x", "object": "chat.completion", "created": CREATED,
                             "model": body["model"], "choices": [{"index": 0, "message": {
                                 "role": "assistant", "content": text}, "finish_reason": "stop"}],
                             "usage": {"prompt_tokens": 321, "completion_tokens": 12, "total_tokens": 333}})

    def refused(self, messages: list[Any]) -> str | None:
        """The template's error for this role layout, or None when it renders."""
        roles = [m.get("role") for m in messages if isinstance(m, dict)]
        if self.template == "qwen3" and any(role == "system" for role in roles[1:]):
            return TEMPLATE_ERRORS["qwen3"]
        if self.template == "no-system" and any(role in ("system", "developer") for role in roles):
            return TEMPLATE_ERRORS["no-system"]
        return None

    async def models(self, request: Request) -> Response:
        await self.record(request)
        return JSONResponse({"object": "list", "data": [
            {"id": "fake-model", "object": "model", "created": 1, "owned_by": "test"}]})

    async def embeddings(self, request: Request) -> Response:
        body = (await self.record(request)).json()
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        return JSONResponse({"object": "list", "model": body["model"], "data": [
            {"object": "embedding", "index": i, "embedding": [0.1 * (i + 1), 0.2, 0.3]} for i in range(len(inputs))],
            "usage": {"prompt_tokens": 3, "total_tokens": 3}})

    async def echo(self, request: Request) -> Response:
        rec = await self.record(request)
        return JSONResponse({"method": rec.method, "path": rec.path, "query": rec.query,
                             "headers": rec.headers, "body": rec.body.decode("utf-8", "replace")})

    async def slow(self, request: Request) -> Response:
        await self.record(request)
        await asyncio.sleep(5)
        return JSONResponse({"late": True})

    async def chat(self, request: Request) -> Response:
        recorded = await self.record(request)
        refusal = unparseable(recorded)
        if refusal is not None:
            return refusal
        body = recorded.json()
        if not isinstance(body.get("messages"), list):
            return JSONResponse({"error": {"message": "Invalid type for 'messages': expected an array.",
                                           "type": "invalid_request_error", "param": "messages",
                                           "code": "invalid_type"}}, status_code=400)
        if is_extraction(body):
            return await self.extract(body)
        refused = self.refused(body["messages"])
        if refused:
            return JSONResponse({"error": {"message": refused, "type": "BadRequestError", "param": None,
                                           "code": 400}}, status_code=400)
        reply = self.replies.popleft() if self.replies else Reply()
        await asyncio.sleep(reply.wait)
        if reply.status != 200:
            error = reply.error or {"message": "fake error", "type": "rate_limit_error", "param": None,
                                    "code": "rate_limit_exceeded"}
            return JSONResponse({"error": error}, status_code=reply.status, headers=reply.headers)
        if isinstance(reply.raw, bytes):
            return Response(reply.raw, headers=reply.headers, media_type="application/json")
        if reply.raw is not None:
            return StreamingResponse(self.raw_stream(reply.raw, reply), media_type="text/event-stream")
        texts = reply.text if isinstance(reply.text, list) else [reply.text] * int(body.get("n") or 1)
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(self.stream(body, texts, reply, include_usage),
                                     media_type=reply.media_type or "text/event-stream", headers=reply.headers)
        messages = [{"role": "assistant", "content": None if reply.tool_calls else t, "refusal": None,
                     **({"tool_calls": reply.tool_calls} if reply.tool_calls else {})} for t in texts]
        return Response(orjson.dumps({
            "id": "chatcmpl-fake", "object": "chat.completion", "created": CREATED, "model": body["model"],
            "choices": [{"index": i, "message": message, "logprobs": None,
                         "finish_reason": "tool_calls" if reply.tool_calls else "stop"}
                        for i, message in enumerate(messages)],
            "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
        }), headers=reply.headers, media_type=reply.media_type or "application/json")

    async def raw_stream(self, chunks: list[bytes], reply: Reply):  # type: ignore[no-untyped-def]
        for n, chunk in enumerate(chunks):
            if reply.drop_after is not None and n >= reply.drop_after:
                raise ConnectionResetError("fake upstream drops the stream")
            yield chunk

    async def stream(self, body: dict[str, Any], texts: list[str], reply: Reply, include_usage: bool):  # type: ignore[no-untyped-def]
        self.streams_open += 1
        base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": CREATED,
                "model": body["model"], "system_fingerprint": "fp_fake"}

        def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            return b"data: " + orjson.dumps({**base, "choices": choices, **extra}) + b"\n\n"

        sent = 0
        try:
            for i in range(len(texts)):
                yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            if reply.tool_calls:
                for i in range(len(texts)):
                    for n, call in enumerate(reply.tool_calls):
                        yield event([{"index": i, "delta": {"tool_calls": [{"index": n, **call}]},
                                      "finish_reason": None}])
                texts = [""] * len(texts)
            pieces = [[t[j:j + reply.chunk_size] for j in range(0, len(t), reply.chunk_size)] for t in texts]
            for step in range(max(map(len, pieces), default=0)):
                for i, parts in enumerate(pieces):
                    if step < len(parts):
                        if reply.drop_after is not None and sent >= reply.drop_after:
                            raise ConnectionResetError("fake upstream drops the stream")
                        yield event([{"index": i, "delta": {"content": parts[step]}, "finish_reason": None}])
                        self.sent_at.append(time.monotonic())
                        sent += 1
                        if reply.delay:
                            await asyncio.sleep(reply.delay)
            for i in range(len(texts)):
                yield event([{"index": i, "delta": {}, "finish_reason": "tool_calls" if reply.tool_calls else "stop"}])
            if include_usage:
                yield event([], usage={"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12})
            yield b"data: [DONE]\n\n"
        finally:
            self.streams_closed += 1
