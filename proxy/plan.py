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
  a tool call is forced. Then no instruction is sent and the answer is relayed untouched.
* **How this turn's facts are learned** (`extraction`): `inline` (the block), `background` (a separate call after
  the answer, proxy/extraction.py) or `off`. The operator's setting says what is allowed; a client's
  `X-Memory-Extraction` header may only ask for less:

      setting      a client may ask for          the turn: block possible / not possible (or a listed model)
      off          off                           off / off
      inline       inline, off                   inline / off
      background   background, off               background / background
      auto         auto, inline, background, off inline / background
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from proxy.errors import BadRequest

SYSTEM_ROLES = ("system", "developer")
PLACEMENTS = ("user", "system")
MODES = ("off", "inline", "background", "auto")
ALLOWED = {"off": ("off",), "inline": ("inline", "off"), "background": ("background", "off"), "auto": MODES}
EXTRACTION_HEADER = "x-memory-extraction"
# Request options of OpenAI-compatible servers that constrain decoding to a grammar: no room for a block.
CONSTRAINED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "guided_decoding_backend",
               "structured_outputs", "grammar", "json_schema", "regex", "format")


@dataclass(frozen=True, slots=True)
class Plan:
    """What a request allows. Message indices refer to `body["messages"]`; None: nowhere to put it."""

    recall: bool  # there is a user message whose text can be searched for, and a place for memories
    extraction: str  # inline | background | off: how this turn's facts are learned
    reason: str  # why a block is not possible ("" when it is)
    memories_at: int | None  # the message whose content gets the memories
    instruction_at: int | None  # the message whose content gets the instruction (inline only)

    @property
    def inline(self) -> bool:
        """The model is asked for a <memory> block, and the answer is filtered."""
        return self.extraction == "inline"


def plan(body: dict[str, Any], placement: str = "user", *, extraction: str = "inline", asked: str | None = None,
         background_models: Sequence[str] = ()) -> Plan:
    """Decide for a request body (a dict with a `messages` list, as chat.parse_request checks). `extraction` is
    the operator's setting, `asked` the client's X-Memory-Extraction header (BadRequest when not a mode),
    `background_models` glob patterns of models that do not follow the block instruction."""
    messages: Sequence[Any] = body["messages"]
    user = last_user_index(messages)
    system = first_system_index(messages)
    reason = no_block_reason(body)
    if system is not None and not writable(messages[system]):
        system = None
    if user is not None and not writable(messages[user]):
        user, reason = None, reason or "the last user message has no text content"
    model = body.get("model")
    model = model if isinstance(model, str) else ""
    if not reason and any(fnmatchcase(model, pattern) for pattern in background_models):
        reason = "a model listed as not following the instruction"
    mode = turn_mode(extraction, asked, block_possible=not reason)  # the header is checked on every request
    mode = mode if user is not None else "off"  # no user text: nothing to learn
    memories_at = system if placement == "system" and system is not None else user
    instruction_at = system if system is not None else user
    return Plan(recall=memories_at is not None, extraction=mode, reason=reason, memories_at=memories_at,
                instruction_at=instruction_at if mode == "inline" else None)


def turn_mode(setting: str, asked: str | None, *, block_possible: bool) -> str:
    """inline, background or off for one turn (the table in this module's docstring)."""
    if asked is not None:
        asked = asked.strip().lower()
        if asked not in MODES:
            raise BadRequest(f"X-Memory-Extraction must be one of {', '.join(MODES)}, not {asked!r}",
                             param="X-Memory-Extraction", code="invalid_extraction")
    mode = asked if asked in ALLOWED[setting] else setting
    if mode == "auto":
        return "inline" if block_possible else "background"
    if mode == "inline" and not block_possible:
        return "off"
    return mode


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
    `function_call` naming a function. The Responses API's forms too: a named function, custom or MCP tool, a
    hosted tool (`{"type": "web_search_preview"}`...) and allowed_tools with its `mode` at the top."""
    if choice == "required":
        return True
    if not isinstance(choice, dict):
        return False
    if choice.get("type") == "allowed_tools":
        allowed = choice.get("allowed_tools")
        return (allowed if isinstance(allowed, dict) else choice).get("mode") == "required"
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
