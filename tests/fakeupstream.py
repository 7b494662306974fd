"""A fake OpenAI-compatible upstream: the only stand-in in the end-to-end tests (the remote LLM).

It records every request it receives and answers chat completions from a script the test sets
(`FakeUpstream.replies`), streamed or not as the client asked.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

CREATED = 1_700_000_000  # fixed, so two answers to the same request are byte-identical


@dataclass
class Recorded:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


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


class FakeUpstream:
    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.replies: deque[Reply] = deque()
        self.streams_open = 0
        self.streams_closed = 0
        self.app = Starlette(routes=[
            Route("/v1/models", self.models),
            Route("/v1/embeddings", self.embeddings, methods=["POST"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
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
        return [r for r in self.requests if r.path == "/v1/chat/completions"]

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
        body = (await self.record(request)).json()
        reply = self.replies.popleft() if self.replies else Reply()
        await asyncio.sleep(reply.wait)
        if reply.status != 200:
            error = reply.error or {"message": "fake error", "type": "rate_limit_error", "param": None,
                                    "code": "rate_limit_exceeded"}
            return JSONResponse({"error": error}, status_code=reply.status, headers=reply.headers)
        texts = reply.text if isinstance(reply.text, list) else [reply.text] * int(body.get("n") or 1)
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(self.stream(body, texts, reply, include_usage),
                                     media_type="text/event-stream", headers=reply.headers)
        return JSONResponse({
            "id": "chatcmpl-fake", "object": "chat.completion", "created": CREATED, "model": body["model"],
            "choices": [{"index": i, "message": {"role": "assistant", "content": t, "refusal": None},
                         "logprobs": None, "finish_reason": "stop"} for i, t in enumerate(texts)],
            "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
        }, headers=reply.headers)

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
            pieces = [[t[j:j + reply.chunk_size] for j in range(0, len(t), reply.chunk_size)] for t in texts]
            for step in range(max(map(len, pieces), default=0)):
                for i, parts in enumerate(pieces):
                    if step < len(parts):
                        if reply.drop_after is not None and sent >= reply.drop_after:
                            raise ConnectionResetError("fake upstream drops the stream")
                        yield event([{"index": i, "delta": {"content": parts[step]}, "finish_reason": None}])
                        sent += 1
                        if reply.delay:
                            await asyncio.sleep(reply.delay)
            for i in range(len(texts)):
                yield event([{"index": i, "delta": {}, "finish_reason": "stop"}])
            if include_usage:
                yield event([], usage={"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12})
            yield b"data: [DONE]\n\n"
        finally:
            self.streams_closed += 1
