"""An upstream that answers instantly, so a benchmark measures only the proxy.

Raw ASGI (no framework) to keep its own cost near zero. `python -m bench.upstream PORT` serves it on 127.0.0.1.
Chat completions and Responses API calls (`/responses`) answer with `ANSWER` (plus a `<memory>` block when the
request carries the proxy's instruction, so the memory path does its whole job), as JSON or as SSE when the request
says `"stream": true`.
"""

from __future__ import annotations

import sys
from typing import Any

import orjson

from proxy import demo_responses

ANSWER = "Sure. Here is a short answer that a model might give, about forty tokens long, to a short question."
BLOCK = '\n<memory>\n[{"text": "User likes benchmarks", "category": "preference"}]\n</memory>'
CREATED = 1_700_000_000


def completion(model: str, text: str) -> bytes:
    return orjson.dumps({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": CREATED, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 20, "completion_tokens": 40, "total_tokens": 60}})


def stream_events(model: str, text: str) -> list[bytes]:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return b"data: " + orjson.dumps({"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": CREATED,
                                         "model": model, "choices": [{"index": 0, "delta": delta,
                                                                      "finish_reason": finish}]}) + b"\n\n"
    words = text.split(" ")
    pieces = [w + (" " if i < len(words) - 1 else "") for i, w in enumerate(words)]
    return [chunk({"role": "assistant", "content": ""}), *(chunk({"content": p}) for p in pieces),
            chunk({}, "stop"), b"data: [DONE]\n\n"]


def deltas_events(model: str, deltas: list[str]) -> list[bytes]:
    """A stream that sends each of `deltas` as one content chunk (bench/filter.py's pathological answers)."""
    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return b"data: " + orjson.dumps({"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": CREATED,
                                         "model": model, "choices": [{"index": 0, "delta": delta,
                                                                      "finish_reason": finish}]}) + b"\n\n"
    return [chunk({"role": "assistant", "content": ""}), *(chunk({"content": d}) for d in deltas),
            chunk({}, "stop"), b"data: [DONE]\n\n"]


def response_object(model: str, text: str) -> dict[str, Any]:
    """A completed Responses API `response` with one message (proxy/demo_responses.py: the shapes)."""
    usage = {"input_tokens": 20, "output_tokens": 40, "total_tokens": 60}
    return demo_responses.response_object("resp_bench", "msg_bench", model, text, created_at=CREATED, usage=usage)


def response_events(model: str, text: str) -> list[bytes]:
    """The event sequence of a streamed Responses API answer, one text delta per word."""
    words = text.split(" ")
    return demo_responses.response_events(response_object(model, text),
                                          [w + (" " if i < len(words) - 1 else "") for i, w in enumerate(words)])


# Models whose answers are pathological for a block filter: a model stuck in a loop, and the like.
PATHOLOGICAL = {"newlines": ["\n"] * 20_000, "angles": ["a<b "] * 20_000, "backticks": ["`x` "] * 20_000}


async def read_body(receive: Any) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


async def stream(send: Any, events: list[bytes]) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    for event in events:
        await send({"type": "http.response.body", "body": event, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = await read_body(receive)
    if scope["path"].endswith("/responses"):
        request = orjson.loads(body)
        text = ANSWER + (BLOCK if b"<memory>" in body else "")
        model = request.get("model", "m")
        if request.get("stream"):
            await stream(send, response_events(model, text))
            return
        payload = orjson.dumps(response_object(model, text))
    elif scope["path"].endswith("/chat/completions"):
        request = orjson.loads(body)
        text = ANSWER + (BLOCK if b"<memory>" in body else "")
        if request.get("stream"):
            model = request.get("model", "m")
            await stream(send, deltas_events(model, PATHOLOGICAL[model]) if model in PATHOLOGICAL
                         else stream_events(model, text))
            return
        payload = completion(request.get("model", "m"), text)
    else:
        payload = b'{"object":"list","data":[{"id":"bench-model","object":"model","created":1,"owned_by":"bench"}]}'
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False,
                loop="uvloop", http="httptools")
