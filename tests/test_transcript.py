"""Pure: the messages a turn adds, the answer the client saw, chunks, and the summary call."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from proxy import transcript
from proxy.store.sessions import Message, NewChunk
from proxy.transcript import CHUNK_LINE_CHARS, answer, chunk_ends, chunks, new_messages, summary_request, summary_text

BLOCK = '\n<memory>\n["User likes tea"]\n</memory>'


def msg(role: str, content: Any = "", **extra: Any) -> dict[str, Any]:
    return {"role": role, "content": content, **extra}


def test_new_messages_are_what_follows_the_last_answer_without_system_messages() -> None:
    sent = [msg("system", "rules"), msg("user", "a"), msg("assistant", "b"), msg("developer", "x"),
            msg("user", "c", name="al", refusal=None), msg("tool", "d", tool_call_id="t")]
    assert new_messages(sent, everything=False) == [msg("user", "c", name="al"), msg("tool", "d", tool_call_id="t")]
    assert new_messages(sent, everything=True) == [msg("user", "a"), msg("assistant", "b"),
                                                   msg("user", "c", name="al"), msg("tool", "d", tool_call_id="t")]
    junk = [msg("user", "only"), "junk", {"content": "no role"}]
    assert new_messages(junk, everything=False) == [msg("user", "only")]


def completion(content: str | None, **message: Any) -> bytes:
    return orjson.dumps({"object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": content, **message}, "finish_reason": "stop"},
        {"index": 1, "message": {"role": "assistant", "content": "the other choice"}, "finish_reason": "stop"}]})


def sse(*deltas: dict[str, Any], index: int = 0) -> bytes:
    events = [b"data: " + orjson.dumps({"object": "chat.completion.chunk",
                                        "choices": [{"index": index, "delta": d, "finish_reason": None}]})
              for d in deltas]
    return b"\n\n".join([*events, b"data: [DONE]"]) + b"\n\n"


def test_the_answer_is_the_first_choice_without_its_block() -> None:
    assert answer(completion("Tea it is." + BLOCK)) == msg("assistant", "Tea it is.")
    call = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    assert answer(completion(None, tool_calls=call)) == msg("assistant", None, tool_calls=call)
    assert answer(completion(BLOCK.strip())) is None  # nothing was seen
    assert answer(b"not json") is None and answer(b'{"error": {}}') is None and answer(b"[1]") is None


@pytest.mark.parametrize("cut", [1, 3, 7, 50])
def test_a_streamed_answer_reads_the_same_however_it_was_cut(cut: int) -> None:
    text = "Tea it is." + BLOCK
    raw = sse({"role": "assistant", "content": ""}, *({"content": text[i:i + cut]} for i in range(0, len(text), cut)))
    assert answer(raw) == msg("assistant", "Tea it is.")
    assert answer(raw.replace(b"\n\n", b"\r\n\r\n")) == msg("assistant", "Tea it is.")


def test_streamed_tool_calls_are_put_together() -> None:
    raw = sse({"role": "assistant", "content": None},
              {"tool_calls": [{"index": 0, "id": "c1", "type": "function",
                               "function": {"name": "wea", "arguments": ""}}]},
              {"tool_calls": [{"index": 0, "function": {"name": "ther", "arguments": '{"city":'}}]},
              {"tool_calls": [{"index": 1, "id": "c2", "function": {"name": "time", "arguments": "{}"}}]},
              {"tool_calls": [{"index": 0, "function": {"arguments": ' "Paris"}'}}]})
    assert answer(raw) == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}},
        {"id": "c2", "type": "function", "function": {"name": "time", "arguments": "{}"}}]}
    assert answer(sse({"content": "other choice"}, index=1)) is None


def stored(n: int, start: int = 1) -> list[Message]:
    return [Message(seq, msg("user" if seq % 2 else "assistant", f"message {seq}"), 5, 0.0)
            for seq in range(start, start + n)]


def test_chunks_overlap_by_a_turn_and_end_at_the_newest_message() -> None:
    assert chunk_ends(0, 2) == [2] and chunk_ends(2, 4) == [4] and chunk_ends(0, 5) == [2, 4, 5]
    assert chunk_ends(4, 4) == [] and chunk_ends(4, 5) == [5]
    assert chunks(stored(2), 0) == [NewChunk(1, 2, "user: message 1\nassistant: message 2")]
    assert [(c.first_seq, c.last_seq) for c in chunks(stored(6), 2)] == [(1, 4), (3, 6)]
    assert [(c.first_seq, c.last_seq) for c in chunks(stored(3, start=5), 6)] == [(5, 7)]  # older ones are gone


def test_chunk_lines_are_cut_and_name_tool_calls() -> None:
    long = Message(1, msg("user", "word " * 200), 5, 0.0)
    call = Message(2, msg("assistant", None, tool_calls=[{"function": {"name": "search"}}]), 5, 0.0)
    [chunk] = chunks([long, call], 0)
    first, second = chunk.text.split("\n")
    assert len(first) == len("user: ") + CHUNK_LINE_CHARS and first.endswith("…")
    assert second == "assistant: [calls search]"


def test_the_summary_call_extends_the_summary_so_far() -> None:
    request = summary_request("cheap", "The user is Ann.", [msg("user", "I moved to Porto"), msg("assistant", "Nice!")])
    assert request["model"] == "cheap" and request["stream"] is False
    system, user = request["messages"]
    assert system["content"] == transcript.SUMMARY_INSTRUCTION
    assert user["content"] == ("Summary so far:\nThe user is Ann.\n\n"
                               "New messages:\nuser: I moved to Porto\nassistant: Nice!")
    assert "(none yet)" in summary_request("cheap", "", [])["messages"][1]["content"]
    assert summary_text(completion("Ann  lives\nin Porto." + BLOCK)) == "Ann lives in Porto."
    assert summary_text(completion("x" * 10_000)) == "x" * transcript.SUMMARY_MAX_CHARS
    assert summary_text(b"oops") == ""
