"""Pure: an assistant `content` given as a list of parts loses its blocks whatever shape its text parts take
(Mistral writes `{"type": "text"}`; other servers omit the type, capitalise it, or put plain strings in the list),
and only its text parts: thinking, images and references pass as they came."""

from __future__ import annotations

import json
from typing import Any

import pytest

from proxy.stream import ChatStreamFilter, filter_completion

BLOCK = '<memory>[{"text": "User owns a red bike"}]</memory>'
THINKING = {"type": "thinking", "thinking": [{"type": "text", "text": "I could write " + BLOCK}]}
IMAGE = {"type": "image_url", "image_url": {"url": "data:,"}, "text": "alt " + BLOCK}  # not a text part


@pytest.mark.parametrize(("part", "shown"), [
    ({"type": "text", "text": "Hi " + BLOCK}, {"type": "text", "text": "Hi"}),
    ({"text": "Hi " + BLOCK}, {"text": "Hi"}),
    ({"type": "TEXT", "text": "Hi " + BLOCK}, {"type": "TEXT", "text": "Hi"}),
    ({"type": "output_text", "text": "Hi " + BLOCK, "annotations": []},
     {"type": "output_text", "text": "Hi", "annotations": []}),
    ("Hi " + BLOCK, "Hi"),
])
def test_every_shape_of_text_part_loses_its_block(part: Any, shown: Any) -> None:
    body = {"choices": [{"index": 0, "message": {"role": "assistant", "content": [THINKING, part, IMAGE]}}]}
    filtered, blocks = filter_completion(body)
    assert filtered["choices"][0]["message"]["content"] == [THINKING, shown, IMAGE]
    assert [b.strip() for b in blocks[0]] == [BLOCK[8:-9]]


@pytest.mark.parametrize("part", [{"text": "Hi <mem"}, "Hi <mem", {"type": "Text", "text": "Hi <mem"}])
def test_streamed_parts_of_any_text_shape_are_filtered(part: Any) -> None:
    rest = 'ory>[{"text": "User owns a red bike"}]</memory> bye' if isinstance(part, str) else \
        {**part, "text": 'ory>[{"text": "User owns a red bike"}]</memory> bye'}
    stream = ChatStreamFilter()
    out = b""
    for content in ([part], [rest]):
        event = json.dumps({"id": "c", "choices": [{"index": 0, "delta": {"content": content}}]})
        out += b"".join(stream.decode(f"data: {event}\n\n".encode()))
    out += b"".join(stream.decode(b"data: [DONE]\n\n")) + b"".join(stream.flush())
    assert b"<mem" not in out and b"red bike" not in out and b"bye" in out
    assert len(stream.blocks[0]) == 1
