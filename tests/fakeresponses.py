"""The Responses API (`POST /v1/responses`) as OpenAI serves it, for the fake upstream and the property tests.

`events()` builds the event sequence of a streamed response and `response()` the object of a whole one, with the
shapes of the official SDK's types (openai/types/responses): `response.created`, `response.in_progress`, then per
output item `response.output_item.added`, its parts and deltas (`response.reasoning_summary_*`,
`response.content_part.added`, `response.output_text.delta` with `item_id`/`output_index`/`content_index`,
`logprobs` and `obfuscation`, `response.output_text.annotation.added`, `response.output_text.done`,
`response.content_part.done`; `response.function_call_arguments.delta/done`), `response.output_item.done`, and
`response.completed` whose `response.output` holds every item whole; `sequence_number` on every event, from 0.

`ResponsesAPI` serves them for tests/fakeupstream.py: it keeps every response it made, so `previous_response_id`
works as it does at OpenAI (the earlier turns' input and output, not their `instructions`; an unknown id is a 404),
and it renders each request the way OpenAI-compatible servers do (`instructions` as a system message first), so a
chat template's rules (FakeUpstream.template) apply to it too.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

if TYPE_CHECKING:
    from tests.fakeupstream import FakeUpstream, Recorded, Reply

CREATED = 1_700_000_000


def unparseable(body: Recorded) -> Response | None:
    """OpenAI's 400 for a body that is not a JSON object, or None when it is one."""
    try:
        data = body.json()
    except ValueError:
        data = None
    if isinstance(data, dict):
        return None
    return JSONResponse({"error": {"message": "We could not parse the JSON body of your request.",
                                   "type": "invalid_request_error", "param": None, "code": None}}, status_code=400)


@dataclass
class Output:
    """What the model answers: reasoning, a message, function calls, further messages, in that order."""

    text: str | None = "Hello!"  # None: no message item
    deltas: list[str] | None = None  # how the text is streamed (default: 3 characters a delta)
    reasoning: str = ""  # a reasoning item with this summary
    calls: list[tuple[str, str]] = field(default_factory=list)  # (name, arguments) of function calls
    citations: list[tuple[int, int]] = field(default_factory=list)  # url_citation spans of the text
    logprobs: bool = False  # per-token logprobs on the deltas (include=["message.output_text.logprobs"])
    status: str = "completed"  # or incomplete (max_output_tokens)
    more: list[list[str]] = field(default_factory=list)  # further message items after the calls, by their deltas

    def messages(self) -> list[tuple[list[str], list[tuple[int, int]]]]:
        """Each message item's deltas and citations."""
        first = [] if self.text is None else [
            (self.deltas if self.deltas is not None else pieces(self.text, 3), self.citations)]
        return first + [(deltas, []) for deltas in self.more]


def citation(start: int, end: int) -> dict[str, Any]:
    return {"type": "url_citation", "start_index": start, "end_index": end, "title": "Example",
            "url": f"https://example.com/{start}"}


def logprob(token: str) -> dict[str, Any]:
    return {"token": token, "logprob": -0.5, "top_logprobs": []}


def response(rid: str, body: dict[str, Any], output: list[dict[str, Any]], status: str) -> dict[str, Any]:
    """A `response` object as OpenAI returns it (the SDK computes `output_text`; the API does not send it)."""
    done = status in ("completed", "incomplete")
    text = body.get("text") if isinstance(body.get("text"), dict) else {"format": {"type": "text"}}
    return {
        "id": rid, "object": "response", "created_at": CREATED, "status": status, "background": False,
        "error": None, "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
        "max_tool_calls": None, "model": body.get("model", "gpt-fake"), "output": output,
        "parallel_tool_calls": True, "previous_response_id": body.get("previous_response_id"),
        "prompt_cache_key": None, "reasoning": {"effort": None, "summary": None}, "safety_identifier": None,
        "service_tier": "default", "store": body.get("store", True), "temperature": 1.0, "text": text,
        "tool_choice": body.get("tool_choice", "auto"), "tools": body.get("tools", []), "top_logprobs": 0,
        "top_p": 1.0, "truncation": "disabled",
        "usage": {"input_tokens": 12, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 9,
                  "output_tokens_details": {"reasoning_tokens": 4 if done else 0}, "total_tokens": 21}
        if done else None,
        "user": body.get("user"), "metadata": body.get("metadata") or {},
    }


def items(out: Output, rid: str) -> list[dict[str, Any]]:
    """The output items, whole, as `response.completed` and a non-streamed response hold them."""
    result: list[dict[str, Any]] = []
    if out.reasoning:
        result.append({"id": f"rs_{rid}", "type": "reasoning", "summary": [
            {"type": "summary_text", "text": out.reasoning}]})
    messages = []
    for n, (tokens, citations) in enumerate(out.messages()):
        part = {"type": "output_text", "annotations": [citation(a, b) for a, b in citations],
                "logprobs": [{**logprob(t), "bytes": list(t.encode())} for t in tokens if t] if out.logprobs else [],
                "text": "".join(tokens)}
        messages.append({"id": f"msg_{rid}_{n}", "type": "message", "status": out.status, "content": [part],
                         "role": "assistant"})
    calls = [{"id": f"fc_{rid}_{n}", "type": "function_call", "status": "completed", "arguments": arguments,
              "call_id": f"call_{rid}_{n}", "name": name} for n, (name, arguments) in enumerate(out.calls)]
    return result + messages[:1] + calls + messages[1:]


def pieces(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


def events(out: Output, rid: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The events of a streamed response, in OpenAI's order, numbered from 0."""
    whole = items(out, rid)
    messages = iter(out.messages())
    status = "incomplete" if out.status == "incomplete" else "completed"
    seq = itertools.count()
    result: list[dict[str, Any]] = []

    def emit(kind: str, **fields: Any) -> None:
        result.append({"type": kind, **fields, "sequence_number": next(seq)})

    emit("response.created", response=response(rid, body, [], "in_progress"))
    emit("response.in_progress", response=response(rid, body, [], "in_progress"))
    for index, item in enumerate(whole):
        where = {"item_id": item["id"], "output_index": index}
        if item["type"] == "reasoning":
            summary = item["summary"][0]
            emit("response.output_item.added", output_index=index, item={**item, "summary": []})
            emit("response.reasoning_summary_part.added", **where, summary_index=0,
                 part={"type": "summary_text", "text": ""})
            for piece in pieces(summary["text"], 5):
                emit("response.reasoning_summary_text.delta", **where, summary_index=0, delta=piece,
                     obfuscation="x")
            emit("response.reasoning_summary_text.done", **where, summary_index=0, text=summary["text"])
            emit("response.reasoning_summary_part.done", **where, summary_index=0, part=summary)
        elif item["type"] == "message":
            part = item["content"][0]
            emit("response.output_item.added", output_index=index,
                 item={**item, "status": "in_progress", "content": []})
            emit("response.content_part.added", **where, content_index=0,
                 part={"type": "output_text", "annotations": [], "logprobs": [], "text": ""})
            tokens, citations = next(messages)
            offset = 0
            for token in tokens:
                emit("response.output_text.delta", **where, content_index=0, delta=token,
                     logprobs=[logprob(token)] if out.logprobs and token else [], obfuscation="pad")
                offset += len(token)
                for n, (start, end) in enumerate(citations):  # a citation follows the text it cites
                    if offset - len(token) < end <= offset:
                        emit("response.output_text.annotation.added", **where, content_index=0, annotation_index=n,
                             annotation=citation(start, end))
            emit("response.output_text.done", **where, content_index=0, text=part["text"], logprobs=part["logprobs"])
            emit("response.content_part.done", **where, content_index=0, part=part)
        else:
            emit("response.output_item.added", output_index=index,
                 item={**item, "status": "in_progress", "arguments": ""})
            for piece in pieces(item["arguments"], 4):
                emit("response.function_call_arguments.delta", **where, delta=piece, obfuscation="y")
            emit("response.function_call_arguments.done", **where, arguments=item["arguments"], name=item["name"])
        emit("response.output_item.done", output_index=index, item=item)
    emit(f"response.{status}", response=response(rid, body, whole, status))
    return result


def sse(stream: list[dict[str, Any]]) -> bytes:
    """Events on the wire as OpenAI writes them: an `event:` line naming the type, then one `data:` line."""
    return b"".join(b"event: " + e["type"].encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n" for e in stream)


def cut(raw: bytes, seed: int) -> list[bytes]:
    """The bytes cut at random boundaries (inside events, lines and UTF-8 characters alike)."""
    rnd = random.Random(seed)
    bounds = sorted({0, len(raw), *(rnd.randrange(len(raw) + 1) for _ in range(len(raw) // 40 + 3))})
    return [raw[a:b] for a, b in itertools.pairwise(bounds)]


class ResponsesAPI:
    """`POST /v1/responses` and `GET /v1/responses/{id}` for FakeUpstream, from its script of replies."""

    def __init__(self, fake: FakeUpstream) -> None:
        self.fake = fake
        self.stored: dict[str, dict[str, Any]] = {}  # id → the response object
        self.seen: dict[str, list[dict[str, Any]]] = {}  # id → the conversation the model read (chat messages)
        self.ids = itertools.count(1)

    def conversation(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        """What the model reads, as a vLLM-style server renders it: instructions as a first system message, the
        earlier turns of the chain, then this input."""
        earlier = self.seen[body["previous_response_id"]] if body.get("previous_response_id") else []
        instructions = [{"role": "system", "content": body["instructions"]}] if body.get("instructions") else []
        given = body.get("input")
        if isinstance(given, str):
            given = [{"role": "user", "content": given}]
        new = []
        for item in given or []:
            if item.get("type", "message") == "message":
                content = item["content"]
                text = content if isinstance(content, str) else "\n\n".join(
                    p["text"] for p in content if p.get("type") in ("input_text", "output_text"))
                new.append({"role": item["role"], "content": text})
        return [*instructions, *[m for m in earlier if m["role"] != "system"], *new]

    async def create(self, request: Request) -> Response:
        recorded = await self.fake.record(request)
        refusal = unparseable(recorded)
        if refusal is not None:
            return refusal
        body = recorded.json()
        if not isinstance(body.get("input", ""), str | list):
            return JSONResponse({"error": {"message": "Invalid type for 'input': expected a string or an array.",
                                           "type": "invalid_request_error", "param": "input",
                                           "code": "invalid_type"}}, status_code=400)
        prev = body.get("previous_response_id")
        if prev is not None and prev not in self.seen:
            return JSONResponse({"error": {"message": f"Previous response with id '{prev}' not found.",
                                           "type": "invalid_request_error", "param": "previous_response_id",
                                           "code": "previous_response_not_found"}}, status_code=404)
        seen = self.conversation(body)
        refused = self.fake.refused(seen)
        if refused:
            return JSONResponse({"error": {"message": refused, "type": "BadRequestError", "param": None,
                                           "code": 400}}, status_code=400)
        reply = self.fake.replies.popleft() if self.fake.replies else None
        if reply is not None and reply.status != 200:
            return JSONResponse({"error": reply.error or {"message": "fake error", "type": "rate_limit_error",
                                                          "param": None, "code": "rate_limit_exceeded"}},
                                status_code=reply.status, headers=reply.headers)
        out = reply.output if reply is not None and reply.output is not None else Output(
            reply.text if reply is not None and isinstance(reply.text, str) else "Hello!")
        rid = f"resp_{next(self.ids):04d}"
        whole = items(out, rid)
        self.stored[rid] = response(rid, body, whole, "incomplete" if out.status == "incomplete" else "completed")
        answer = "".join(p["text"] for i in whole if i["type"] == "message" for p in i["content"])
        self.seen[rid] = [*seen, {"role": "assistant", "content": answer}]
        headers = reply.headers if reply is not None else {}
        media = reply.media_type if reply is not None else None
        raw = sse(events(out, rid, body)) if body.get("stream") else orjson.dumps(self.stored[rid])
        seed = reply.split_seed if reply is not None else None
        chunks = cut(raw, seed) if seed is not None else [raw]
        media = media or ("text/event-stream" if body.get("stream") else "application/json")
        return StreamingResponse(self.body(chunks, reply), headers=headers, media_type=media)

    async def body(self, chunks: list[bytes], reply: Reply | None) -> AsyncIterator[bytes]:
        self.fake.streams_open += 1
        try:
            for n, chunk in enumerate(chunks):
                if reply is not None and reply.drop_after is not None and n >= reply.drop_after:
                    raise ConnectionResetError("fake upstream drops the stream")
                yield chunk
        finally:
            self.fake.streams_closed += 1

    async def retrieve(self, request: Request) -> Response:
        await self.fake.record(request)
        stored = self.stored.get(request.path_params["rid"])
        if stored is None:
            return JSONResponse({"error": {"message": "No response found.", "type": "invalid_request_error",
                                           "param": None, "code": None}}, status_code=404)
        return JSONResponse(stored)
