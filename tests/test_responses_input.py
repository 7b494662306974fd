"""Where memories and the instruction go in a Responses API request, and what the proxy may ask of its answer: a
table of request shapes, then what the rewrite writes there."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from proxy.errors import BadRequest
from proxy.models import Hit, Memory
from proxy.responses_input import (
    ResponsePlan,
    plan_response,
    rewrite_response,
    turn_messages,
)
from proxy.rewrite import MEMORIES_HEADER
from proxy.search import question as searched_question

INSTRUCTION = "Append a <memory> block when the user reveals a durable fact."
USER = {"role": "user", "content": "What should I cook tonight?"}
SYSTEM = {"role": "system", "content": "You are terse."}
DEVELOPER = {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Be nice."}]}
ASSISTANT = {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
             "content": [{"type": "output_text", "text": "Hello!", "annotations": []}]}
CALL = {"type": "function_call", "call_id": "call_1", "name": "weather", "arguments": "{}"}
RESULT = {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}
IMAGE = {"type": "message", "role": "user", "content": [{"type": "input_image", "image_url": "data:x"}]}
TOOL = {"type": "function", "name": "weather", "parameters": {"type": "object", "properties": {}}}
SCHEMA = {"format": {"type": "json_schema", "name": "x", "strict": True, "schema": {"type": "object"}}}

# body, placement → (extraction under `auto`, memories_at, instruction_at, reason starts with)
SHAPES: list[tuple[str, dict[str, Any], str, tuple[str, Any, Any, str]]] = [
    ("string input", {"input": "hi"}, "user", ("inline", "input", "input", "")),
    ("instructions", {"input": "hi", "instructions": "Be terse."}, "user", ("inline", "input", "instructions", "")),
    ("empty instructions are none", {"input": "hi", "instructions": ""}, "user", ("inline", "input", "input", "")),
    ("system item", {"input": [SYSTEM, USER]}, "user", ("inline", 1, 0, "")),
    ("developer item, then a turn", {"input": [DEVELOPER, USER, ASSISTANT, USER]}, "user", ("inline", 3, 0, "")),
    ("instructions beat a system item", {"instructions": "x", "input": [SYSTEM, USER]}, "user",
     ("inline", 1, "instructions", "")),
    ("tool results after the user", {"input": [USER, CALL, RESULT]}, "user", ("inline", 0, 0, "")),
    ("a chain's tool turn: no user input", {"previous_response_id": "resp_1", "input": [RESULT]}, "user",
     ("off", None, None, "no user input")),
    ("image only", {"input": [IMAGE]}, "user", ("inline", 0, 0, "")),
    ("content null", {"input": [{"role": "user", "content": None}]}, "user", ("off", None, None, "no user input")),
    ("no input (a stored prompt)", {"prompt": {"id": "pmpt_1"}}, "user", ("off", None, None, "no user input")),
    ("system placement, instructions", {"input": "hi", "instructions": "x"}, "system",
     ("inline", "instructions", "instructions", "")),
    ("system placement, system item", {"input": [SYSTEM, USER]}, "system", ("inline", 0, 0, "")),
    ("system placement, nothing of the client's", {"input": [USER]}, "system", ("inline", 0, 0, "")),
    ("text.format text", {"input": "hi", "text": {"format": {"type": "text"}, "verbosity": "low"}}, "user",
     ("inline", "input", "input", "")),
    ("text.format json_schema", {"input": "hi", "text": SCHEMA}, "user",
     ("background", "input", None, "text.format json_schema")),
    ("text.format json_object", {"input": "hi", "text": {"format": {"type": "json_object"}}}, "user",
     ("background", "input", None, "text.format json_object")),
    ("tool_choice required", {"input": "hi", "tools": [TOOL], "tool_choice": "required"}, "user",
     ("background", "input", None, "forced tool call")),
    ("named function", {"input": "hi", "tools": [TOOL], "tool_choice": {"type": "function", "name": "weather"}},
     "user", ("background", "input", None, "forced tool call")),
    ("hosted tool forced", {"input": "hi", "tool_choice": {"type": "web_search_preview"}}, "user",
     ("background", "input", None, "forced tool call")),
    ("MCP tool forced", {"input": "hi", "tool_choice": {"type": "mcp", "server_label": "deepwiki"}}, "user",
     ("background", "input", None, "forced tool call")),
    ("allowed_tools required", {"input": "hi", "tool_choice": {"type": "allowed_tools", "mode": "required",
                                                                "tools": [{"type": "function", "name": "weather"}]}},
     "user", ("background", "input", None, "forced tool call")),
    ("allowed_tools auto", {"input": "hi", "tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": []}},
     "user", ("inline", "input", "input", "")),
    ("tool_choice auto", {"input": "hi", "tools": [TOOL], "tool_choice": "auto"}, "user",
     ("inline", "input", "input", "")),
    ("tool_choice none", {"input": "hi", "tool_choice": "none"}, "user", ("inline", "input", "input", "")),
    ("background response", {"input": "hi", "background": True}, "user",
     ("background", "input", None, "background response")),
    ("vLLM guided decoding", {"input": "hi", "guided_json": {"type": "object"}}, "user",
     ("background", "input", None, "constrained decoding")),
    ("audio output", {"input": "hi", "modalities": ["text", "audio"]}, "user",
     ("background", "input", None, "audio output")),
]


@pytest.mark.parametrize(("name", "body", "placement", "expected"), SHAPES, ids=[s[0] for s in SHAPES])
def test_plan_by_request_shape(name: str, body: dict[str, Any], placement: str,
                               expected: tuple[str, Any, Any, str]) -> None:
    decided = plan_response({"model": "gpt-x", **body}, placement, extraction="auto")
    mode, memories_at, instruction_at, reason = expected
    assert (decided.extraction, decided.memories_at, decided.instruction_at) == (mode, memories_at, instruction_at)
    assert decided.reason.startswith(reason) and bool(decided.reason) == bool(reason)
    assert decided.recall == (memories_at is not None)


@pytest.mark.parametrize(("setting", "asked", "possible", "impossible"), [
    ("inline", None, "inline", "off"), ("background", None, "background", "background"), ("off", None, "off", "off"),
    ("auto", "off", "off", "off"), ("auto", "inline", "inline", "off"), ("inline", "background", "inline", "off"),
])
def test_extraction_modes_follow_the_chat_table(setting: str, asked: str | None, possible: str,
                                                impossible: str) -> None:
    assert plan_response({"input": "hi"}, extraction=setting, asked=asked).extraction == possible
    assert plan_response({"input": "hi", "text": SCHEMA}, extraction=setting, asked=asked).extraction == impossible


def test_a_listed_model_is_learned_from_in_the_background_and_a_bad_header_refused() -> None:
    decided = plan_response({"model": "smollm2-135m", "input": "hi"}, extraction="auto",
                            background_models=["smollm*"])
    assert decided.extraction == "background" and decided.instruction_at is None
    with pytest.raises(BadRequest):
        plan_response({"input": "hi"}, extraction="auto", asked="sometimes")


# --- the rewrite -----------------------------------------------------------------------------------------------

def hit(text: str, id: str = "abc") -> Hit:
    return Hit(Memory(id=id, user="u", text=text, category="fact", source="api", created_at=1.0, updated_at=1.0), 0.8)


def rewritten(body: dict[str, Any], hits: list[Hit], placement: str = "user", extraction: str = "auto"
              ) -> tuple[dict[str, Any], dict[str, str]]:
    original = copy.deepcopy(body)
    decided = plan_response(body, placement, extraction=extraction)
    new, aliases = rewrite_response(body, hits, decided, instruction=INSTRUCTION)
    assert body == original  # never modified in place
    return new, aliases


def test_a_string_input_gets_memories_then_the_instruction_before_the_question() -> None:
    new, aliases = rewritten({"model": "m", "input": "What should I cook?"}, [hit("User is vegetarian")])
    memories, instruction, question = new["input"].split("\n\n")
    assert memories.startswith("<memories>\n" + MEMORIES_HEADER) and '"User is vegetarian"' in memories
    assert (instruction, question) == (INSTRUCTION, "What should I cook?")
    assert aliases == {"m1": "abc"} and set(new) == {"model", "input"}  # no field of ours


def test_the_instruction_ends_the_clients_instructions_and_stays_byte_stable() -> None:
    turns = []
    for question, memory in (("Hi", "User is vegetarian"), ("And tomorrow?", "User lives in Porto")):
        body = {"model": "m", "instructions": "Be terse.", "previous_response_id": "resp_1", "input": question}
        new, _ = rewritten(body, [hit(memory)])
        assert new["input"].endswith("\n\n" + question) and memory in new["input"]
        turns.append(new["instructions"])
    assert turns[0] == turns[1] == "Be terse.\n\n" + INSTRUCTION


def test_items_get_an_input_text_part_and_every_other_item_is_left_alone() -> None:
    body = {"model": "m", "input": [DEVELOPER, USER, ASSISTANT, CALL, RESULT, IMAGE]}
    new, _ = rewritten(body, [hit("User is vegetarian")])
    items = new["input"]
    assert [id(item) for item in items[1:5]] == [id(item) for item in body["input"][1:5]]  # the very same objects
    assert items[0]["content"] == [*DEVELOPER["content"], {"type": "input_text", "text": INSTRUCTION}]
    first, *rest = items[5]["content"]
    assert first["type"] == "input_text" and "User is vegetarian" in first["text"] and rest == IMAGE["content"]
    assert {k: v for k, v in items[0].items() if k != "content"} == {"type": "message", "role": "developer"}


def test_a_system_item_with_string_content_gets_a_paragraph() -> None:
    new, _ = rewritten({"input": [SYSTEM, USER]}, [hit("User is vegetarian")], placement="system")
    assert new["input"][0]["content"].startswith("You are terse.\n\n" + INSTRUCTION + "\n\n<memories>")
    assert new["input"][1] is USER


def test_no_instruction_where_a_block_cannot_go_and_nothing_to_add_is_the_body_itself() -> None:
    body = {"input": "hi", "text": SCHEMA}
    new, _ = rewritten(body, [hit("User is vegetarian")])
    assert INSTRUCTION not in new["input"] and "User is vegetarian" in new["input"]
    assert rewritten(body, [])[0] is body
    off = {"input": "hi"}
    assert rewritten(off, [], extraction="off")[0] is off
    assert rewrite_response(off, [], ResponsePlan(True, "off", "", "input", None), instruction=INSTRUCTION)[0] is off


def test_the_question_searched_and_the_turn_as_chat_messages() -> None:
    body = {"instructions": "x", "input": [DEVELOPER, {"role": "user", "content": "old"}, ASSISTANT, CALL, RESULT,
                                          {"role": "user", "content": [{"type": "input_text", "text": "new"},
                                                                       IMAGE["content"][0]]}]}
    asked = searched_question(turn_messages(body))  # the newest user text, and the one before
    assert asked == "new" and asked.before == "old"
    assert searched_question(turn_messages({"input": "just this"})) == "just this"
    assert searched_question(turn_messages({"input": [RESULT]})) == "" == searched_question(turn_messages({}))
    assert turn_messages(body) == [{"role": "developer", "content": "Be nice."}, {"role": "user", "content": "old"},
                                   {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "new"}]
    assert turn_messages({"input": "hi"}) == [{"role": "user", "content": "hi"}]
