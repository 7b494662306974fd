"""Transport level: what the client gets is the upstream's answer as the upstream wrote it, minus a real block.

The fake upstream sends bytes orjson would never write but real servers do (Python's json.dumps writes
`-Infinity` and escapes lone surrogates; `1E2` and integers past 64 bits are valid JSON), text that only looks like
a block, Mistral's content parts, and a stream that breaks off. Every input here was reported from outside.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.conftest import FakeUpstream
from tests.fakeupstream import Reply
from tests.test_chat import Upstream, memories

BLOCK = '<memory>[{\\"text\\": \\"User likes §\\"}]</memory>'


@pytest.fixture
def fake(upstream: Upstream) -> FakeUpstream:
    return upstream[0]


def post(proxy: str, user: str, stream: bool = False) -> httpx.Response:
    body = {"model": "m", "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
    return httpx.post(f"{proxy}/v1/chat/completions", json=body, headers={"X-Memory-User": user}, timeout=30)


def completion(content: str, head: str = '"id":"c"') -> bytes:
    return ('{' + head + ',"object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant",'
            '"content":' + content + '},"finish_reason":"stop"}]}').encode()


def events(*datas: str) -> list[bytes]:
    return [f"data: {data}\n\n".encode() for data in datas] + [b"data: [DONE]\n\n"]


def chunk(content: str, extra: str = "") -> str:
    return '{"id":"c","object":"chat.completion.chunk"' + extra + ',"choices":[{"index":0,"delta":{"content":' \
        + content + '}' + ',"finish_reason":null}]}'


def streamed_text(response: httpx.Response) -> str:
    text = []
    for line in response.text.splitlines():
        if line.startswith("data: ") and line[6:] != "[DONE]":
            data = json.loads(line[6:])
            for choice in data.get("choices", []):
                content = (choice.get("delta") or {}).get("content")
                text.append(content if isinstance(content, str) else "")
    return "".join(text)


@pytest.mark.parametrize(("name", "head", "kept"), [
    ("a big integer", '"id":"c","created":18446744073709551616', b'"created":18446744073709551616'),
    ("number tokens", '"id":"c","x":0.1000000000000000055511151231257827,"y":1E2,"z":-0',
     b'"x":0.1000000000000000055511151231257827,"y":1E2,"z":-0'),
    ("NaN", '"id":"c","score":NaN', b'"score":NaN'),
])
def test_a_rewritten_answer_keeps_the_number_tokens(proxy: str, fake: FakeUpstream, name: str, head: str,
                                                     kept: bytes) -> None:
    fake.reply(Reply(raw=completion('"Hi ' + BLOCK + '"', head)))
    response = post(proxy, "num")
    assert kept in response.content, name
    assert b"<memory>" not in response.content
    assert memories(proxy, "num", expect=1) == ["User likes §"]


def test_a_lone_surrogate_is_read_and_kept_as_its_escape(proxy: str, fake: FakeUpstream) -> None:
    fake.reply(Reply(raw=completion('"Hi \\ud83d ' + BLOCK + '"')))
    response = post(proxy, "lone")
    assert b"<memory>" not in response.content
    assert b'"content":"Hi \\ud83d"' in response.content
    assert json.loads(response.content)["choices"][0]["message"]["content"] == "Hi \ud83d"
    assert memories(proxy, "lone", expect=1) == ["User likes §"]


def test_an_answer_with_nothing_taken_out_is_the_upstreams_bytes(proxy: str, fake: FakeUpstream) -> None:
    raw = completion('"Hi \\ud83d, 1E2"', '"id":"c","created":18446744073709551616,"x":-Infinity')
    fake.reply(Reply(raw=raw))
    assert post(proxy, "same").content == raw


def test_a_chat_event_with_minus_infinity_is_filtered(proxy: str, fake: FakeUpstream) -> None:
    block = json.loads('"' + BLOCK + '"')
    tokens = [{"token": "Hi", "logprob": "LP", "top_logprobs": []}, {"token": " " + block, "logprob": -0.5}]
    data = json.dumps({"id": "c", "object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": {"content": "Hi " + block}, "logprobs": {"content": tokens}, "finish_reason": None}]})
    fake.reply(Reply(raw=events(data.replace('"LP"', "-Infinity"))))  # as Python's json.dumps writes -inf
    response = post(proxy, "inf", stream=True)
    assert "<memory>" not in response.text and '"logprob":-Infinity' in response.text
    assert streamed_text(response) == "Hi"
    assert memories(proxy, "inf", expect=1) == ["User likes §"]


def test_a_surrogate_pair_split_across_events(proxy: str, fake: FakeUpstream) -> None:
    fake.reply(Reply(raw=events(chunk('"Hi \\ud83d"'), chunk('"\\ude00 ' + BLOCK + '"'))))
    response = post(proxy, "pair", stream=True)
    assert "<memory>" not in response.text
    assert streamed_text(response) == "Hi \ud83d\ude00"  # the halves a JavaScript client joins into one emoji
    assert '"content":"\\ude00"' in response.text
    assert memories(proxy, "pair", expect=1) == ["User likes §"]


def test_a_rewritten_event_keeps_the_number_tokens(proxy: str, fake: FakeUpstream) -> None:
    fake.reply(Reply(raw=events(chunk('"Hi ' + BLOCK + '"', ',"created":18446744073709551616,"t":1E2'))))
    response = post(proxy, "evnum", stream=True)
    assert '"created":18446744073709551616,"t":1E2' in response.text and "<memory>" not in response.text


ANSWERS_THAT_ONLY_LOOK_LIKE_BLOCKS = [
    "The tag looks like <memory>[ ... ]</memory> in the docs.",
    "Array literal: <memory>[1, 2, 3]</memory> is how the config lists slots.",
    '{"a": "<memory>[1]</memory>"}',
    "Templates: {{<memory>}} and <memory>{name}</memory> are placeholders; fill them in.",
    "Empty object: <memory>{}</memory>, and numbers <memory>[1.5, true, null]</memory>.",
]


@pytest.mark.parametrize("answer", ANSWERS_THAT_ONLY_LOOK_LIKE_BLOCKS)
@pytest.mark.parametrize("stream", [False, True])
def test_text_that_is_no_memory_payload_reaches_the_client(proxy: str, fake: FakeUpstream, answer: str,
                                                           stream: bool) -> None:
    fake.reply(Reply(answer, chunk_size=1))
    response = post(proxy, "docs", stream)
    got = streamed_text(response) if stream else response.json()["choices"][0]["message"]["content"]
    assert got == answer


@pytest.mark.parametrize("pieces", [["Hello ", "<mem"], ["Hello", " \n "], ["Hi ```json\n"]])
def test_held_text_reaches_the_client_before_a_broken_stream_ends(proxy: str, fake: FakeUpstream,
                                                                 pieces: list[str]) -> None:
    fake.reply(Reply(raw=[f"data: {chunk(json.dumps(p))}\n\n".encode() for p in pieces] + [b"never sent"],
                     drop_after=len(pieces)))
    response = post(proxy, "cut", stream=True)
    assert streamed_text(response) == "".join(pieces)
    assert '"code":"upstream_disconnected"' in response.text.replace(" ", "")


def test_mistral_content_parts_are_filtered(proxy: str, fake: FakeUpstream) -> None:
    thinking = {"type": "thinking", "thinking": [{"type": "text", "text": "Note it: <memory>[\"x\"]</memory>"}]}
    message: dict[str, Any] = {"role": "assistant", "content": [thinking, {"type": "text", "text": "Hi <memory>"},
                                                                {"type": "text", "text": BLOCK[8:].replace("\\", "")}]}
    body = {"id": "c", "object": "chat.completion", "choices": [{"index": 0, "message": message,
                                                                 "finish_reason": "stop"}]}
    fake.reply(Reply(raw=json.dumps(body).encode()))
    got = post(proxy, "mistral").json()["choices"][0]["message"]["content"]
    assert got == [thinking, {"type": "text", "text": "Hi"}, {"type": "text", "text": ""}]
    assert memories(proxy, "mistral", expect=1) == ["User likes §"]


def test_mistral_streamed_parts_are_filtered(proxy: str, fake: FakeUpstream) -> None:
    parts = [[{"type": "thinking", "thinking": [{"type": "text", "text": "hm"}]}],
             [{"type": "text", "text": "Hi <mem"}], [{"type": "text", "text": 'ory>["User likes §"]</memory>'}]]
    fake.reply(Reply(raw=events(*(chunk(json.dumps(p)) for p in parts))))
    response = post(proxy, "mistral-stream", stream=True)
    assert "<mem" not in response.text and "hm" in response.text
    texts = [p["text"] for line in response.text.splitlines() if line.startswith("data: {")
             for c in json.loads(line[6:])["choices"] for p in c["delta"].get("content") or []
             if p.get("type") == "text"]
    assert "".join(texts) == "Hi"
    assert memories(proxy, "mistral-stream", expect=1) == ["User likes §"]
