"""The `<memory>` contract in one file: what the model is asked to write (inline, or in a background extraction
call), the tags that mark it, the parser, and how what it asks for becomes operations on the store.

Inline, the model appends, only when the user revealed something new and durable about themselves:

    <memory>
    [{"text": "User now lives in Porto", "category": "fact", "replaces": "m2"}, {"forget": "m3"}]
    </memory>

A background extraction call answers `{"memories": [...]}` with the same items. `parse` reads both, tolerant of
the shapes models and other tools actually produce, and never raises: a block it cannot read is logged and
ignored, because a lost memory must never cost the user their answer. `resolve` turns short ids into real ones
and drops what must not be stored.
"""

from __future__ import annotations

import ast
import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

import orjson

from proxy import logs, metrics
from proxy.memories import clean_text
from proxy.models import CATEGORIES, Forget, Hit, NewMemory, Operation, happened_at

log = logging.getLogger("memory_proxy.extract")

# The example item is a placeholder no user could have said: small models repeat a plausible example ("User is
# vegetarian") back as if the user had said it. An item that is the placeholder itself is never stored.
PLACEHOLDER = "<one short fact the user stated>"
# Sent on every request: short, and byte-stable so that prompt caches keep hitting.
INSTRUCTION = (
    "Memory: only when the user has just revealed something new and lasting about themselves, end your reply "
    "with a block like\n"
    f'<memory>[{{"text": "{PLACEHOLDER}", "category": "fact"}}]</memory>\n'
    "Items are short sentences in the user's language; category is fact, preference, context, event or profile "
    "(needed in every conversation: name, language, allergies). For a dated event add "
    '"happened_at": "YYYY-MM-DD" (resolve "last month" from today\'s date). To correct a '
    'memory shown as [m2] add "replaces": "m2"; to drop [m3] write {"forget": "m3"}. Never store your own words, '
    "passwords, keys or other secrets. Nothing new: no block. The user never sees the block; do not mention it."
)

# Tags: any case, up to TAG_SPACE spaces or tabs around the parts. The bound keeps the streaming hold-back small.
TAG_SPACE = 4
_S = f"[ \\t]{{0,{TAG_SPACE}}}"
OPEN_TAG = re.compile(f"<{_S}memory{_S}>", re.IGNORECASE)
CLOSE_TAG = re.compile(f"<{_S}/{_S}memory{_S}>", re.IGNORECASE)
# Text that is not yet an opening tag but could still become one (fullmatch it from a '<').
OPEN_TAG_START = re.compile(f"<{_S}(?:m(?:e(?:m(?:o(?:r(?:y{_S})?)?)?)?)?)?", re.IGNORECASE)
OPEN_TAG_MAX = len("<memory>") + 2 * TAG_SPACE

TEXT_KEYS = ("text", "content", "memory", "fact", "value")
LIST_KEYS = ("memories", "memory", "facts", "items")
FORGET_ACTIONS = frozenset({"forget", "delete", "remove"})
MAX_BLOCK = 64 * 1024  # parsing stays cheap whatever a block holds (the filter caps what it takes as a block)
MAX_STARTS = 32  # most positions tried when looking for JSON inside prose

_FENCE = re.compile(r"```[\w-]*[ \t]*\n?(.*?)```", re.DOTALL)
_TRAILING_COMMA = re.compile(r",\s*([\]}])")
ATTEMPT = re.compile(r"""["'](?:text|forget|memories)["']\s*:""", re.IGNORECASE)
_INNER_FENCE = re.compile(r"\A```[\w+.-]*[ \t]*(?:\r\n|\n|\r)|```\Z")  # a fence around the whole payload
_SHORT_ID = re.compile(r"\[?\s*(m?)\s*(\d+)\s*\]?", re.IGNORECASE)


def parse(block: str, extraction: str = "inline") -> list[Operation]:
    """The operations a block (the text between the tags) asks for. Invalid items are skipped; an unreadable
    block gives [], a warning (with the request's id and user; never its text: it is about a person, unless
    `log_content` shows it at debug) and a count by `extraction` mode (inline or background)."""
    try:
        text = block.strip()[:MAX_BLOCK]
        if not text:
            return []
        found, value = _decode(text)
        if not found:
            log.warning("ignoring a <memory> block of %d characters that is not JSON", len(block))
            log.debug("the unreadable block: %s", logs.content(block[:2000]))
            metrics.block_unparseable(extraction)
            return []
        return [op for item in _items(value) for op in _operations(item)]
    except Exception:  # the contract is "never raises": a parser bug must not break a chat
        log.exception("could not parse a <memory> block")
        metrics.block_unparseable(extraction)
        return []


def is_payload(block: str) -> bool:
    """Pure: whether the text between the tags is a memory payload, so the filter takes it out: it reads (as
    `parse` reads it) as memory items (objects or strings, one at least an operation: a text or forget key, a
    string), or as an empty list; or, unreadable, it clearly tries to be one (a `"text"`, `'text'` or `forget`
    key). `[1, 2, 3]`, `[1, "a"]`, `[[]]`, `[ ... ]` and `{name}` are not: they are the answer's own text.
    Linear in the block (at most MAX_BLOCK is read)."""
    text = _INNER_FENCE.sub("", block.strip()[:MAX_BLOCK]).strip()
    try:
        found, value = _decode(text)
        items = _items(value) if found else [None]
        if not items:  # no items: an empty block (`[]`, `{"memories": []}`), not an empty structure (`[[]]`)
            return value == [] or (isinstance(value, dict) and any(value.get(key) == [] for key in LIST_KEYS))
        # every element an object or a string (`[1, "a"]`, `[[]]` are data), one of them at least an operation
        if all(isinstance(item, dict | str) for item in items) and any(_operations(item) for item in items):
            return True
    except Exception:  # as in parse: an odd value never breaks the answer; the key test below decides
        pass
    return ATTEMPT.search(text) is not None


def _decode(text: str) -> tuple[bool, Any]:
    """(found, value): strict JSON first, then the cheap repairs, each tried only when the one before failed."""
    try:
        return True, orjson.loads(text)
    except orjson.JSONDecodeError:
        pass
    fence = _FENCE.search(text)
    if fence:
        text = fence.group(1).strip()
    cleaned = _TRAILING_COMMA.sub(r"\1", text)
    for candidate in (text, cleaned) if fence else (cleaned,):
        try:
            return True, orjson.loads(candidate)
        except orjson.JSONDecodeError:
            pass
    values = _embedded_values(cleaned)
    if values:
        return True, values[0] if len(values) == 1 else values
    return _python_literal(cleaned)


def _embedded_values(text: str) -> list[Any]:
    """JSON values found inside prose, in order: `Here you go: [...]`, or one object per line."""
    decoder = json.JSONDecoder()
    values: list[Any] = []
    position, tries = 0, 0
    while tries < MAX_STARTS:
        starts = [i for i in (text.find("[", position), text.find("{", position)) if i >= 0]
        if not starts:
            break
        start = min(starts)
        tries += 1
        try:
            value, position = decoder.raw_decode(text, start)
        except (ValueError, RecursionError):
            position = start + 1
            continue
        if isinstance(value, list | dict):
            values.append(value)
    return values


def _python_literal(text: str) -> tuple[bool, Any]:
    """Single-quoted, Python-style output (`[{'text': ...}]`): models write it now and then."""
    starts = [i for i in (text.find("["), text.find("{")) if i >= 0]
    end = max(text.rfind("]"), text.rfind("}"))
    if not starts or end < min(starts):
        return False, None
    try:
        return True, ast.literal_eval(text[min(starts):end + 1])
    except Exception:  # literal_eval raises many kinds (SyntaxError, ValueError, RecursionError, MemoryError...)
        return False, None


def _items(value: Any, depth: int = 0) -> list[Any]:
    """The candidate items: a list's entries, a wrapper's list (`{"memories": [...]}`), or the value itself.
    Nesting is followed a few levels deep only."""
    if depth > 3:
        return []
    if isinstance(value, list):
        return [item for entry in value
                for item in (_items(entry, depth + 1) if _is_container(entry) else [entry])]
    if isinstance(value, dict):
        for key in LIST_KEYS:
            inner = value.get(key)
            if isinstance(inner, list | dict):
                return _items(inner, depth + 1)
    return [value]


def _is_container(value: Any) -> bool:
    """A nested list, or an object that holds a list of memories rather than being one."""
    if isinstance(value, list):
        return True
    return isinstance(value, dict) and any(isinstance(value.get(key), list | dict) for key in LIST_KEYS)


def _operations(item: Any) -> list[Operation]:
    if isinstance(item, str):
        text = item.strip()
        return [NewMemory(text, "fact", "inline")] if text else []
    if not isinstance(item, dict):
        return []
    if "forget" in item:
        targets = item["forget"] if isinstance(item["forget"], list) else [item["forget"]]
        return [Forget(short) for short in map(short_id, targets) if short]
    action = item.get("action", item.get("event", item.get("op")))
    if isinstance(action, str) and action.strip().lower() in FORGET_ACTIONS:
        short = short_id(item.get("id"))
        return [Forget(short)] if short else []
    text = next((item[key] for key in TEXT_KEYS if isinstance(item.get(key), str)), "").strip()
    if not text:
        return []
    category = item.get("category", item.get("type"))
    category = category.strip().lower() if isinstance(category, str) and category.strip() else "fact"
    return [NewMemory(text, category, "inline", replaces=short_id(item.get("replaces", item.get("updates"))),
                      happened_at=happened_at(item.get("happened_at", item.get("date"))))]


def short_id(value: Any) -> str | None:
    """`m3` from "m3", "M3", "[m3]", "3" or 3 (models copy the label as they see it); other strings stripped."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return f"m{value}" if value >= 0 else None
    if not isinstance(value, str):
        return None
    match = _SHORT_ID.fullmatch(value.strip())
    if match:
        return f"m{int(match.group(2))}"
    return value.strip() or None


# --- background extraction: the call's prompt and answer, version-stamped ----------------------------------------

EXTRACTION_PROMPT_VERSION = 1
EXTRACTION_PROMPT = """\
You keep the long-term memory of one user of a chat assistant. Below are the user's memories most related to the \
conversation, each with a short id, then the newest turn(s): what the user said and what the assistant answered.

Write down only what the USER revealed about themselves that will still matter in later conversations: who \
they are, where they live and work, family, preferences, plans, commitments, health constraints, things that \
happened to them.
- One short sentence per fact, about the user ("User is vegetarian"), in the language the user writes in.
- Never the assistant's words, suggestions or knowledge, never general facts about the world, never the user's \
questions or requests themselves.
- Never secrets: passwords, PINs, keys, tokens, card or account numbers.
- Resolve relative dates ("yesterday", "next month") against the date of the turn; write dates as YYYY-MM-DD.
- category: fact, preference, context, event (something that happened or will, with its date) or profile \
(needed in every conversation: name, preferred language, a serious allergy).
- If a fact changes a memory shown, give that memory's id in "replaces"; if the user says a memory is no longer \
true, add {"forget": its id}.
- A fact already among the memories shown, or nothing durable: nothing to add.

- happened_at: for an event, when it happened (YYYY-MM-DD, or YYYY-MM, or YYYY as precise as said), else null.

Answer with JSON only, in this form: \
{"memories": [{"text": "...", "category": "fact", "replaces": null, "happened_at": null}]}, \
or {"memories": []} when there is nothing to store."""

_ADD = {"type": "object", "additionalProperties": False, "required": ["text", "category", "replaces", "happened_at"],
        "properties": {"text": {"type": "string"}, "category": {"type": "string", "enum": list(CATEGORIES)},
                       "replaces": {"type": ["string", "null"]}, "happened_at": {"type": ["string", "null"]}}}
_FORGET = {"type": "object", "additionalProperties": False, "required": ["forget"],
           "properties": {"forget": {"type": "string"}}}
# OpenAI's structured outputs (strict: every property required, no others), which vLLM and llama.cpp accept too.
EXTRACTION_FORMAT = {"type": "json_schema", "json_schema": {"name": "memory_operations", "strict": True, "schema": {
    "type": "object", "additionalProperties": False, "required": ["memories"],
    "properties": {"memories": {"type": "array", "items": {"anyOf": [_ADD, _FORGET]}}}}}}


def extraction_request(model: str, turns: Sequence[tuple[str, str, str]], shown: str, today: str, *,
                       json_schema: bool = True, max_tokens: int = 0,
                       token_field: str = "max_tokens") -> dict[str, Any]:
    """The extraction call's body. `turns` are (when, what the user said, the answer); `shown` is the rendered
    memories (proxy.rewrite.render_memories) or ""; `today` the date of the newest turn (YYYY-MM-DD).
    One user message, no system message: every chat template accepts that layout. `max_tokens` (> 0) bounds the
    answer under `token_field`: a small model that rambles (measured: SmolLM2-135M ran to its 4,096-token
    context, 180 s a call on 2 cores) stops there instead of holding the model."""
    parts = [EXTRACTION_PROMPT, f"Date of the turn: {today}", "Memories:\n" + (shown or "(none)")]
    for n, (when, said, answer) in enumerate(turns, start=1):
        parts.append(f"Turn {n} ({when}):\nUser: {said}\nAssistant: {answer}")
    body: dict[str, Any] = {"model": model, "stream": False, "temperature": 0,
                            "messages": [{"role": "user", "content": "\n\n".join(parts)}]}
    if json_schema:
        body["response_format"] = EXTRACTION_FORMAT
    if max_tokens > 0:
        body[token_field] = max_tokens
    return body


# --- from what a model asked for to what the store does ----------------------------------------------------------

def normalised(text: str) -> str:
    return " ".join(text.casefold().split()).rstrip(".!")


def resolve(asked: Iterable[Operation], aliases: dict[str, str], shown: Sequence[Hit], max_chars: int,
            source: str = "inline") -> list[Operation]:
    """What the model asked for, as one deduplicated list for the store: short ids resolved to real ones (unknown
    ids ignored), facts the model was just shown dropped (no feedback loop), the instruction's placeholder
    dropped, every new memory marked with `source`."""
    seen = {normalised(hit.memory.text) for hit in shown} | {normalised(PLACEHOLDER)}
    result: list[Operation] = []
    forgotten: set[str] = set()
    for op in asked:
        if isinstance(op, Forget):
            real = aliases.get(op.id)
            if real and real not in forgotten:
                forgotten.add(real)
                result.append(Forget(real))
            log.debug("forget %s: %s", op.id, real if real else "ignored, not an id shown in this request")
            continue
        key = normalised(clean_text(op.text, max_chars))
        if not key or key in seen:
            log.debug("ignoring a memory: %s", "empty" if not key else
                      "shown in this request, the instruction's placeholder, or given twice")
            continue
        seen.add(key)
        result.append(replace(op, source=source, replaces=aliases.get(op.replaces) if op.replaces else None))
    return result
