"""The block out of Responses API answers: no byte of a block in any event, every place the text appears agreeing
with what the deltas delivered, every other event intact, in order, with its own sequence_number.

Answers come labelled (tests/test_blocks.py); events come from tests/fakeresponses.py, the shapes of OpenAI's API;
expected results come from how each answer was built. The official SDK's own stream accumulator
(`ResponseStreamState`, behind `client.responses.stream`) must accept what comes out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st
from openai._models import construct_type
from openai._types import omit
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import ResponseStreamEvent

from proxy.responses_output import filter_response, response_id
from proxy.responses_stream import ResponsesStreamFilter
from tests.fakeresponses import Output, events, items, response, sse
from tests.test_blocks import MARK, Answer, answers, split
from tests.test_stream import parse_output, split_bytes

TEXT_PLACES = ("response.output_text.delta", "response.output_text.done", "response.content_part.added",
               "response.content_part.done", "response.output_item.added", "response.output_item.done",
               "response.created", "response.in_progress", "response.completed", "response.incomplete",
               "response.output_text.annotation.added")


@dataclass
class Scenario:
    raw: bytes
    sent: list[dict[str, Any]]  # the events as the upstream sent them
    answers: list[Answer]  # per message item, in output order
    tokens: list[list[str]]
    citations: list[tuple[int, int]]  # of the first message
    logprobs: bool
    comments: int


def deltas_of(text: str, rnd: Any) -> list[str]:
    cuts = sorted(rnd.sample(range(1, len(text)), min(len(text) - 1, rnd.randint(0, len(text))))) if text else []
    tokens = split(text, cuts)
    if rnd.random() < 0.2:  # servers send empty deltas too
        tokens.insert(rnd.randint(0, len(tokens)), "")
    return tokens


@st.composite
def response_streams(draw: st.DrawFn) -> Scenario:
    rnd = draw(st.randoms(use_true_random=False))
    first = draw(answers(max_parts=6))
    second = draw(answers(max_parts=4)) if draw(st.booleans()) else None
    tokens = [deltas_of(first.text, rnd)] + ([deltas_of(second.text, rnd)] if second else [])
    shown = [i for i, s in enumerate(first.shown) if s]
    citations = sorted({(a, b) for a, b in (sorted(rnd.sample(shown, 2)) for _ in range(rnd.randint(0, 2)))
                        if len(shown) >= 2 and b > a} if len(shown) >= 2 else set())
    out = Output(deltas=tokens[0], reasoning="Let me think <memory> over." if rnd.random() < 0.5 else "",
                 calls=[("get_weather", '{"city": "<memory>[1]</memory>"}')] if rnd.random() < 0.5 else [],
                 citations=citations, logprobs=draw(st.booleans()), more=tokens[1:],
                 status="incomplete" if rnd.random() < 0.2 else "completed")
    sent = events(out, "resp_1", {"model": "gpt-x"})
    pieces, comments = [], 0
    for event in sent:
        if rnd.random() < 0.05:
            pieces.append(b": keep-alive\n\n")
            comments += 1
        piece = sse([event])
        if rnd.random() < 0.3:
            piece = piece.replace(b"\n", b"\r\n")
        pieces.append(piece)
    return Scenario(b"".join(pieces), sent, [first] + ([second] if second else []), tokens, citations,
                    out.logprobs, comments)


def parse(raw: bytes) -> tuple[list[dict[str, Any]], int]:
    """Our output, read the simple way a client would; each event is named by its type."""
    events, comments = parse_output(raw)
    assert re.findall(r"^event: (.*)$", raw.decode(), re.M) == [event["type"] for event in events]
    return events, comments


def run(raw: bytes, cuts: list[int], **options: Any) -> tuple[list[dict[str, Any]], int, ResponsesStreamFilter]:
    stream = ResponsesStreamFilter(**options)
    out = [event for piece in split_bytes(raw, cuts) for event in stream.decode(piece)]
    events, comments = parse(b"".join(out + stream.flush()))
    return events, comments, stream


def without_text(event: dict[str, Any]) -> dict[str, Any]:
    """The event with every text the filter may change (texts, annotations, logprobs) blanked out."""
    def blank(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: "" if k in ("text", "delta", "output_text") else [] if k in ("annotations", "logprobs")
                    else 0 if k in ("start_index", "end_index") else blank(v) for k, v in value.items()}
        if isinstance(value, list):
            return [blank(v) for v in value]
        return value
    return blank(event) if event["type"] in TEXT_PLACES else event


def sdk_accepts(events: list[dict[str, Any]]) -> Any:
    """What `client.responses.stream(...)` makes of these events: its final response, or None."""
    state: ResponseStreamState[Any] = ResponseStreamState(input_tools=omit, text_format=omit)
    for event in events:
        state.handle_event(construct_type(type_=ResponseStreamEvent, value=event))  # type: ignore[arg-type]
    return state._completed_response


@settings(max_examples=300, deadline=None)
@given(response_streams(), st.data())
def test_response_stream_any_split(scenario: Scenario, data: st.DataObject) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(scenario.raw)), max_size=20))
    got, comments, stream = run(scenario.raw, cuts)
    assert MARK not in orjson.dumps(got).decode()
    assert comments == scenario.comments
    # Every event, in order, with its own sequence number; nothing but the answer's text changed.
    assert [e["sequence_number"] for e in got] == list(range(len(scenario.sent)))
    assert [without_text(e) for e in got] == [without_text(e) for e in scenario.sent]
    messages = [e["output_index"] for e in scenario.sent
                if e["type"] == "response.output_item.added" and e["item"]["type"] == "message"]
    first = scenario.answers[0]
    shift = [sum(first.shown[:p]) for p in range(len(first.text) + 1)]
    for index, answer in zip(messages, scenario.answers, strict=False):
        def at(kind: str, event: dict[str, Any]) -> bool:
            return event["type"] == kind and event.get("output_index") == index  # noqa: B023
        visible = answer.visible
        assert "".join(e["delta"] for e in got if at("response.output_text.delta", e)) == visible
        [done] = [e for e in got if at("response.output_text.done", e)]
        [part] = [e["part"] for e in got if at("response.content_part.done", e)]
        [item] = [e["item"] for e in got if at("response.output_item.done", e)]
        final = got[-1]["response"]["output"][index]
        assert done["text"] == part["text"] == item["content"][0]["text"] == final["content"][0]["text"] == visible
        assert part == item["content"][0] == final["content"][0]
        if scenario.logprobs:  # exactly the tokens all of whose characters are shown keep their logprobs
            starts = [0]
            for token in scenario.tokens[messages.index(index)]:
                starts.append(starts[-1] + len(token))
            expected = [t for t, a, b in zip(scenario.tokens[messages.index(index)], starts, starts[1:], strict=False)
                        if t and all(answer.shown[a:b])]
            assert [e["token"] for d in got if at("response.output_text.delta", d) for e in d["logprobs"]] == expected
            assert [e["token"] for e in done["logprobs"]] == [e["token"] for e in part["logprobs"]] == expected
        if index == messages[0] and scenario.citations:
            assert [(a["start_index"], a["end_index"]) for a in part["annotations"]] == [
                (shift[a], shift[b]) for a, b in scenario.citations]
    assert stream.blocks == {i: a.blocks for i, a in zip(messages, scenario.answers, strict=False) if a.blocks}
    assert stream.response_id == "resp_1" and not stream.relaying
    final = sdk_accepts(got)
    if got[-1]["type"] == "response.completed":
        assert final is not None and final.output_text == "".join(a.visible for a in scenario.answers)


@settings(max_examples=200, deadline=None)
@given(answers(), st.booleans())
def test_a_whole_response_and_a_stream_agree(answer: Answer, logprobs: bool) -> None:
    out = Output(deltas=[answer.text], logprobs=logprobs)
    body = response("resp_1", {"model": "m"}, items(out, "resp_1"), "completed")
    filtered, blocks = filter_response(body)
    assert filtered["output"][0]["content"][0]["text"] == answer.visible
    assert blocks == ({0: answer.blocks} if answer.blocks else {})
    assert MARK not in orjson.dumps(filtered).decode()
    if answer.visible == answer.text:
        assert filtered is body


# --- what goes out when ------------------------------------------------------------------------------------------

def delta(text: str, seq: int, index: int = 0) -> bytes:
    return sse([{"type": "response.output_text.delta", "item_id": "msg_1", "output_index": index,
                 "content_index": 0, "delta": text, "logprobs": [], "sequence_number": seq}])


def done(text: str, seq: int, index: int = 0) -> bytes:
    return sse([{"type": "response.output_text.done", "item_id": "msg_1", "output_index": index,
                 "content_index": 0, "text": text, "logprobs": [], "sequence_number": seq}])


def deltas(out: list[bytes]) -> list[tuple[int, str]]:
    return [(e["sequence_number"], e.get("delta", e.get("text"))) for e in parse(b"".join(out))[0]] if out else []


def test_text_goes_out_at_once_and_a_held_delta_waits_for_the_next() -> None:
    stream = ResponsesStreamFilter()
    assert deltas(stream.decode(delta("Hello", 0))) == [(0, "Hello")]
    assert stream.decode(delta(" <", 1)) == []  # could be a tag: the event waits, so held text has a carrier
    assert deltas(stream.decode(delta("3", 2))) == [(1, ""), (2, " <3")]
    assert stream.decode(delta(" <memory>[", 3)) == []
    assert deltas(stream.decode(delta('"§"]</memory>!', 4))) == [(3, ""), (4, "!")]
    assert stream.blocks == {0: ['["§"]']}


def test_text_released_when_the_part_ends_goes_in_its_last_delta() -> None:
    stream = ResponsesStreamFilter()
    assert deltas(stream.decode(delta("Bye", 0))) == [(0, "Bye")]
    assert stream.decode(delta(" <mem", 1)) == []
    assert deltas(stream.decode(done("Bye <mem", 2))) == [(1, " <mem"), (2, "Bye <mem")]
    stream = ResponsesStreamFilter()
    stream.decode(delta("Hi", 0))
    assert stream.decode(delta("  \n", 1)) == []
    assert deltas(stream.flush()) == [(1, "  \n")]  # the stream ended without done: flush() releases it


def test_events_behind_a_held_delta_keep_their_order() -> None:
    stream = ResponsesStreamFilter()
    annotation = sse([{"type": "response.output_text.annotation.added", "item_id": "msg_1", "output_index": 0,
                       "content_index": 0, "annotation_index": 0, "sequence_number": 2,
                       "annotation": {"type": "url_citation", "start_index": 0, "end_index": 2, "title": "t",
                                      "url": "u"}}])
    assert stream.decode(delta("Hi <memory>[", 0) + delta('"§"]', 1) + annotation) == [delta("Hi", 0)]
    out = stream.decode(delta("</memory>", 3))
    assert [e["sequence_number"] for e in parse(b"".join(out))[0]] == [1, 2, 3]


def test_an_odd_stream_passes_as_it_came() -> None:
    raw = (b": keep-alive\n\ndata: not json\n\nevent: error\ndata: {\"type\": \"error\", \"code\": \"server_error\", "
           b"\"message\": \"boom\", \"param\": null, \"sequence_number\": 4}\n\ndata: [DONE]\n\n")
    stream = ResponsesStreamFilter()
    assert b"".join(stream.decode(raw) + stream.flush()) == raw
    assert stream.blocks == {}


def test_past_the_bounds_the_rest_is_relayed_byte_for_byte() -> None:
    stream = ResponsesStreamFilter(max_event=2000)
    big = delta("<memory>" + "w" * 3000, 2)
    out = stream.decode(delta("Hello", 0) + delta(" ", 1) + big[:700])
    out += stream.decode(big[700:] + done("x", 3))
    assert stream.relaying
    assert b"".join(out).endswith(big + done("x", 3))
    assert deltas(out[:2]) == [(0, "Hello"), (1, " ")]  # the held space went out first, in its own event
    # Events waiting behind a held delta are bounded the same way.
    stream = ResponsesStreamFilter(max_event=2000)
    out = stream.decode(delta("Hi <memory>[", 0, index=0))
    filler = b"".join(sse([{"type": "response.reasoning_summary_text.delta", "delta": "x" * 100, "output_index": 1,
                            "sequence_number": n}]) for n in range(1, 30))
    out += stream.decode(filler)
    assert stream.relaying and b"".join(out).endswith(filler[-500:])
    assert deltas(out[:1]) == [(0, "Hi")]  # a block open at the cut is taken out, as at the end of a stream


# --- a whole response ------------------------------------------------------------------------------------------

def test_a_whole_response_loses_its_blocks_and_citations_follow_the_text() -> None:
    text = 'Porto it is <memory>[{"text": "§ User lives in Porto"}]</memory> see example.com.'
    cited = text.index("example.com.")
    out = Output(deltas=re.findall(r"\S+|\s+", text), reasoning="r", calls=[("f", "{}")],
                 citations=[(cited, cited + 12)], logprobs=True)
    body = response("resp_1", {"model": "m"}, items(out, "resp_1"), "completed")
    body["output_text"] = text  # some servers send the SDK's convenience field too
    filtered, blocks = filter_response(body)
    part = filtered["output"][1]["content"][0]
    assert part["text"] == "Porto it is see example.com." == filtered["output_text"]
    assert part["text"][part["annotations"][0]["start_index"]:part["annotations"][0]["end_index"]] == "example.com."
    assert [e["token"] for e in part["logprobs"]] == ["Porto", " ", "it", " ", "is", " ", "see", " ", "example.com."]
    assert blocks == {1: ['[{"text": "§ User lives in Porto"}]']}
    assert filtered["output"][0] is body["output"][0] and filtered["output"][2] is body["output"][2]
    assert {k: v for k, v in filtered.items() if k not in ("output", "output_text")} == {
        k: v for k, v in body.items() if k not in ("output", "output_text")}


def test_the_response_id_of_a_raw_answer() -> None:
    stream = sse(events(Output("Hi"), "resp_7", {"model": "m", "instructions": "x" * 40_000}))
    assert response_id(stream) == "resp_7"
    assert response_id(b": ping\n\n" + stream.replace(b"\n", b"\r\n")) == "resp_7"
    assert response_id(orjson.dumps(response("resp_8", {}, [], "completed"))) == "resp_8"
    assert response_id(b"") is None and response_id(b"{oops") is None and response_id(b"data: [DONE]\n\n") is None


def test_an_event_orjson_refuses_is_still_filtered() -> None:
    # Python's json.dumps writes -inf as -Infinity, and a lone surrogate as its escape: both are read and kept.
    raw = ('event: response.output_text.delta\ndata: {"type": "response.output_text.delta", "item_id": "msg_1", '
           '"output_index": 0, "content_index": 0, "delta": "Hi \\ud83d <memory>[\\"\u00a7\\"]</memory>", '
           '"logprobs": [{"token": "Hi", "logprob": -Infinity}], "sequence_number": 0}\n\n').encode()
    stream = ResponsesStreamFilter()
    out = b"".join(stream.decode(raw) + stream.flush())
    assert b"<memory>" not in out and b'"delta":"Hi \\ud83d"' in out
    assert stream.blocks == {0: ['["\u00a7"]']}


def test_a_broken_stream_releases_held_text_but_never_half_a_block() -> None:
    stream = ResponsesStreamFilter()
    out = stream.decode(delta("Hello ", 0)) + stream.decode(delta("<mem", 1))
    assert deltas(out + stream.flush(broken=True)) == [(0, "Hello"), (1, " <mem")]
    stream = ResponsesStreamFilter()
    out = stream.decode(delta("Hi", 0)) + stream.decode(delta(' <memory>[{"text": "User', 1))
    assert deltas(out + stream.flush(broken=True)) == [(0, "Hi"), (1, "")]
    assert stream.blocks == {}
