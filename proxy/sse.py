"""Pure and incremental: server-sent events (the WHATWG event-stream format) decoded from bytes split anywhere.

    SSEEvent     one event (or comment line), and its encoding back to bytes
    SSEDecoder   `decode(bytes) -> [SSEEvent]`, `flush() -> [SSEEvent]`, with a bound on one event's size

A peer decides how long an event is. Past `max_event` characters in one event (its data lines and the line
still coming), the decoder stops decoding: `overflowed` turns true and `spill()` hands back the event read so
far, as bytes, so the caller can relay the rest of the stream as it comes instead of buffering it.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

LINE_END = re.compile(r"\r\n|\r|\n")
MAX_EVENT = 16 * 1024 * 1024  # characters; a chat chunk is a few hundred, a Responses `completed` event more


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One event, or one comment line (`comment` set, nothing else). `data` is None when no data line came."""

    data: str | None = None
    event: str | None = None
    id: str | None = None
    retry: int | None = None
    comment: str | None = None

    def encode(self) -> bytes:
        if self.comment is None and self.event is None and self.id is None and self.retry is None \
                and self.data is not None and "\n" not in self.data and "\r" not in self.data:
            return f"data: {self.data}\n\n".encode()  # nearly every event of a chat stream
        lines = self.lines()
        return ("\n".join(lines) + "\n\n").encode() if lines else b""

    def lines(self) -> list[str]:
        """The event's lines on the wire, without their line ends."""
        lines = []
        if self.comment is not None:
            lines += [f": {line}" if line else ":" for line in LINE_END.split(self.comment)]
        if self.event is not None:
            lines.append(f"event: {self.event}")
        if self.id is not None:
            lines.append(f"id: {self.id}")
        if self.retry is not None:
            lines.append(f"retry: {self.retry}")
        if self.data is not None:
            lines += [f"data: {line}" for line in LINE_END.split(self.data)]
        return lines


class SSEDecoder:
    """`decode(bytes) -> events`, `flush() -> events`. Lenient at the very end only: an event the stream ends
    without its blank line is still delivered by flush() rather than lost."""

    def __init__(self, max_event: int = MAX_EVENT) -> None:
        self.max_event = max_event
        self.overflowed = False
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._started = False  # a BOM is dropped only at the very start
        self._after_cr = False  # a LF right after a CR ends no second line, even in the next read
        self._partial: list[str] = []
        self._partial_size = 0
        self._data: list[str] = []
        self._size = 0  # characters in the event being read: its data lines and the partial line
        self._event: str | None = None
        self._id: str | None = None
        self._retry: int | None = None
        self._spill: list[str] = []

    def decode(self, chunk: bytes) -> list[SSEEvent]:
        if self.overflowed:
            raise RuntimeError("the decoder overflowed: relay the rest of the stream as it comes")
        return self._feed(self._utf8.decode(chunk))

    def flush(self) -> list[SSEEvent]:
        if self.overflowed:
            return []
        events = self._feed(self._utf8.decode(b"", final=True))
        if self._partial and not self.overflowed:
            self._line("".join(self._partial), events)
            self._partial.clear()
        self._dispatch(events)
        return events

    def release(self) -> bytes:
        """Stop decoding now (the caller relays the rest as it comes): the bytes taken in but not yet decoded
        into whole events, as spill() gives them after an overflow."""
        if not self.overflowed:
            partial = "".join(self._partial)
            self._partial.clear()
            self._overflow(partial, repeats_last_line=False)
        return self.spill()

    def spill(self) -> bytes:
        """After an overflow: the event being read (its lines so far) and the undecoded rest of the last chunk."""
        pending = self._utf8.getstate()[0]
        self._utf8.reset()
        text, self._spill = "".join(self._spill), []
        return text.encode() + pending

    def _feed(self, text: str) -> list[SSEEvent]:
        events: list[SSEEvent] = []
        if not text:
            return events
        if not self._started:
            self._started = True
            text = text.removeprefix("\ufeff")
        if self._after_cr and text.startswith("\n"):
            text = text[1:]
        self._after_cr = False
        start = 0
        for match in LINE_END.finditer(text):
            line = text[start:match.start()]
            if self._partial:
                line = "".join(self._partial) + line
                self._partial.clear()
                self._partial_size = 0
            self._line(line, events)
            start = match.end()
            if self._size > self.max_event:
                self._overflow(line + text[match.start():], repeats_last_line=True)
                return events
        if start < len(text):
            self._partial.append(text[start:])
            self._partial_size += len(text) - start
            if self._size + self._partial_size > self.max_event:
                partial = "".join(self._partial)
                self._partial.clear()
                self._overflow(partial, repeats_last_line=False)
        elif text.endswith("\r"):
            self._after_cr = True
        return events

    def _overflow(self, rest: str, *, repeats_last_line: bool) -> None:
        """Stop decoding: keep the event read so far, in its wire form, followed by `rest` (the text not yet
        decoded into lines), for spill(). With `repeats_last_line`, `rest` starts with the line decoded last."""
        self.overflowed = True
        data = self._data[:-1] if repeats_last_line else self._data
        head = SSEEvent(None, self._event, self._id, self._retry).lines() + [f"data: {line}" for line in data]
        self._spill = [line + "\n" for line in head] + [rest]
        self._data, self._size = [], 0

    def _line(self, line: str, events: list[SSEEvent]) -> None:
        if not line:
            self._dispatch(events)
            return
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if not name:
            events.append(SSEEvent(comment=value))  # at once: keep-alives must not wait for the next event
        elif name == "data":
            self._data.append(value)
            self._size += len(value) + 1
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self._retry = int(value)

    def _dispatch(self, events: list[SSEEvent]) -> None:
        # Unlike a browser, a proxy keeps events without data: their id or retry still matter to the client.
        if self._data or self._event is not None or self._id is not None or self._retry is not None:
            events.append(SSEEvent("\n".join(self._data) if self._data else None, self._event, self._id, self._retry))
        self._data, self._size, self._event, self._id, self._retry = [], 0, None, None, None
