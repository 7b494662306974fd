"""Pure: what one Responses API request (`POST /v1/responses`) allows, and the request sent upstream.

    plan_response(body, placement, ...) -> ResponsePlan    where memories and the instruction go; inline,
                                                           background or off (the table in proxy/plan.py)
    rewrite_response(body, hits, plan, ...) -> body         the text added; nothing else changes
    turn_messages(body)                                    the turn as chat messages: what recall searches
                                                           (proxy/search.question), sessions and extraction read

The chat rules hold here too (proxy/plan.py): no item, role or field of ours. OpenAI-compatible servers (vLLM,
Ollama, llama.cpp) turn `instructions` into a system message in front of the input, so an `instructions` the client
did not send would be a system message the chat template may refuse (Qwen3's refuses one that is not first,
Gemma's any). The places, in order:

* **The instruction** (inline only): the end of `instructions` when the client sent some text there (a
  `previous_response_id` chain does not carry `instructions` over, so it is never stored twice), else the end of
  the first system/developer input item, else with the memories.
* **Memories**, `placement="user"` (the default): the start of the newest user input, a string `input` or the
  last user message item (an `input_text` part added first). `placement="system"`: where the instruction goes
  (else the newest user input). In a `previous_response_id` chain the upstream keeps each turn's input, so the
  memories a turn was given stay in the conversation it stores; `instructions` is not kept.

A block is not possible, beside the chat reasons (constrained decoding, audio, forced tool calls: `tool_choice`
"required", a named function, custom, MCP or hosted tool, allowed_tools in required mode), for `text.format`
json_schema or json_object and for `background: true` (the answer is fetched later, from the upstream, where no
filter stands).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from proxy.models import Hit
from proxy.plan import SYSTEM_ROLES, no_block_reason, turn_mode
from proxy.rewrite import render_memories, with_text

Place = str | int  # "instructions", "input" (a string input) or the index of an input item
PART = "input_text"


@dataclass(frozen=True, slots=True)
class ResponsePlan:
    """What a Responses request allows; None: nowhere to put it."""

    recall: bool  # there is a newest user input, and a place for memories
    extraction: str  # inline | background | off
    reason: str  # why a block is not possible ("" when it is)
    memories_at: Place | None
    instruction_at: Place | None  # inline only

    @property
    def inline(self) -> bool:
        return self.extraction == "inline"


def plan_response(body: dict[str, Any], placement: str = "user", *, extraction: str = "inline",
                  asked: str | None = None, background_models: Sequence[str] = ()) -> ResponsePlan:
    """Decide for a request body (a dict; `input` a string, a list or absent). `extraction` is the operator's
    setting, `asked` the client's X-Memory-Extraction header (BadRequest when not a mode), `background_models`
    glob patterns of models that do not follow the block instruction."""
    user = newest_user_place(body.get("input"))
    system = system_place(body)
    reason = response_no_block_reason(body) or ("" if user is not None else "no user input with text content")
    model = body.get("model")
    if not reason and any(fnmatchcase(model if isinstance(model, str) else "", p) for p in background_models):
        reason = "a model listed as not following the instruction"
    if user is None:
        return ResponsePlan(recall=False, extraction="off", reason=reason, memories_at=None, instruction_at=None)
    mode = turn_mode(extraction, asked, block_possible=not reason)
    return ResponsePlan(recall=True, extraction=mode, reason=reason,
                        memories_at=system if placement == "system" and system is not None else user,
                        instruction_at=(user if system is None else system) if mode == "inline" else None)


def response_no_block_reason(body: dict[str, Any]) -> str:
    """Why the answer to this request cannot carry a block, or ""."""
    text = body.get("text")
    kind = text.get("format", {}).get("type") if isinstance(text, dict) and isinstance(text.get("format"), dict) \
        else None
    if kind not in (None, "text"):
        return f"text.format {kind}"
    if body.get("background") is True:
        return "background response"
    return no_block_reason(body)


def is_message(item: Any, roles: Sequence[str]) -> bool:
    """An input message item (an easy message without `type`, or `type: message`) of one of `roles`."""
    return isinstance(item, dict) and item.get("type", "message") == "message" and item.get("role") in roles


def newest_user_place(items: Any) -> Place | None:
    if isinstance(items, str):
        return "input"
    if not isinstance(items, list):
        return None
    for i in range(len(items) - 1, -1, -1):
        if is_message(items[i], ("user",)):
            return i if isinstance(items[i].get("content"), str | list) else None
    return None


def system_place(body: dict[str, Any]) -> Place | None:
    """The client's own instructions: a non-empty `instructions`, else the first system/developer item."""
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        return "instructions"
    items = body.get("input")
    if not isinstance(items, list):
        return None
    first = next((i for i, item in enumerate(items) if is_message(item, SYSTEM_ROLES)), None)
    return first if first is not None and isinstance(items[first].get("content"), str | list) else None


def item_text(item: Any) -> str:
    """The text of an input item's content: a string, or its `input_text` (and `output_text`) parts."""
    content = item.get("content") if isinstance(item, dict) else item
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(part["text"] for part in content if isinstance(part, dict)
                         and part.get("type") in (PART, "output_text", "text") and isinstance(part.get("text"), str))
    return ""


def turn_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The request's input as chat messages ({"role", "content": text}) for sessions and extraction: the message
    items only (tool calls and their outputs, reasoning and references are the upstream's business)."""
    items = body.get("input")
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not isinstance(items, list):
        return []
    return [{"role": item["role"], "content": item_text(item)} for item in items
            if is_message(item, ("user", "assistant", *SYSTEM_ROLES))]


def rewrite_response(body: dict[str, Any], hits: Sequence[Hit], plan: ResponsePlan, *, instruction: str,
                     max_chars: int = 2000, excerpts: Sequence[str] = ()) -> tuple[dict[str, Any], dict[str, str]]:
    """The upstream request and the aliases of the memories it shows (m1 → real id). `body` is not modified; it
    is returned itself when nothing is added."""
    memories, aliases = render_memories(hits, max_chars, excerpts) if plan.memories_at is not None else ("", {})
    added: dict[Place, tuple[list[str], list[str]]] = {}  # place → (texts before its content, after it)
    user = newest_user_place(body.get("input"))
    for place, text in ((plan.instruction_at if plan.inline else None, instruction), (plan.memories_at, memories)):
        if place is None or not text:
            continue
        before, after = added.setdefault(place, ([], []))
        if place == user:  # ours first in the user's input, so the question stays the last thing read
            before.insert(0, text)
        else:  # the client's own instructions first, then the stable instruction, then memories
            after.append(text)
    if not added:
        return body, aliases
    new = dict(body)
    items = list(body["input"]) if isinstance(body.get("input"), list) else None
    for place, (before, after) in added.items():
        if isinstance(place, str):  # instructions, or a string input
            own = body[place]
            new[place] = "\n\n".join([*before, *([own] if own else []), *after])
        elif items is not None:
            items[place] = with_text(items[place], before, after, PART)
    if items is not None:
        new["input"] = items
    return new, aliases
