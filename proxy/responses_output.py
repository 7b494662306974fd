"""Pure: the answer's text in a Responses API response object, wherever it appears.

    filter_response(body)      a whole `response` object → the same object without blocks, and the blocks
    Places                     each place of an `output_text` part's text (a part, an output item, a response's
                               `output`) filtered whole, annotation indices and logprobs following the text
    texts(output)              the output_text of every message item (what the SDK joins into `output_text`)
    response_id(raw)           the id a raw answer (a response object, or its stream) carries

Filtering a text whole gives exactly what a BlockFilter fed the same text in any pieces gives, so every place
agrees with what a stream's deltas delivered (proxy/responses_stream.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy import jsontext
from proxy.blocks import MAX_BLOCK, BlockFilter, Span
from proxy.logprobs import Logprobs
from proxy.sse import SSEDecoder

Key = tuple[Any, Any]  # (output_index, content_index)
POSITIONS = ("start_index", "end_index", "index")  # an annotation's character offsets into its part's text


@dataclass
class Settled:
    """One place's text, filtered whole: what is shown, the spans of `text` let through, the blocks."""

    text: str
    visible: str
    spans: list[Span]
    blocks: list[str]


def settle(text: str, max_block: int) -> Settled:
    if "<" not in text:  # no tag, no block: the text as it is
        return Settled(text, text, [(0, len(text))], [])
    blocks = BlockFilter(max_block)
    visible = blocks.feed(text)
    spans = list(blocks.released)
    visible += blocks.flush()
    return Settled(text, visible, spans + blocks.released, blocks.blocks)


def shift(position: int, spans: list[Span], decided: int) -> int:
    """Where the character at `position` of the text fed stands in the text shown: spans are what was let
    through; text past `decided` is not decided yet and counted as shown."""
    shown = sum(min(end, position) - start for start, end in spans if start < position)
    return shown + max(0, position - max(decided, spans[-1][1] if spans else 0))


def moved(annotation: Any, spans: list[Span], decided: int) -> Any:
    if not isinstance(annotation, dict):
        return annotation
    new = {key: shift(value, spans, decided) if key in POSITIONS and isinstance(value, int) else value
           for key, value in annotation.items()}
    return annotation if new == annotation else new


class Places:
    """Every place an output_text part's text appears, filtered whole, the same text the same way once."""

    def __init__(self, max_block: int) -> None:
        self.max_block = max_block
        self.blocks: dict[Key, list[str]] = {}  # found in places (parts whose deltas were never seen)
        self._last: dict[Key, Settled] = {}

    def part(self, key: Key, part: Any) -> Any:
        """An `output_text` content part with its text, annotations and logprobs filtered."""
        if not isinstance(part, dict) or part.get("type") != "output_text" or not isinstance(part.get("text"), str):
            return part
        settled = self.text(key, part["text"])
        if settled.visible == settled.text:
            return part
        new = {**part, "text": settled.visible}
        if isinstance(part.get("annotations"), list):
            new["annotations"] = [moved(a, settled.spans, len(settled.text)) for a in part["annotations"]]
        if isinstance(part.get("logprobs"), list):
            new["logprobs"] = kept_logprobs(part["logprobs"], settled)
        return new

    def text(self, key: Key, text: str) -> Settled:
        last = self._last.get(key)
        if last is None or last.text != text:
            last = self._last[key] = settle(text, self.max_block)
            if last.blocks:
                self.blocks[key] = last.blocks
        return last

    def item(self, index: Any, item: Any) -> Any:
        """An output item with its message parts filtered (any other kind of item as it is)."""
        if not isinstance(item, dict) or item.get("type") != "message" or not isinstance(item.get("content"), list):
            return item
        content = [self.part((index, c), part) for c, part in enumerate(item["content"])]
        if all(new is old for new, old in zip(content, item["content"], strict=True)):
            return item
        return {**item, "content": content}

    def response(self, response: Any) -> Any:
        """A response object with every output item filtered, and `output_text` if a server sends one."""
        if not isinstance(response, dict) or not isinstance(response.get("output"), list):
            return response
        output = [self.item(o, item) for o, item in enumerate(response["output"])]
        if all(new is old for new, old in zip(output, response["output"], strict=True)):
            return response
        new = {**response, "output": output}
        if isinstance(response.get("output_text"), str):
            joined = "".join(texts(response["output"]))
            new["output_text"] = ("".join(texts(output)) if joined == response["output_text"]
                                  else settle(response["output_text"], self.max_block).visible)
        return new


def texts(output: list[Any]) -> list[str]:
    """The output_text of every message item, in order (what the SDK joins into `output_text`)."""
    return [part["text"] for item in output if isinstance(item, dict) and item.get("type") == "message"
            for part in item.get("content") or () if isinstance(part, dict) and part.get("type") == "output_text"
            and isinstance(part.get("text"), str)]


def kept_logprobs(entries: list[Any], settled: Settled) -> list[Any]:
    tracker = Logprobs()
    tracker.track(entries, settled.text, 0)
    return tracker.settle(settled.spans, len(settled.text))


def filter_response(body: Any, max_block: int = MAX_BLOCK) -> tuple[Any, dict[int, list[str]]]:
    """A whole `response` object without blocks; the blocks per output index. `body` is not modified; it is
    returned as is when it held no block."""
    places = Places(max_block)
    filtered = places.response(body)
    return filtered, blocks_by_item(places.blocks)


def blocks_by_item(found: dict[Key, list[str]]) -> dict[int, list[str]]:
    """Block bodies per output index, in answer order (parts by content index); odd indices under -1."""
    def order(key: Key) -> tuple[tuple[int, int, str], ...]:
        return tuple((0, k, "") if isinstance(k, int) else (1, 0, repr(k)) for k in key)

    blocks: dict[int, list[str]] = {}
    for key in sorted(found, key=order):
        blocks.setdefault(key[0] if isinstance(key[0], int) else -1, []).extend(found[key])
    return blocks


def response_id(raw: bytes) -> str | None:
    """The id of the response a raw answer (a response object, or its stream) carries; None when none does. A
    stream is read only up to its first event that carries the response (`response.created`, normally first)."""
    if raw.lstrip()[:1] == b"{":
        try:
            body = jsontext.loads(raw)
        except ValueError:
            return None
        found = body.get("id") if isinstance(body, dict) else None
        return found if isinstance(found, str) else None
    decoder = SSEDecoder()
    for start in range(0, len(raw) + 1, 16 * 1024):
        last = start + 16 * 1024 >= len(raw)
        for event in decoder.decode(raw[start:start + 16 * 1024]) + (decoder.flush() if last else []):
            try:
                data = jsontext.loads(event.data or "")
            except ValueError:
                continue
            response = data.get("response") if isinstance(data, dict) else None
            if isinstance(response, dict) and isinstance(response.get("id"), str):
                return str(response["id"])
        if last:
            break
    return None
