"""Pure and incremental: the `<memory>` block taken out of a streamed Responses API answer.

    ResponsesStreamFilter   the SSE of `POST /v1/responses` with `stream: true` → the same events without blocks
                            (a whole `response` object: proxy/responses_output.py)

The answer's text is in the `output_text` parts of `message` output items, and it appears in many places: the
`response.output_text.delta` events of a part (keyed by `output_index`/`content_index`), its
`response.output_text.done`, `response.content_part.added/done`, `response.output_item.added/done`, and the
`output` of the response in `response.created/in_progress/completed/incomplete/failed`. Each part's deltas go
through a BlockFilter of their own; every other place's text is filtered whole, which gives exactly what the
deltas delivered (the filter gives the same visible text however its input is split). Annotation indices and
logprobs follow the text. Reasoning, refusals, function calls, hosted tools, usage and errors are not touched.

No event is dropped, added or renumbered: `sequence_number` stays the upstream's (a client resuming a stream
with `starting_after` counts on it), so a delta whose text is all held back goes out with `"delta": ""`. Text the
filter releases only when its part ends needs a delta to go in, so a delta that leaves text undecided waits
(with the events behind it) for its part's next delta or its `output_text.done`, one event at most.

Past the bounds (one event over `max_event` characters, or that much waiting behind a held delta) the held
text goes out and the rest of the stream is relayed byte for byte (`.relaying`), as for chats.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from proxy import jsontext
from proxy.blocks import MAX_BLOCK, BlockFilter, Span
from proxy.logprobs import Logprobs
from proxy.responses_output import Key, Places, blocks_by_item, kept_logprobs, moved
from proxy.sse import MAX_EVENT, SSEDecoder, SSEEvent

ENDS_PART = ("response.output_text.done", "response.content_part.done")
ENDS_ITEM = ("response.output_item.done", "response.completed", "response.incomplete", "response.failed")


class _Part:
    """One output_text part being streamed: its filter, what it has let through, its pending delta."""

    def __init__(self, max_block: int) -> None:
        self.filter = BlockFilter(max_block)
        self.logprobs = Logprobs()
        self.spans: list[Span] = []  # merged: a few spans per block, however many deltas
        self.held: _Held | None = None

    def released(self) -> None:
        for start, end in self.filter.released:
            if self.spans and self.spans[-1][1] == start:
                self.spans[-1] = (self.spans[-1][0], end)
            else:
                self.spans.append((start, end))

    @property
    def decided(self) -> int:
        return self.filter.consumed - self.filter.undecided


class _Held:
    """A delta event on its way out; while its part has undecided text it waits, and text released later (when
    the part ends) is added to it."""

    def __init__(self, event: SSEEvent, data: dict[str, Any] | None, ready: bool, original: Any = None) -> None:
        self.event = event
        self.data = data  # None: the event goes out as it came
        self.original = original  # the event's data as read (`data` is a changed copy of it)
        self.ready = ready
        self.size = len(event.data or "")

    def add(self, text: str, logprobs: list[Any]) -> None:
        if text or logprobs:
            if self.original is None:
                self.original = jsontext.loads(self.event.data or "{}")
            data = self.data if self.data is not None else self.original
            self.data = {**data, "delta": data["delta"] + text}
            if isinstance(data.get("logprobs"), list):
                self.data["logprobs"] = data["logprobs"] + logprobs
        self.ready = True

    def encode(self) -> bytes:
        if self.data is None:
            return self.event.encode()
        data = jsontext.dumps_like(self.event.data or "", self.original, self.data).decode()
        return SSEEvent(data, self.event.event, self.event.id, self.event.retry).encode()


class ResponsesStreamFilter:
    """A Responses API SSE stream without its blocks: `decode(bytes) -> [SSE bytes]`, `flush() -> [SSE bytes]`,
    `.blocks` per output index, `.response_id` (from the first event that carries the response)."""

    def __init__(self, *, max_event: int = MAX_EVENT, max_block: int = MAX_BLOCK) -> None:
        self.relaying = False
        self.response_id: str | None = None
        self.max_event = max_event
        self._sse = SSEDecoder(max_event)
        self._places = Places(max_block)
        self._parts: dict[Key, _Part] = {}
        self._queue: deque[_Held] = deque()
        self._queued = 0  # characters waiting behind a held delta

    @property
    def blocks(self) -> dict[int, list[str]]:
        found = {**self._places.blocks, **{key: part.filter.blocks for key, part in self._parts.items()}}
        return blocks_by_item({key: bodies for key, bodies in found.items() if bodies})

    def decode(self, chunk: bytes) -> list[bytes]:
        if self.relaying:
            return [chunk] if chunk else []
        for event in self._sse.decode(chunk):
            self._event(event)
        if self._sse.overflowed or self._queued > self.max_event:
            return self._relay()
        return self._drain()

    def flush(self, *, broken: bool = False) -> list[bytes]:
        """The end of the stream: what is held goes out. `broken`: the upstream broke off (an event cut short is
        dropped, a block begun too; BlockFilter.flush)."""
        if self.relaying:
            return []
        for event in [] if broken else self._sse.flush():
            self._event(event)
        self._end_all(broken=broken)
        return self._drain()

    def _relay(self) -> list[bytes]:
        """Past the bounds: what is held goes out, then the rest as it comes."""
        self.relaying = True
        self._end_all()
        return [*self._drain(), self._sse.release()]

    def _end_all(self, *, broken: bool = False) -> None:
        for key in list(self._parts):
            self._end(key, broken=broken)

    def _drain(self) -> list[bytes]:
        out = []
        while self._queue and self._queue[0].ready:
            item = self._queue.popleft()
            self._queued -= item.size
            out.append(item.encode())
        return out

    def _send(self, event: SSEEvent, data: Any = None, *, ready: bool = True, original: Any = None) -> _Held:
        item = _Held(event, data, ready, original)
        self._queue.append(item)
        self._queued += item.size
        return item

    def _event(self, event: SSEEvent) -> None:
        try:
            data = jsontext.loads(event.data) if event.data else None
        except ValueError:
            data = None
        kind = data.get("type") if isinstance(data, dict) else None
        if not isinstance(data, dict) or not isinstance(kind, str):
            self._send(event)
            return
        key = (data.get("output_index"), data.get("content_index"))
        if kind == "response.output_text.delta" and isinstance(data.get("delta"), str):
            self._delta(event, data, key)
            return
        new: dict[str, Any] = data
        if kind in ENDS_PART:
            self._end(key)
        elif kind in ENDS_ITEM:
            for ended in [k for k in self._parts if k[0] == key[0] or kind != "response.output_item.done"]:
                self._end(ended)
        if kind == "response.output_text.done" and isinstance(data.get("text"), str):
            new = self._done(data, key)
        elif kind in ("response.content_part.added", "response.content_part.done") and "part" in data:
            new = self._changed(data, "part", self._places.part(key, data["part"]))
        elif kind in ("response.output_item.added", "response.output_item.done") and "item" in data:
            new = self._changed(data, "item", self._places.item(data.get("output_index"), data["item"]))
        elif kind == "response.output_text.annotation.added" and "annotation" in data:
            part = self._parts.get(key)
            if part is not None:
                new = self._changed(data, "annotation", moved(data["annotation"], part.spans, part.decided))
        elif isinstance(data.get("response"), dict):
            response = data["response"]
            if self.response_id is None and isinstance(response.get("id"), str):
                self.response_id = response["id"]
            new = self._changed(data, "response", self._places.response(response))
        self._send(event, None if new is data else new, original=data)

    @staticmethod
    def _changed(data: dict[str, Any], field: str, value: Any) -> dict[str, Any]:
        return data if value is data[field] else {**data, field: value}

    def _delta(self, event: SSEEvent, data: dict[str, Any], key: Key) -> None:
        part = self._parts.get(key)
        if part is None:
            part = self._parts[key] = _Part(self._places.max_block)
        if part.held is not None:  # the newer delta carries whatever the older one left undecided
            part.held.ready, part.held = True, None
        text: str = data["delta"]
        start = part.filter.consumed
        visible = part.filter.feed(text)
        part.released()
        entries = data.get("logprobs")
        kept = entries
        if isinstance(entries, list):
            part.logprobs.track(entries, text, start)
            kept = part.logprobs.settle(part.filter.released, part.decided)
        new = None
        if visible != text or kept != entries:
            new = {**data, "delta": visible, **({"logprobs": kept} if isinstance(entries, list) else {})}
        held = self._send(event, new, ready=not part.filter.undecided, original=data)
        if not held.ready:
            part.held = held

    def _end(self, key: Key, *, broken: bool = False) -> None:
        """The part's text is complete: what its filter held goes out in its last delta."""
        part = self._parts.get(key)
        if part is None:
            return
        visible = part.filter.flush(broken=broken)
        part.released()
        kept = part.logprobs.settle(part.filter.released, part.filter.consumed)
        if part.held is not None:
            part.held.add(visible, kept)
            part.held = None

    def _done(self, data: dict[str, Any], key: Key) -> dict[str, Any]:
        settled = self._places.text(key, data["text"])
        if settled.visible == settled.text:
            return data
        new = {**data, "text": settled.visible}
        if isinstance(data.get("logprobs"), list):
            new["logprobs"] = kept_logprobs(data["logprobs"], settled)
        return new
