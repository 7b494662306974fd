"""Streaming: blocks never reach the client, whatever the split; everything else arrives at once and intact.

Expected results come from how each answer was built (every character labelled visible or not: tests/test_blocks.py
makes the answers), never from the code under test.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from itertools import combinations, pairwise
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.sse import SSEDecoder, SSEEvent
from proxy.stream import ChatStreamFilter, filter_completion
from tests.test_blocks import MARK, Answer, answers, split

# --- SSEDecoder ------------------------------------------------------------------------------------------------

line_text = st.text(st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=15)
field_text = line_text.filter(lambda s: "\0" not in s)


@st.composite
def sse_streams(draw: st.DrawFn) -> tuple[bytes, list[SSEEvent]]:
    """Random events, written with random line ends and optional spaces; the events a client must see."""
    endings = st.sampled_from(["\n", "\r\n", "\r"])
    lines: list[str] = []
    expected: list[SSEEvent] = []

    def field(name: str, value: str) -> None:
        space = " " if value.startswith(" ") or draw(st.booleans()) else ""
        lines.append(f"{name}:{space}{value}")

    for _ in range(draw(st.integers(0, 6))):
        if draw(st.integers(0, 4)) == 0:
            comment = draw(line_text)
            lines.append(":" + (" " + comment if comment.startswith(" ") or draw(st.booleans()) else comment))
            expected.append(SSEEvent(comment=comment))
            continue
        data = draw(st.lists(line_text, max_size=3))
        event = draw(st.none() | field_text)
        event_id = draw(st.none() | field_text)
        retry = draw(st.none() | st.integers(0, 10**6))
        if not data and event is None and event_id is None and retry is None:
            data = [""]
        if event is not None:
            field("event", event)
        if event_id is not None:
            field("id", event_id)
        if retry is not None:
            field("retry", str(retry))
        for value in data:
            if value == "" and draw(st.booleans()):
                lines.append("data")  # a field name alone: an empty value
            else:
                field("data", value)
        if draw(st.booleans()):
            lines.append(draw(st.sampled_from(["retry: soon", "foo: bar", "id: a\0b", "unknown"])))
        lines.append("")
        expected.append(SSEEvent("\n".join(data) if data else None, event, event_id, retry))
    text = ""
    for line in lines:
        # A CR then an empty line ended by LF would read as one CRLF: that is another stream than the one meant.
        text += line + (draw(st.sampled_from(["\r\n", "\r"])) if not line and text.endswith("\r") else draw(endings))
    return ("\ufeff" if draw(st.booleans()) else "").encode() + text.encode(), expected


def decode_all(pieces: list[bytes]) -> list[SSEEvent]:
    decoder = SSEDecoder()
    events = [event for piece in pieces for event in decoder.decode(piece)]
    return events + decoder.flush()


def split_bytes(raw: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(raw)]
    return [raw[a:b] for a, b in pairwise(bounds)]


@settings(max_examples=400, deadline=None)
@given(sse_streams(), st.data())
def test_sse_any_byte_split(stream: tuple[bytes, list[SSEEvent]], data: st.DataObject) -> None:
    raw, expected = stream
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=12))
    assert decode_all(split_bytes(raw, cuts)) == expected
    assert decode_all([bytes([b]) for b in raw]) == expected


@settings(max_examples=200, deadline=None)
@given(sse_streams())
def test_sse_encode_round_trips(stream: tuple[bytes, list[SSEEvent]]) -> None:
    _, events = stream
    encoded = b"".join(event.encode() for event in events)
    assert decode_all([encoded]) == events
    assert b"\r" not in encoded


SSE_SAMPLE = ("\ufeff: keep-alive\r\ndata: héllo 😀\r\ndata:  two\r\r"
              "event: note\nid: 7\nretry: 300\ndata\n\n:\rdata:{\"a\": \"日本\"}\r\n\r\n").encode()
SSE_EXPECTED = [SSEEvent(comment="keep-alive"), SSEEvent(data="héllo 😀\n two"),
                SSEEvent(data="", event="note", id="7", retry=300), SSEEvent(comment=""),
                SSEEvent(data='{"a": "日本"}')]


def test_sse_one_stream_split_at_every_byte_and_every_pair_of_bytes() -> None:
    positions = range(len(SSE_SAMPLE) + 1)
    for cuts in [*([i] for i in positions), *(list(pair) for pair in combinations(positions, 2))]:
        assert decode_all(split_bytes(SSE_SAMPLE, cuts)) == SSE_EXPECTED, cuts


def test_sse_events_come_out_as_soon_as_their_blank_line_arrives() -> None:
    decoder = SSEDecoder()
    assert decoder.decode(b": ping\n") == [SSEEvent(comment="ping")]
    assert decoder.decode(b"data: a\r") == []
    assert decoder.decode(b"\r") == [SSEEvent(data="a")]  # CR CR: a line end, then a blank line
    assert decoder.decode(b"\ndata: b\r") == []  # this LF is a line of its own: nothing pending, nothing sent
    assert decoder.decode(b"\n\r\n") == [SSEEvent(data="b")]


def test_sse_end_of_stream() -> None:
    decoder = SSEDecoder()
    assert decoder.decode(b"data: [DONE]") == []
    assert decoder.flush() == [SSEEvent(data="[DONE]")]  # lenient: an event without its blank line still counts
    decoder = SSEDecoder()
    assert decoder.decode(b"data: caf\xc3") == []
    assert decoder.flush() == [SSEEvent(data="caf\ufffd")]
    assert SSEDecoder().flush() == []


def test_sse_a_bom_is_dropped_only_at_the_start() -> None:
    assert decode_all([b"\xef\xbb", b"\xbfdata: x\n\n"]) == [SSEEvent(data="x")]
    assert decode_all([b"data: \xef\xbb\xbfx\n\n"]) == [SSEEvent(data="\ufeffx")]


def test_sse_encode() -> None:
    assert SSEEvent(data="a\nb", event="e", id="1", retry=5).encode() == (
        b"event: e\nid: 1\nretry: 5\ndata: a\ndata: b\n\n")
    assert SSEEvent(comment="keep-alive").encode() == b": keep-alive\n\n"
    assert SSEEvent(data="").encode() == b"data: \n\n"


# --- ChatStreamFilter ------------------------------------------------------------------------------------------

BASE = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000, "model": "gpt-x",
        "system_fingerprint": "fp_1"}
USAGE = {**BASE, "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}}
TOOL_CALLS = [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "weather", "arguments": ""}},
              {"index": 0, "function": {"arguments": '{"city": '}}, {"index": 0, "function": {"arguments": '"Rome"}'}}]


def chunk(index: int, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> dict[str, Any]:
    return {**BASE, "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}


def entry(token: str) -> dict[str, Any]:
    return {"token": token, "logprob": -0.25, "bytes": list(token.encode()), "top_logprobs": []}


@dataclass
class Scenario:
    raw: bytes
    answers: list[Answer]
    tokens: list[list[str]]
    tool_calls: bool
    finishes: list[str | None]
    done: bool
    comments: int


@st.composite
def chat_streams(draw: st.DrawFn) -> Scenario:
    rnd = draw(st.randoms(use_true_random=False))
    answers_ = [draw(answers(max_parts=6)) for _ in range(2)]
    tool_calls = draw(st.booleans())
    lanes: list[list[dict[str, Any]]] = []
    all_tokens: list[list[str]] = []
    finishes: list[str | None] = []
    for index, answer in enumerate(answers_):
        text = answer.text
        cuts = sorted(rnd.sample(range(1, len(text)), min(len(text) - 1, rnd.randint(0, len(text))))) if text else []
        tokens = [token for token in split(text, cuts) if token]
        all_tokens.append(tokens)
        lane = [chunk(index, {"role": "assistant", "content": ""})]
        i = 0
        while i < len(tokens):
            group = tokens[i:i + rnd.choice([1, 1, 2])]
            i += len(group)
            lane.append(chunk(index, {"content": "".join(group)}, logprobs={"content": [entry(t) for t in group],
                                                                              "refusal": None}))
        finish: str | None = rnd.choice(["stop", "stop", None])
        if index == 1 and tool_calls:
            lane += [chunk(index, {"tool_calls": [call]}) for call in TOOL_CALLS]
            finish = "tool_calls"
        if finish and len(lane) > 1 and rnd.random() < 0.3 and not (index == 1 and tool_calls):
            lane[-1]["choices"][0]["finish_reason"] = finish
        elif finish:
            lane.append(chunk(index, {}, finish))
        finishes.append(finish)
        lanes.append(lane)
    ordered = []
    while any(lanes):
        ordered.append(rnd.choice([lane for lane in lanes if lane]).pop(0))
    ordered.append(USAGE)
    done = draw(st.booleans())
    comments = 0
    pieces = []
    for item in ordered:
        if rnd.random() < 0.1:
            pieces.append(": keep-alive\n\n")
            comments += 1
        body = json.dumps(item, ensure_ascii=rnd.random() < 0.5) if rnd.random() < 0.5 else orjson.dumps(item).decode()
        end = rnd.choice(["\n", "\r\n", "\r"])
        pieces.append(f"data: {body}{end}{end}")
    if done:
        pieces.append("data: [DONE]\n\n")
    return Scenario("".join(pieces).encode(), answers_, all_tokens, tool_calls, finishes, done, comments)


def parse_output(raw: bytes) -> tuple[list[Any], int]:
    """Our output is plain LF-framed SSE: read it the simple way a client would."""
    text = raw.decode()
    assert text.endswith("\n\n") or not text
    items, comments = [], 0
    for block in text.split("\n\n")[:-1]:
        lines = block.split("\n")
        if all(line.startswith(":") for line in lines):
            comments += 1
            continue
        data = "\n".join(line.removeprefix("data: ") for line in lines if line.startswith("data: "))
        items.append("[DONE]" if data == "[DONE]" else json.loads(data))
    return items, comments


def run_chat(raw: bytes, cuts: list[int]) -> tuple[list[Any], int, ChatStreamFilter]:
    stream = ChatStreamFilter()
    out = [event for piece in split_bytes(raw, cuts) for event in stream.decode(piece)]
    out += stream.flush()
    items, comments = parse_output(b"".join(out))
    return items, comments, stream


@settings(max_examples=300, deadline=None)
@given(chat_streams(), st.data())
def test_chat_stream_any_split(scenario: Scenario, data: st.DataObject) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(scenario.raw)), max_size=20))
    items, comments, stream = run_chat(scenario.raw, cuts)
    output = b"".join(orjson.dumps(item) for item in items).decode()
    assert MARK not in output
    assert comments == scenario.comments
    assert stream.saw_done == scenario.done and (items[-1] == "[DONE]") == scenario.done
    chunks = [item for item in items if item != "[DONE]"]
    assert USAGE in chunks
    content: dict[int, str] = {0: "", 1: ""}
    kept: dict[int, list[str]] = {0: [], 1: []}
    calls: list[Any] = []
    finished: dict[int, str] = {}
    roles: set[int] = set()
    for item in chunks:
        if item is USAGE or item == USAGE:
            continue
        assert {key: item[key] for key in BASE} == BASE
        assert item["choices"], "a chunk with nothing left in it is dropped, not sent empty"
        for choice in item["choices"]:
            index, delta = choice["index"], choice["delta"]
            assert index not in finished, "nothing of a choice comes after its finish_reason"
            assert delta.get("content") or delta.get("role") or delta.get("tool_calls") or choice["finish_reason"]
            if delta.get("role"):
                assert index not in roles and not content[index]
                roles.add(index)
            content[index] += delta.get("content") or ""
            kept[index] += [e["token"] for e in (choice.get("logprobs") or {}).get("content") or []]
            calls += delta.get("tool_calls") or []
            if choice["finish_reason"]:
                finished[index] = choice["finish_reason"]
    for index, answer in enumerate(scenario.answers):
        assert content[index] == answer.visible
        # Exactly the tokens all of whose characters are visible keep their logprobs.
        positions = [0]
        for token in scenario.tokens[index]:
            positions.append(positions[-1] + len(token))
        assert kept[index] == [token for token, a, b in zip(scenario.tokens[index], positions, positions[1:],
                                                              strict=False) if all(answer.shown[a:b])]
    assert finished == {i: f for i, f in enumerate(scenario.finishes) if f}
    assert calls == (TOOL_CALLS if scenario.tool_calls else [])
    assert stream.blocks == {i: a.blocks for i, a in enumerate(scenario.answers) if a.blocks}


def sse(*items: Any) -> bytes:
    return b"".join(b"data: " + (item if isinstance(item, bytes) else orjson.dumps(item)) + b"\n\n" for item in items)


def test_the_first_visible_text_goes_out_in_the_same_call_it_arrived_in() -> None:
    stream = ChatStreamFilter()
    out = stream.decode(sse(chunk(0, {"role": "assistant", "content": ""}), chunk(0, {"content": "Hello"})))
    assert [json.loads(e[6:])["choices"][0]["delta"] for e in out] == [{"role": "assistant", "content": ""},
                                                                       {"content": "Hello"}]
    [event] = stream.decode(sse(chunk(0, {"content": " world"})))
    assert json.loads(event[6:])["choices"][0]["delta"] == {"content": " world"}
    assert stream.decode(sse(chunk(0, {"content": " <"}))) == []  # could be a tag: held, and the chunk dropped
    [event] = stream.decode(sse(chunk(0, {"content": "3"})))
    assert json.loads(event[6:])["choices"][0]["delta"] == {"content": " <3"}


def test_events_needing_no_change_go_out_as_they_came() -> None:
    raw = (b'data: {"id": "x",  "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": null}]}\n\n'
           b"event: ping\nid: 4\ndata: not json\n\n: keep-alive\n\n"
           b'data: {"error": {"message": "overloaded"}}\n\n'
           b"retry: 10\n\ndata: [DONE]\n\n")
    stream = ChatStreamFilter()
    assert b"".join(stream.decode(raw) + stream.flush()) == raw
    assert stream.saw_done and stream.blocks == {}


def test_held_text_comes_before_the_finish_reason() -> None:
    stream = ChatStreamFilter()
    out = stream.decode(sse(chunk(0, {"content": "Done"}), chunk(0, {"content": " \n"}),
                            chunk(0, {"tool_calls": TOOL_CALLS[:1]}), chunk(0, {}, "tool_calls")))
    deltas = [(json.loads(e[6:])["choices"][0]["delta"], json.loads(e[6:])["choices"][0]["finish_reason"])
              for e in out]
    assert deltas == [({"content": "Done"}, None), ({"tool_calls": TOOL_CALLS[:1]}, None),
                      ({"content": " \n"}, "tool_calls")]


def test_held_text_at_done_comes_in_a_chunk_of_its_own_before_done() -> None:
    stream = ChatStreamFilter()
    out = stream.decode(sse(chunk(0, {"content": "Bye <mem"}), chunk(1, {"content": "Hi <memory>[\"§"}), b"[DONE]"))
    assert out[-1] == b"data: [DONE]\n\n"
    synthetic = json.loads(out[-2][6:])
    assert synthetic == {**BASE, "choices": [{"index": 0, "delta": {"content": " <mem"}, "logprobs": None,
                                             "finish_reason": None}]}
    assert stream.blocks == {1: ['["§']} and stream.flush() == []


def test_flush_releases_held_text_when_the_stream_ends_without_done() -> None:
    stream = ChatStreamFilter()
    assert [json.loads(e[6:])["choices"][0]["delta"] for e in stream.decode(sse(chunk(0, {"content": "a  "})))] == [
        {"content": "a"}]
    [event] = stream.flush()
    assert json.loads(event[6:])["choices"][0]["delta"] == {"content": "  "}
    assert not stream.saw_done


def test_n2_choices_are_filtered_separately() -> None:
    stream = ChatStreamFilter()
    out = stream.decode(sse({**BASE, "choices": [
        {"index": 0, "delta": {"content": "A <memory>[\"§"}, "finish_reason": None},
        {"index": 1, "delta": {"content": "B <memo"}, "finish_reason": None}]},
        {**BASE, "choices": [{"index": 1, "delta": {"content": "ry>{\"text\": \"§\"}</memory>!"},
                              "finish_reason": None},
                             {"index": 0, "delta": {"content": "\"]</memory>?"}, "finish_reason": None}]}))
    deltas = [[(c["index"], c["delta"]["content"]) for c in json.loads(e[6:])["choices"]] for e in out]
    assert deltas == [[(0, "A"), (1, "B")], [(1, "!"), (0, "?")]]
    assert stream.blocks == {0: ['["§"]'], 1: ['{"text": "§"}']}


def test_logprobs_placed_by_bytes_when_tokens_do_not_spell_the_text() -> None:
    text = "é <memory>[\"§\"]</memory>"
    entries = [{"token": "bytes:\\xc3", "bytes": [0xC3], "logprob": -1.0},
               {"token": "bytes:\\xa9", "bytes": [0xA9], "logprob": -1.0},
               {"token": " <", "bytes": list(b" <"), "logprob": -1.0},
               {"token": "memory>[\"§\"]</memory>", "bytes": list('memory>["§"]</memory>'.encode()), "logprob": -1.0}]
    stream = ChatStreamFilter()
    [event] = stream.decode(sse(chunk(0, {"content": text}, logprobs={"content": entries})))
    choice = json.loads(event[6:])["choices"][0]
    assert choice["delta"] == {"content": "é"}
    assert choice["logprobs"]["content"] == entries[:2]


def test_logprobs_that_cannot_be_placed_are_dropped_from_an_altered_chunk() -> None:
    stream = ChatStreamFilter()
    entries = [{"token": "?", "logprob": -1.0}, {"token": "?", "logprob": -1.0}]
    [event] = stream.decode(sse(chunk(0, {"content": "ok <memory>[\"§\"]</memory>"}, logprobs={"content": entries})))
    choice = json.loads(event[6:])["choices"][0]
    assert choice["delta"] == {"content": "ok"} and choice["logprobs"] == {"content": []}


# --- filter_completion -----------------------------------------------------------------------------------------

def completion(*contents: str | None, logprobs: bool = False) -> dict[str, Any]:
    return {"id": "chatcmpl-2", "object": "chat.completion", "created": 1, "model": "gpt-x",
            "choices": [{"index": i, "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": {"content": [entry(t) for t in re.findall(r"\S+|\s+", text or "")],
                                      "refusal": None} if logprobs else None, "finish_reason": "stop"}
                        for i, text in enumerate(contents)],
            "usage": {"total_tokens": 5}, "service_tier": "default"}


def test_completion_without_a_block_is_returned_as_is() -> None:
    body = completion("Hello there.", None)
    assert filter_completion(body) == (body, {})
    assert filter_completion(body)[0] is body
    assert filter_completion({"object": "list"}) == ({"object": "list"}, {})


def test_completion_loses_its_blocks_and_only_them() -> None:
    body = completion('Sure thing.\n\n<memory>["§1"]</memory>', "No block here.",
                      'A <memory>["§2"]</memory> B <memory>["§3"', logprobs=True)
    original = json.loads(json.dumps(body))
    filtered, blocks = filter_completion(body)
    assert body == original  # not modified
    assert [c["message"]["content"] for c in filtered["choices"]] == ["Sure thing.", "No block here.", "A B"]
    assert blocks == {0: ['["§1"]'], 2: ['["§2"]', '["§3"']}
    assert [[e["token"] for e in c["logprobs"]["content"]] for c in filtered["choices"]] == [
        ["Sure", " ", "thing."], ["No", " ", "block", " ", "here."], ["A", " ", "B"]]
    assert MARK not in orjson.dumps(filtered).decode()
    for key in ("id", "object", "created", "model", "usage", "service_tier"):
        assert filtered[key] == body[key]
    assert filtered["choices"][1] is body["choices"][1]


@settings(max_examples=300, deadline=None)
@given(answers())
def test_completion_and_stream_agree(answer: Answer) -> None:
    filtered, blocks = filter_completion(completion(answer.text))
    assert filtered["choices"][0]["message"]["content"] == answer.visible
    assert blocks == ({0: answer.blocks} if answer.blocks else {})



# --- bounds: an event longer than the cap is relayed, not buffered -----------------------------------------------

def test_sse_an_event_over_the_cap_spills_as_it_came() -> None:
    decoder = SSEDecoder(max_event=100)
    raw = b"data: first\n\nevent: big\nid: 7\ndata: " + b"x" * 90 + b"\ndata: " + b"y" * 50 + b"\n\ndata: after\n\n"
    events = decoder.decode(raw)
    assert events == [SSEEvent("first")] and decoder.overflowed
    assert decoder.spill() == raw[len(b"data: first\n\n"):]
    decoder = SSEDecoder(max_event=100)
    assert decoder.decode(b"data: " + b"z" * 150) == [] and decoder.overflowed  # one line without its end
    assert decoder.spill() == b"data: " + b"z" * 150


def test_a_stream_with_an_oversized_event_is_relayed_from_there_on() -> None:
    stream = ChatStreamFilter(max_event=1000)
    out = stream.decode(sse(chunk(0, {"content": "Hello "})))
    huge = chunk(0, {"content": "<memory>" + "w" * 2000})
    rest = b"data: " + orjson.dumps(huge) + b"\n\n"
    out += stream.decode(rest[:700])
    out += stream.decode(rest[700:])
    out += stream.decode(b"data: [DONE]\n\n")
    out += stream.flush()
    assert stream.relaying
    joined = b"".join(out)
    assert joined.endswith(rest + b"data: [DONE]\n\n")  # byte for byte from the oversized event on
    items = [json.loads(line[6:]) for line in joined[:-len(rest) - 14].decode().split("\n\n") if line]
    assert "".join(item["choices"][0]["delta"]["content"] for item in items) == "Hello "  # held text went first
