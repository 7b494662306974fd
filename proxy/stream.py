"""Pure and incremental: the `<memory>` block taken out of answers, whole or streamed, split at any byte.

    SSEDecoder         bytes → SSEEvent, by the WHATWG event-stream rules
    BlockFilter        text → visible text; holds back only what could still start an opening tag
    ChatStreamFilter   an OpenAI chat.completion.chunk stream → the same stream without blocks, per choice
    filter_completion  a whole chat.completion body → the same body without blocks

Both paths use the same BlockFilter, so a streamed answer and a whole one come out exactly alike.
"""

from __future__ import annotations

import codecs
import re
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.extract import CLOSE_TAG, CLOSE_TAG_MAX, OPEN_TAG, OPEN_TAG_MAX, OPEN_TAG_START

Span = tuple[int, int]
LINE_END = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One event, or one comment line (`comment` set, nothing else). `data` is None when no data line came."""

    data: str | None = None
    event: str | None = None
    id: str | None = None
    retry: int | None = None
    comment: str | None = None

    def encode(self) -> bytes:
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
        return ("\n".join(lines) + "\n\n").encode() if lines else b""


class SSEDecoder:
    """`decode(bytes) -> events`, `flush() -> events`. Lenient at the very end only: an event the stream ends
    without its blank line is still delivered by flush() rather than lost."""

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._started = False  # a BOM is dropped only at the very start
        self._after_cr = False  # a LF right after a CR ends no second line, even in the next read
        self._partial: list[str] = []
        self._data: list[str] = []
        self._event: str | None = None
        self._id: str | None = None
        self._retry: int | None = None

    def decode(self, chunk: bytes) -> list[SSEEvent]:
        return self._feed(self._utf8.decode(chunk))

    def flush(self) -> list[SSEEvent]:
        events = self._feed(self._utf8.decode(b"", final=True))
        if self._partial:
            self._line("".join(self._partial), events)
            self._partial.clear()
        self._dispatch(events)
        return events

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
            self._line(line, events)
            start = match.end()
        if start < len(text):
            self._partial.append(text[start:])
        elif text.endswith("\r"):
            self._after_cr = True
        return events

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
        self._data, self._event, self._id, self._retry = [], None, None, None


class BlockFilter:
    """`feed(text) -> visible`, `flush() -> visible`; `.blocks` holds the bodies taken out.

    Every character goes out at once except what could still start an opening tag: at most that partial tag
    plus the whitespace run before it (whitespace right before a block is removed with it). `.released` lists
    the input spans, as offsets into everything fed, that the last call let through.
    """

    def __init__(self) -> None:
        self.blocks: list[str] = []
        self.unclosed = False
        self.consumed = 0
        self.released: list[Span] = []
        self._held = ""
        self._inside = False
        self._body: list[str] = []
        self._tail = ""  # the end of the body, where a closing tag split across reads begins

    @property
    def held(self) -> str:
        """The text held back: it could still be the start of a block."""
        return self._held

    @property
    def inside(self) -> bool:
        return self._inside

    def feed(self, text: str) -> str:
        base = self.consumed - len(self._held)  # where `buffer` starts in everything fed
        self.consumed += len(text)
        self.released = []
        buffer, self._held = self._held + text, ""
        visible: list[str] = []
        position = 0
        while position < len(buffer):
            if self._inside:
                position = self._swallow(buffer, position)
                continue
            tag = OPEN_TAG.search(buffer, position)
            if tag:
                self._release(buffer, position, _before_space(buffer, position, tag.start()), base, visible)
                self._inside = True
                position = tag.end()
                continue
            keep = _before_space(buffer, position, _tag_start(buffer, position))
            self._release(buffer, position, keep, base, visible)
            self._held = buffer[keep:]
            break
        return "".join(visible)

    def flush(self) -> str:
        """End of text: held text is released, an unclosed block is captured (and never shown)."""
        self.released = []
        visible = self._held
        if visible:
            self.released.append((self.consumed - len(visible), self.consumed))
        elif self._inside:
            self.blocks.append("".join(self._body))
            self.unclosed = True
        self._held, self._inside, self._body, self._tail = "", False, [], ""
        return visible

    def _release(self, buffer: str, start: int, end: int, base: int, visible: list[str]) -> None:
        if end > start:
            visible.append(buffer[start:end])
            self.released.append((base + start, base + end))

    def _swallow(self, buffer: str, position: int) -> int:
        """Take block text up to and including the closing tag; returns where visible text resumes."""
        window = self._tail + buffer[position:]
        close = CLOSE_TAG.search(window)
        if close is None:
            self._body.append(buffer[position:])
            self._tail = window[-(CLOSE_TAG_MAX - 1):]
            return len(buffer)
        carried = len(self._tail)  # the tail is the end of the body already kept, seen again
        body = "".join(self._body) + buffer[position:]
        self.blocks.append(body[:len(body) - len(window) + close.start()])
        self._inside, self._body, self._tail = False, [], ""
        return position + close.end() - carried


def _tag_start(buffer: str, position: int) -> int:
    """Where the unfinished opening tag at the end of `buffer` begins, or len(buffer) if there is none."""
    start = buffer.rfind("<", max(position, len(buffer) - OPEN_TAG_MAX))
    return start if start >= 0 and OPEN_TAG_START.fullmatch(buffer, start) else len(buffer)


def _before_space(buffer: str, position: int, end: int) -> int:
    while end > position and buffer[end - 1].isspace():
        end -= 1
    return end


class ChatStreamFilter:
    """An OpenAI `chat.completion.chunk` SSE stream without its blocks: `decode(bytes) -> [SSE bytes]`,
    `flush() -> [SSE bytes]`, `.blocks` per choice index, `.saw_done`.

    Only `delta.content` changes (per choice, through that choice's BlockFilter). Events needing no change go
    out as they came; a chunk left with nothing but swallowed content is dropped; text held back for a choice
    comes out in its finish_reason chunk, or in a chunk of its own at [DONE] or flush().
    """

    def __init__(self) -> None:
        self.saw_done = False
        self._sse = SSEDecoder()
        self._choices: dict[int, _Choice] = {}
        self._last: dict[str, Any] = {}  # the last chunk's id, object, created, model: for chunks of our own

    @property
    def blocks(self) -> dict[int, list[str]]:
        """The block bodies seen so far per choice index; one still open is added by flush() (or [DONE])."""
        return {index: list(state.filter.blocks) for index, state in sorted(self._choices.items())
                if state.filter.blocks}

    def decode(self, chunk: bytes) -> list[bytes]:
        return self._send(self._sse.decode(chunk))

    def flush(self) -> list[bytes]:
        return self._send(self._sse.flush()) + self._release_all()

    def _send(self, events: list[SSEEvent]) -> list[bytes]:
        out: list[bytes] = []
        for event in events:
            if event.data is None or self.saw_done:
                out.append(event.encode())
            elif event.data.strip() == "[DONE]":
                out += self._release_all()
                self.saw_done = True
                out.append(event.encode())
            else:
                out += self._chunk(event, event.data)
        return out

    def _chunk(self, event: SSEEvent, data: str) -> list[bytes]:
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            return [event.encode()]
        if not isinstance(chunk, dict) or not isinstance(chunk.get("choices"), list):
            return [event.encode()]
        self._last = {key: chunk[key] for key in TEMPLATE_KEYS if key in chunk}
        filtered = [self._choice(choice, position) for position, choice in enumerate(chunk["choices"])]
        if all(new is old for new, old in zip(filtered, chunk["choices"], strict=True)):
            return [event.encode()]
        choices = [new for new, old in zip(filtered, chunk["choices"], strict=True) if new is old or _meaningful(new)]
        if not any(_meaningful(choice) for choice in choices) and chunk.get("usage") is None:
            return []
        data = orjson.dumps({**chunk, "choices": choices}).decode()
        return [SSEEvent(data, event.event, event.id, event.retry).encode()]

    def _choice(self, choice: Any, position: int) -> Any:
        """The choice with its content filtered, or the very same object when nothing had to change."""
        if not isinstance(choice, dict):
            return choice
        index = choice.get("index")
        delta = choice.get("delta")
        content = delta.get("content") if isinstance(delta, dict) else None
        finishing = choice.get("finish_reason") is not None
        if not isinstance(content, str) and not finishing:
            return choice
        # An odd index still gets a filter of its own: content is never let through unfiltered.
        state = self._choices.setdefault(index if isinstance(index, int) else position, _Choice())
        text = content if isinstance(content, str) else ""
        untouched = not state.filter.held and not state.logprobs
        start = state.filter.consumed
        visible = state.filter.feed(text)
        released = state.filter.released
        if finishing:
            visible += state.filter.flush()
            released = released + state.filter.released
        if untouched and visible == text:
            return choice
        logprobs = choice.get("logprobs")
        entries = logprobs.get("content") if isinstance(logprobs, dict) else None
        if isinstance(entries, list):
            state.logprobs.track(entries, text, start)
        kept = state.logprobs.settle(released, state.filter.consumed - len(state.filter.held))
        new = dict(choice)
        if isinstance(content, str) or visible:
            new["delta"] = {**delta, "content": visible} if isinstance(delta, dict) else {"content": visible}
        if isinstance(entries, list) or kept:
            new["logprobs"] = {**logprobs, "content": kept} if isinstance(logprobs, dict) else {"content": kept}
        return new

    def _release_all(self) -> list[bytes]:
        """The text every choice still holds back, each in a chunk of its own (the stream is ending)."""
        out = []
        for index, state in sorted(self._choices.items()):
            visible = state.filter.flush()
            kept = state.logprobs.settle(state.filter.released, state.filter.consumed)
            if visible:
                choice = {"index": index, "delta": {"content": visible},
                          "logprobs": {"content": kept} if kept else None, "finish_reason": None}
                chunk = {"object": "chat.completion.chunk", **self._last, "choices": [choice]}
                out.append(SSEEvent(orjson.dumps(chunk).decode()).encode())
        return out


TEMPLATE_KEYS = ("id", "object", "created", "model", "system_fingerprint")
EMPTY: tuple[Any, ...] = (None, "", [], {})


class _Choice:
    def __init__(self) -> None:
        self.filter = BlockFilter()
        self.logprobs = _Logprobs()


def _meaningful(choice: Any) -> bool:
    """Whether a filtered choice still carries anything: text, a role, tool calls, a finish reason..."""
    if not isinstance(choice, dict):
        return True
    delta = choice.get("delta")
    if isinstance(delta, dict) and any(value not in EMPTY for value in delta.values()):
        return True
    logprobs = choice.get("logprobs")
    if isinstance(logprobs, dict) and any(value not in EMPTY for value in logprobs.values()):
        return True
    return any(value not in EMPTY for key, value in choice.items() if key not in ("index", "delta", "logprobs"))


def filter_completion(body: dict[str, Any]) -> tuple[dict[str, Any], dict[int, list[str]]]:
    """A whole `chat.completion` without blocks (and the whitespace before them), logprobs trimmed alike; the
    blocks per choice index. `body` is not modified; it is returned as is when it held no block."""
    choices = body.get("choices")
    if not isinstance(choices, list):
        return body, {}
    blocks: dict[int, list[str]] = {}
    filtered = []
    for position, choice in enumerate(choices):
        message = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            filtered.append(choice)
            continue
        content: str = message["content"]
        text_filter = BlockFilter()
        visible = text_filter.feed(content)
        released = text_filter.released
        visible += text_filter.flush()
        if text_filter.blocks:
            index = choice.get("index", position)
            blocks[index if isinstance(index, int) else position] = text_filter.blocks
        if visible == content:
            filtered.append(choice)
            continue
        new = {**choice, "message": {**message, "content": visible}}
        logprobs = choice.get("logprobs")
        if isinstance(logprobs, dict) and isinstance(logprobs.get("content"), list):
            tracker = _Logprobs()
            tracker.track(logprobs["content"], content, 0)
            new["logprobs"] = {**logprobs, "content": tracker.settle(released + text_filter.released, len(content))}
        filtered.append(new)
    if all(new is old for new, old in zip(filtered, choices, strict=True)):
        return body, blocks
    return {**body, "choices": filtered}, blocks


class _Logprobs:
    """Keeps a `logprobs.content` entry only when every character of its token came out visible.

    Entries are placed on the text by their tokens, or by their UTF-8 `bytes` when the tokens do not spell the
    text; when neither fits, each entry is taken to cover its whole chunk (so any cut drops them all). An entry
    waits while any of its characters is held back, then goes out with the chunk that decides it.
    """

    def __init__(self) -> None:
        self._pending: list[list[Any]] = []  # [start, end, characters shown, entry], in text order

    def __bool__(self) -> bool:
        return bool(self._pending)

    def track(self, entries: list[Any], text: str, start: int) -> None:
        for (begin, end), entry in zip(_token_spans(entries, text), entries, strict=True):
            self._pending.append([start + begin, start + end, 0, entry])

    def settle(self, released: list[Span], decided: int) -> list[Any]:
        """Counts the characters just released; returns the entries now decided (all of their text is before
        `decided`) and wholly shown."""
        for item in self._pending:
            for begin, end in released:
                item[2] += max(0, min(end, item[1]) - max(begin, item[0]))
        kept = []
        while self._pending and self._pending[0][1] <= decided:
            begin, end, shown, entry = self._pending.pop(0)
            if shown == end - begin:
                kept.append(entry)
        return kept


def _token_spans(entries: list[Any], text: str) -> list[Span]:
    tokens = [entry.get("token") if isinstance(entry, dict) else None for entry in entries]
    if all(isinstance(token, str) for token in tokens) and "".join(map(str, tokens)) == text:
        lengths = [len(str(token)) for token in tokens]
        return list(zip(_running(lengths, 0), _running(lengths, 1), strict=True))
    byte_lengths = [len(entry["bytes"]) for entry in entries
                    if isinstance(entry, dict) and isinstance(entry.get("bytes"), list)]
    if len(byte_lengths) == len(entries):
        char_starts = list(_running([len(char.encode()) for char in text], 1))
        char_starts.insert(0, 0)
        if char_starts[-1] == sum(byte_lengths):
            return [(bisect_right(char_starts, begin) - 1, bisect_left(char_starts, end))
                    for begin, end in zip(_running(byte_lengths, 0), _running(byte_lengths, 1), strict=True)]
    return [(0, len(text))] * len(entries)


def _running(lengths: list[int], include_self: int) -> list[int]:
    """Offsets where each piece starts (include_self=0) or ends (include_self=1)."""
    offsets, total = [], 0
    for length in lengths:
        offsets.append(total + length * include_self)
        total += length
    return offsets


def strip_blocks(text: str) -> tuple[str, list[str]]:
    """A whole text without its blocks, and the blocks: exactly what streaming it would give."""
    blocks = BlockFilter()
    visible = blocks.feed(text) + blocks.flush()
    return visible, blocks.blocks
