"""The <memory> contract: the instruction, the tag patterns, and a parser that is tolerant and never raises."""

from __future__ import annotations

import json
import logging
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import extract
from proxy.extract import CLOSE_TAG, OPEN_TAG, OPEN_TAG_MAX, OPEN_TAG_START, parse
from proxy.models import Forget, NewMemory


def new(text: str, category: str = "fact", replaces: str | None = None) -> NewMemory:
    return NewMemory(text, category, "inline", replaces=replaces)


# --- the instruction -------------------------------------------------------------------------------------------

def test_instruction_is_short_and_names_every_part_of_the_contract() -> None:
    text = extract.INSTRUCTION
    assert len(text) < 700  # paid on every request
    for part in ("<memory>", "</memory>", "preference", "fact", "event", "profile", '"replaces"', '"forget"',
                 "secret"):
        assert part in text


def test_the_example_in_the_instruction_is_a_valid_block_of_a_placeholder_never_stored() -> None:
    body = re.search(r"<memory>(.*?)</memory>", extract.INSTRUCTION, re.S)
    assert body is not None
    assert parse(body.group(1)) == [new(extract.PLACEHOLDER)]
    assert extract.resolve(parse(body.group(1)), {}, [], 500) == []  # a model that repeats it stores nothing


# --- tags ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tag", ["<memory>", "< memory >", "<Memory>", "<MEMORY >", "<\tmemory>", "<  mEmOrY  >"])
def test_opening_tag_spellings(tag: str) -> None:
    assert OPEN_TAG.fullmatch(tag)


@pytest.mark.parametrize("text", ["a < b", "<memo>", "<memoryx>", "<b>", "x<y", "<memories>", "<memory/>",
                                  "<\nmemory>", "<     memory>", "</memory>", "<memory id=1>"])
def test_look_alikes_are_not_opening_tags(text: str) -> None:
    assert OPEN_TAG.search(text) is None


@pytest.mark.parametrize("tag", ["</memory>", "< / memory >", "</MEMORY>", "</ Memory>", "<\t/memory\t>"])
def test_closing_tag_spellings(tag: str) -> None:
    assert CLOSE_TAG.fullmatch(tag)


@pytest.mark.parametrize("text", ["</memo>", "<memory>", "</memoryx>", "<//memory>", "</memory"])
def test_look_alikes_are_not_closing_tags(text: str) -> None:
    assert CLOSE_TAG.search(text) is None


def test_every_proper_prefix_of_an_opening_tag_is_a_start_and_nothing_longer_is() -> None:
    for tag in ("<memory>", "<    MEMORY    >", "< mem" + "ory\t>"):
        for end in range(1, len(tag)):
            assert OPEN_TAG_START.fullmatch(tag[:end]), tag[:end]
    longest = "<" + " " * 4 + "memory" + " " * 4 + ">"
    assert OPEN_TAG.fullmatch(longest) and len(longest) == OPEN_TAG_MAX
    for text in ("<memo>", "<x", "<     m", "<memoryx", "<memory     ", "a<m"):
        assert not OPEN_TAG_START.fullmatch(text)


# --- the parser ------------------------------------------------------------------------------------------------

def test_canonical_block() -> None:
    block = """
    [{"text": "User is vegetarian", "category": "fact"},
     {"text": "User now lives in Porto", "category": "fact", "replaces": "m2"},
     {"text": "Prefers short answers", "category": "preference"},
     {"forget": "m3"}]
    """
    assert parse(block) == [new("User is vegetarian"), new("User now lives in Porto", replaces="m2"),
                            new("Prefers short answers", "preference"), Forget("m3")]


@pytest.mark.parametrize("block, expected", [
    ('{"memories": [{"content": "Has two cats"}, {"content": "Works nights", "category": "context"}]}',
     [new("Has two cats"), new("Works nights", "context")]),
    ('{"memory": [{"memory": "Speaks Dutch"}]}', [new("Speaks Dutch")]),
    ('[{"fact": "Is allergic to nuts"}, {"memory": "Runs marathons"}, {"text": "Plays chess"}]',
     [new("Is allergic to nuts"), new("Runs marathons"), new("Plays chess")]),
    ('["Likes jazz", "Owns a bike"]', [new("Likes jazz"), new("Owns a bike")]),
    ('{"text": "Is a nurse", "category": "fact"}', [new("Is a nurse")]),
    ('{"forget": "m1"}', [Forget("m1")]),
    ('"Drinks tea"', [new("Drinks tea")]),
])
def test_tolerant_shapes(block: str, expected: list[object]) -> None:
    assert parse(block) == expected


@pytest.mark.parametrize("block", [
    '```json\n[{"text": "Lives in Oslo"}]\n```',
    '```\n[{"text": "Lives in Oslo"}]\n```',
    '[{"text": "Lives in Oslo",},]',
    '```json\n[{"text": "Lives in Oslo", "category": "fact",}\n]\n```',
    'Here is what I learned: [{"text": "Lives in Oslo"}] -- stored.',
    "[{'text': 'Lives in Oslo', 'category': None}]",
    '  \n [ {"text": "  Lives in Oslo  "} ] \n ',
])
def test_wrapped_or_slightly_broken_json_is_recovered(block: str) -> None:
    assert parse(block) == [new("Lives in Oslo")]


def test_one_object_per_line() -> None:
    assert parse('{"text": "A"}\n{"text": "B"}\n') == [new("A"), new("B")]


def test_invalid_items_are_skipped_not_fatal() -> None:
    block = json.dumps([
        {"text": "Keeps bees", "category": "  PREFERENCE "},
        {"text": "   "}, {"text": 42}, {"category": "fact"}, None, 7, True, [],
        {"text": "Is left-handed", "category": 5},
        {"forget": None}, {"forget": ""}, {"forget": "m4"},
        "", "  Has a sister  ",
    ])
    assert parse(block) == [new("Keeps bees", "preference"), new("Is left-handed"), Forget("m4"), new("Has a sister")]


@pytest.mark.parametrize("value, expected", [("m2", "m2"), ("M2", "m2"), ("[m2]", "m2"), (" m2 ", "m2"), (2, "m2"),
                                             ("2", "m2"), ("abc", "abc"), ("", None), (None, None), (True, None),
                                             (-1, None), (1.5, None)])
def test_short_ids_are_normalised(value: object, expected: str | None) -> None:
    assert extract.short_id(value) == expected
    block = json.dumps([{"text": "T", "replaces": value}, {"forget": value}])
    assert parse(block) == [new("T", replaces=expected), *([Forget(expected)] if expected else [])]


def test_other_forget_spellings() -> None:
    assert parse('[{"forget": ["m1", "m2"]}, {"action": "delete", "id": "m5"}, {"event": "FORGET", "id": 6}]') == [
        Forget("m1"), Forget("m2"), Forget("m5"), Forget("m6")]


def test_multilingual_text_is_kept_as_written() -> None:
    assert parse('[{"text": "Usuário mora em São Paulo 🇧🇷", "category": "Fact"}]') == [
        new("Usuário mora em São Paulo 🇧🇷")]


@pytest.mark.parametrize("block", ["I could not find anything new.", "[", "{{{", "<memory>", "null", "[1, 2",
                                   "[" * 5000, "{" * 5000 + "}" * 5000])
def test_garbage_gives_nothing_and_a_warning(block: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="memory_proxy.extract"):
        result = parse(block)
    assert result == [] or all(isinstance(op, NewMemory | Forget) for op in result)
    if block in ("I could not find anything new.", "[", "{{{", "[1, 2"):
        assert result == []
        assert any(r.name == "memory_proxy.extract" and r.levelno == logging.WARNING for r in caplog.records)
    assert "anything new" not in caplog.text  # the block is about a person: its text is never logged


def test_empty_block_and_empty_list_are_silent(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="memory_proxy.extract"):
        assert parse("") == parse("  \n ") == parse("[]") == parse('{"memories": []}') == []
    assert not caplog.records


def check(ops: list[object]) -> None:
    for op in ops:
        assert isinstance(op, NewMemory | Forget)
        if isinstance(op, NewMemory):
            assert op.text and op.text == op.text.strip() and op.source == "inline"
            assert op.category and op.category == op.category.lower()
        else:
            assert op.id


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=300))
def test_never_raises_on_arbitrary_text(text: str) -> None:
    check(parse(text))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
    | st.sampled_from(["text", "content", "memory", "fact", "category", "forget", "replaces", "memories", "m1"]),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(["text", "content", "memory", "fact", "category", "forget", "replaces",
                                       "memories", "items", "action", "id", "type", "x"]), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=500, deadline=None)
@given(json_values, st.sampled_from(["{}", "```json\n{}\n```", "Note: {} ok", "{},"]))
def test_never_raises_on_arbitrary_json(value: object, wrapper: str) -> None:
    check(parse(wrapper.replace("{}", json.dumps(value))))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.text(min_size=1, max_size=40).filter(str.strip), st.sampled_from(["fact", "Preference",
                                                                                                "CONTEXT"])),
                max_size=5))
def test_canonical_round_trip(items: list[tuple[str, str]]) -> None:
    block = json.dumps([{"text": text, "category": category} for text, category in items], ensure_ascii=False)
    assert parse(block) == [new(text.strip(), category.lower()) for text, category in items]


def test_the_date_of_an_event_is_kept_when_it_is_a_date() -> None:
    ops = parse('[{"text": "User ran the Lisbon half marathon", "category": "event", "happened_at": "2024-03-10"},'
                ' {"text": "User moved to Oslo", "date": "2023-09"},'
                ' {"text": "User broke a wrist", "happened_at": "last month"}]')
    assert [op.happened_at for op in ops if isinstance(op, NewMemory)] == ["2024-03-10", "2023-09", None]
    assert "happened_at" in extract.INSTRUCTION and "profile" in extract.INSTRUCTION


@pytest.mark.parametrize(("body", "real"), [
    ('[{"text": "User likes tea"}]', True), ('{"memories": []}', True), ("[]", True), ('["User likes tea"]', True),
    ('[{"forget": "m3"}]', True), ("```json\n[{'text': 'x'}]\n```", True),
    ('```json\n{"memories": ["§```"]}\n```', True),
    ('[{"text": "garbled, ', True), ("[{'text': broken", True),  # unreadable, but clearly a memory attempt
    ("[ ... ]", False), ("[1, 2, 3]", False), ("[1]", False), ("{name}", False), ("{}", False),
    ('{"a": 1}', False), ("[null, true]", False), ("[[]]", False), ('[1, "a"]', False), ("[[1], []]", False),
    ('[{"text": "User likes tea"}, {"oops": 1}]', True),  # one odd item does not make a real block text
])
def test_what_counts_as_a_memory_payload(body: str, real: bool) -> None:
    assert extract.is_payload(body) is real
