"""Pure: what one chat request allows the proxy to do, decided once before anything is sent.

    plan(body, placement) -> Plan

* **Where memories go.** Never in a message of our own: many chat templates (Qwen3 under vLLM, llama.cpp or
  Ollama, Gemma, Mistral's) refuse a system message anywhere but first, or any system role at all. So the
  proxy only adds text to messages the client already sent:
  - `placement="user"` (the default): the memories go at the start of the last user message, and the
    instruction at the end of the first system/developer message (or, when there is none, with the memories).
    Everything before the last user message stays byte-identical from turn to turn, so an upstream's prompt
    cache keeps hitting on it.
  - `placement="system"`: memories and instruction both in the first system/developer message (else as
    `user`). The instructions' own message carries the context, but the prompt's very first message changes
    with every question, so a prompt cache holds nothing of the conversation.
* **Whether the model may write a `<memory>` block.** Not when the answer has no room for one or is not text
  for a person to read: structured outputs (`response_format` json_schema or json_object, and the
  constrained-decoding options of vLLM, llama.cpp and others), audio output, predicted outputs, and turns where
  a tool call is forced. Then no instruction is sent and the answer is relayed untouched (`inline` false).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

SYSTEM_ROLES = ("system", "developer")
PLACEMENTS = ("user", "system")
# Request options of OpenAI-compatible servers that constrain decoding to a grammar: no room for a block.
CONSTRAINED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "guided_decoding_backend",
               "structured_outputs", "grammar", "json_schema", "regex", "format")


@dataclass(frozen=True, slots=True)
class Plan:
    """What a request allows. Message indices refer to `body["messages"]`; None: nowhere to put it."""

    recall: bool  # there is a user message whose text can be searched for, and a place for memories
    inline: bool  # the model may be asked for a <memory> block, and the answer is filtered
    reason: str  # why not inline ("" when inline)
    memories_at: int | None  # the message whose content gets the memories
    instruction_at: int | None  # the message whose content gets the instruction (when inline)


def plan(body: dict[str, Any], placement: str = "user") -> Plan:
    """Decide for a request body (a dict with a `messages` list, as chat.parse_request checks)."""
    messages: Sequence[Any] = body["messages"]
    user = last_user_index(messages)
    system = first_system_index(messages)
    reason = no_block_reason(body)
    if user is None:
        reason = reason or "no user message"
    if system is not None and not writable(messages[system]):
        system = None
    if user is not None and not writable(messages[user]):
        user, reason = None, reason or "the last user message has no text content"
    memories_at = system if placement == "system" and system is not None else user
    instruction_at = system if system is not None else user
    return Plan(recall=memories_at is not None, inline=not reason, reason=reason, memories_at=memories_at,
                instruction_at=instruction_at if not reason else None)


def no_block_reason(body: dict[str, Any]) -> str:
    """Why the answer to this request cannot carry a block, or ""."""
    response_format = body.get("response_format")
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind not in (None, "text"):
        return f"response_format {kind}"
    for key in CONSTRAINED:
        if body.get(key) not in (None, False, "", {}, []):
            return f"constrained decoding ({key})"
    modalities = body.get("modalities")
    if body.get("audio") is not None or (isinstance(modalities, list) and "audio" in modalities):
        return "audio output"
    if body.get("prediction") is not None:
        return "predicted output"
    if forced_tool(body.get("tool_choice")) or forced_tool(body.get("function_call")):
        return "forced tool call"
    return ""


def forced_tool(choice: Any) -> bool:
    """`tool_choice` "required", a named function or custom tool, or allowed_tools in required mode; the legacy
    `function_call` naming a function."""
    if choice == "required":
        return True
    if not isinstance(choice, dict):
        return False
    if choice.get("type") == "allowed_tools":
        allowed = choice.get("allowed_tools")
        return isinstance(allowed, dict) and allowed.get("mode") == "required"
    return True  # {"type": "function", "function": {"name": ...}}, {"type": "custom", ...}, {"name": ...}


def last_user_index(messages: Sequence[Any]) -> int | None:
    for i in range(len(messages) - 1, -1, -1):
        if isinstance(messages[i], dict) and messages[i].get("role") == "user":
            return i
    return None


def first_system_index(messages: Sequence[Any]) -> int | None:
    return next((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") in SYSTEM_ROLES), None)


def writable(message: dict[str, Any]) -> bool:
    """Whether text can be added to the message without changing its kind: string or list-of-parts content."""
    return isinstance(message.get("content"), str | list)
