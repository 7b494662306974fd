"""The demo upstream (`memory-proxy demo-upstream`): an OpenAI-compatible server on 127.0.0.1 that stands in for a
model, so that a newcomer without an API key can watch a fact being stored and recalled.

It answers `POST /v1/chat/completions` (streamed or not, in OpenAI's chunk shapes), the Responses API
(proxy/demo_responses.py) and `GET /v1/models`, and it behaves as a model that follows the proxy's memory protocol
would:

- It reads the memories it was shown from whichever message holds a `<memories>` block (lines such as
  `[m1] (fact) "User lives in Porto"`), wherever the proxy put it, and says them back, so recall is visible.
- When some message carries the memory instruction (a paragraph showing a `<memory>` block), it recognises
  simple self-statements in the user's newest message ("I'm vegetarian", "I live in Porto", "my name is Ana",
  "I'm allergic to nuts", "I work at ACME", "my favourite colour is green", "forget that I live in Porto"...)
  and ends its answer with `<memory>[{"text": ..., "category": ...}]</memory>`, with `replaces` when a shown
  memory says something else about the same thing, `{"forget": "m2"}` when asked to forget, and no block when
  nothing is new.
- Asked for JSON (`response_format` json_object or json_schema: a background extraction call), it answers with
  the operations alone: an array, or `{"memories": [...]}` (or the schema's one array property) when an object
  is required.

It is a pattern matcher, not a model: it understands English self-statements in a few phrasings and nothing else.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from proxy.errors import error_response

MODEL = "demo"
MEMORIES = re.compile(r"<memories>(.*?)(?:</memories>|\Z)", re.DOTALL | re.IGNORECASE)
# One shown memory: an optional [alias], an optional (category), then the text as a JSON string or bare.
SHOWN = re.compile(r"^\s*(?:[-*]\s*)?(?:\[(?P<alias>[^\]]+)\]\s*)?(?:\((?P<category>[^)]*)\)\s*)?(?P<text>.+?)\s*$")
CLAUSES = re.compile(r"[.!?;:,\n]+|\s+(?:and|but|also|so)\s+", re.IGNORECASE)
TRAILING = re.compile(r"\s+(?:now|too|as well|these days|nowadays|at the moment|anymore)$", re.IGNORECASE)
STOP_WORDS = frozenset({"a", "an", "the", "i", "my", "me", "that", "about", "is", "am", "are", "in", "to", "of", "at",
                        "for", "user", "you", "your"})


@dataclass(frozen=True, slots=True)
class Kind:
    """One kind of self-statement: the phrasings that state it, how it is stored and acknowledged, and whether a
    user has one of it (a home, a name) or many (likes, allergies)."""

    phrasings: tuple[str, ...]
    stored: str  # the memory text; {v} is the value, {k} the key of keyed kinds
    said: str  # the acknowledgement, in the second person
    category: str
    single: bool = True


KINDS = (
    Kind((r"my name is (?P<v>.+)", r"i(?:'m| am) called (?P<v>.+)", r"call me (?P<v>.+)"),
         "User's name is {v}", "Nice to meet you, {v}", "profile"),
    Kind((r"i(?:'m| am) (?:an? )?(?P<v>vegetarian|vegan|pescatarian|pescetarian)\b.*",),
         "User is {v}", "Noted: you're {v}", "preference"),
    Kind((r"i (?:now )?(?:live|am living|'m living) in (?P<v>.+)", r"i(?:'m| am) based in (?P<v>.+)",
          r"i (?:just |have |'ve )?moved to (?P<v>.+)"),
         "User lives in {v}", "Noted: you live in {v}", "fact"),
    Kind((r"i work (?:at|for) (?P<v>.+)",), "User works at {v}", "Noted: you work at {v}", "fact"),
    Kind((r"i work as (?P<v>an? .+)",), "User works as {v}", "Noted: you work as {v}", "fact"),
    Kind((r"i(?:'m| am) allergic to (?P<v>.+)",), "User is allergic to {v}", "Noted: you're allergic to {v}",
         "profile", single=False),
    Kind((r"my fav(?:ou?)rite (?P<k>[\w ]+?) is (?P<v>.+)",), "User's favourite {k} is {v}",
         "Noted: your favourite {k} is {v}", "preference"),
    Kind((r"i (?:really )?(?:love|like|enjoy) (?P<v>(?!(?:it|that|this|them|you)\b).+)",), "User likes {v}",
         "Noted: you like {v}", "preference", single=False),
)
PATTERNS = [(kind, re.compile(p, re.IGNORECASE)) for kind in KINDS for p in kind.phrasings]
MEALS = re.compile(r"\b(?:cook|dinner|lunch|eat|recipe|meal)\b", re.IGNORECASE)
DISHES = {"vegetarian": "a mushroom risotto", "vegan": "a chickpea curry", "pescatarian": "grilled sardines",
          "pescetarian": "grilled sardines"}
FORGET = re.compile(r"(?:please )?forget (?:that |about |what )?(?P<v>.+)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Shown:
    """A memory the proxy showed: its alias (m1), category and text."""

    alias: str | None
    category: str
    text: str


def message_text(message: Any) -> str:
    """The text of a message whose content is a string or a list of parts."""
    if not isinstance(message, dict):
        return ""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n\n".join(part["text"] for part in content  # a part is a paragraph of its own
                         if isinstance(part, dict) and isinstance(part.get("text"), str))
    return ""


def shown_memories(messages: list[Any]) -> list[Shown]:
    """Every memory listed in a `<memories>` block of any message (excerpts of conversations included)."""
    shown = []
    for block in (match.group(1) for m in messages for match in MEMORIES.finditer(message_text(m))):
        for line in block.splitlines():
            item = SHOWN.match(line)
            if item is None or not (item.group("alias") or line.lstrip().startswith(("-", "*"))):
                continue  # a header line, not an item
            text = item.group("text")
            if text.startswith('"'):
                try:
                    text = str(orjson.loads(text))
                except orjson.JSONDecodeError:
                    text = text.strip('"')
            category = (item.group("category") or "fact").split(",")[0].strip()  # "(fact, noted 2025-03-01)"
            shown.append(Shown(item.group("alias"), category, text))
    return shown


def is_protocol(paragraph: str) -> bool:
    """A paragraph the proxy wrote (the instruction or the memories), not the user."""
    lowered = paragraph.lower()
    return "<memory>" in lowered or "<memories>" in lowered or "</memories>" in lowered


def own_words(message: Any) -> str:
    """What the user wrote in a message, without any paragraph of the memory protocol the proxy added to it."""
    text = MEMORIES.sub("", message_text(message))
    return "\n\n".join(p for p in re.split(r"\n\s*\n", text) if p.strip() and not is_protocol(p))


def instructed(messages: list[Any]) -> bool:
    """Whether some message asks the model for `<memory>` blocks (wherever the proxy put the instruction)."""
    return any(is_protocol(p) and "<memory>" in p.lower()
               for m in messages for p in re.split(r"\n\s*\n", MEMORIES.sub("", message_text(m))))


def clean_value(value: str) -> str:
    value = TRAILING.sub("", value.strip().strip("\"'")).strip()
    return " ".join(value.split()[:6])


def statements(text: str) -> Iterator[tuple[Kind, str, str]]:
    """(kind, stored text, acknowledgement) for each self-statement recognised in the text."""
    for clause in CLAUSES.split(text):
        for kind, pattern in PATTERNS:
            match = pattern.fullmatch(clause.strip())
            if match:
                fields = {name: clean_value(value) for name, value in match.groupdict().items() if value}
                if fields.get("v"):
                    yield kind, kind.stored.format(**fields), kind.said.format(**fields)
                break


def template(stored: str) -> re.Pattern[str]:
    """A regular expression that reads a stored text back: {k} and {v} become groups."""
    return re.compile(re.escape(stored).replace(r"\{k\}", "(?P<k>.+?)").replace(r"\{v\}", "(?P<v>.+)"))


# The most specific form first: "User is allergic to {v}" before "User is {v}".
FORMS = sorted(((kind, template(kind.stored)) for kind in KINDS), key=lambda form: -len(form[0].stored.split("{")[0]))


def about(text: str) -> tuple[int, str] | None:
    """What a stored memory text is about: its kind and key for single-valued kinds (one home, one favourite
    colour), the text itself for the others (many likes); None for a text of no kind the demo knows."""
    for kind, form in FORMS:
        match = form.fullmatch(text)
        if match:
            return KINDS.index(kind), (match.groupdict().get("k") or "").lower() if kind.single else text.lower()
    return None


def operations(user_text: str, shown: list[Shown]) -> tuple[list[dict[str, Any]], list[str]]:
    """The memory operations the user's words call for, and what to say about them."""
    ops: list[dict[str, Any]] = []
    said: list[str] = []
    known = {m.text.lower() for m in shown}
    for clause in CLAUSES.split(user_text):
        forget = FORGET.fullmatch(clause.strip())
        if forget:
            words = set(re.findall(r"\w+", forget.group("v").lower())) - STOP_WORDS
            best = max(shown, key=lambda m: len(words & set(re.findall(r"\w+", m.text.lower()))), default=None)
            if best is not None and best.alias and words & set(re.findall(r"\w+", best.text.lower())):
                ops.append({"forget": best.alias})
                said.append(f"I'll forget that ({best.text})")
    for kind, text, ack in statements(user_text.replace("\u2019", "'")):
        if text.lower() in known:
            continue  # nothing new: a compliant model writes no block for it
        op: dict[str, Any] = {"text": text, "category": kind.category}
        old = next((m for m in shown if m.alias and about(m.text) == about(text)), None)
        if old is not None:
            op["replaces"] = old.alias
        ops.append(op)
        said.append(ack)
    return ops, said


def answer(messages: list[Any]) -> str:
    """The assistant's reply to a chat, with a `<memory>` block when the instruction asks for one."""
    shown = shown_memories(messages)
    last_user = next((m for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"), None)
    ops, said = operations(own_words(last_user), shown)
    parts = [". ".join(said) + "."] if said else []
    if MEALS.search(own_words(last_user)):
        diet = next((m.text.split()[-1] for m in shown if about(m.text) == about("User is vegan")), None)
        parts.append(f"How about {DISHES.get(diet or '', 'a roast chicken with potatoes')} tonight?")
    if shown:
        parts.append("I remember: " + "; ".join(m.text for m in shown) + ".")
    if not parts:
        parts.append("Hello! I'm the demo model of memory-proxy. Tell me something about yourself (\"I'm "
                     "vegetarian\", \"I live in Porto\", \"my name is Ana\"), then ask me anything in a new "
                     "conversation: I'll say what the proxy reminded me of.")
    text = " ".join(parts)
    if ops and instructed(messages):
        text += "\n\n<memory>" + orjson.dumps(ops).decode() + "</memory>"
    return text


def extraction(body: dict[str, Any]) -> str | None:
    """For a request that asks for JSON (a background extraction call): the operations as JSON, else None."""
    response_format = body.get("response_format")
    if not isinstance(response_format, dict) or response_format.get("type") not in ("json_object", "json_schema"):
        return None
    kind = response_format["type"]
    messages = body["messages"]
    words = "\n".join(own_words(m) for m in messages if isinstance(m, dict) and m.get("role") == "user")
    said_by_user = [line.split(":", 1)[1] for line in words.splitlines() if line.lower().startswith("user:")]
    ops, _ = operations("\n".join(said_by_user) if said_by_user else words, shown_memories(messages))
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema") or {}
        if schema.get("type") == "array":
            return orjson.dumps(ops).decode()
        properties = schema.get("properties") or {}
        key = next((name for name, spec in properties.items() if isinstance(spec, dict)
                    and spec.get("type") == "array"), "memories")
        return orjson.dumps({key: ops}).decode()
    return orjson.dumps({"memories": ops}).decode()


def pieces(text: str) -> list[str]:
    """Token-sized pieces (up to 6 characters with their leading space), as a model streams them."""
    return re.findall(r"\s*\S{1,6}|\s+", text)


async def chat_completions(request: Request) -> Response:
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        return error_response(400, f"the request body is not valid JSON: {exc}", "invalid_request_error",
                              code="invalid_json")
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
        return error_response(400, "'messages' must be a non-empty array", "invalid_request_error", param="messages")
    content = extraction(body)
    content = answer(body["messages"]) if content is None else content
    choices = max(1, int(body.get("n") or 1)) if isinstance(body.get("n"), int) else 1
    model = body.get("model") if isinstance(body.get("model"), str) else MODEL
    prompt_tokens = sum(len(message_text(m).split()) for m in body["messages"])
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(content.split()),
             "total_tokens": prompt_tokens + len(content.split())}
    base = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": model,
            "system_fingerprint": "fp_demo"}
    if body.get("stream") is True:
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(stream(base, content, choices, usage if include_usage else None),
                                 media_type="text/event-stream")
    completion = {**base, "object": "chat.completion", "choices": [
        {"index": i, "message": {"role": "assistant", "content": content, "refusal": None}, "logprobs": None,
         "finish_reason": "stop"} for i in range(choices)], "usage": usage}
    return Response(orjson.dumps(completion), media_type="application/json")


async def stream(base: dict[str, Any], content: str, choices: int, usage: dict[str, int] | None
                 ) -> AsyncIterator[bytes]:
    """OpenAI's event sequence: the role, the content piece by piece, the finish reason, the usage when asked
    for (`stream_options.include_usage`: `"usage": null` on every chunk before it), then `[DONE]`."""
    chunk = {**base, "object": "chat.completion.chunk"}

    def event(deltas: list[tuple[dict[str, Any], str | None]], **extra: Any) -> bytes:
        data = {**chunk, "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
                                     for i, (delta, finish) in enumerate(deltas)]}
        return b"data: " + orjson.dumps({**data, **({"usage": None} if usage else {}), **extra}) + b"\n\n"

    yield event([({"role": "assistant", "content": "", "refusal": None}, None)] * choices)
    for piece in pieces(content):
        yield event([({"content": piece}, None)] * choices)
    yield event([({}, "stop")] * choices)
    if usage:
        yield b"data: " + orjson.dumps({**chunk, "choices": [], "usage": usage}) + b"\n\n"
    yield b"data: [DONE]\n\n"


async def models(request: Request) -> Response:
    return Response(orjson.dumps({"object": "list", "data": [
        {"id": MODEL, "object": "model", "created": 1_700_000_000, "owned_by": "memory-proxy"}]}),
        media_type="application/json")


async def not_found(request: Request) -> Response:
    return error_response(404, f"the demo upstream has no {request.method} {request.url.path}",
                          "invalid_request_error", code="not_found")


def create_demo_app() -> Starlette:
    """The demo upstream as an ASGI app (its base URL for clients ends in /v1)."""
    from proxy.demo_responses import DemoResponses  # it builds on this module

    responses = DemoResponses()
    return Starlette(routes=[
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/responses", responses.create, methods=["POST"]),
        Route("/v1/responses/{response_id}", responses.retrieve, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/{path:path}", not_found, methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]),
    ])
