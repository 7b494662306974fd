"""Pure and incremental: the `<memory>` block taken out of chat completions, whole or streamed, split at any byte.

    ChatStreamFilter   an OpenAI chat.completion.chunk stream → the same stream without blocks, per choice
    filter_completion  a whole chat.completion body → the same body without blocks

Both use proxy/blocks.py's BlockFilter on each choice's text (and proxy/sse.py to read the stream), so a streamed
answer and a whole one come out exactly alike.
"""

from __future__ import annotations

from typing import Any

from proxy import jsontext, parts
from proxy.blocks import MAX_BLOCK, BlockFilter
from proxy.logprobs import Logprobs
from proxy.sse import MAX_EVENT, SSEDecoder, SSEEvent


class ChatStreamFilter:
    """An OpenAI `chat.completion.chunk` SSE stream without its blocks: `decode(bytes) -> [SSE bytes]`,
    `flush() -> [SSE bytes]`, `.blocks` per choice index, `.saw_done`.

    Only `delta.content` changes (per choice, through that choice's BlockFilter). Events needing no change go
    out as they came; a chunk left with nothing but swallowed content is dropped; text held back for a choice
    comes out in its finish_reason chunk, or in a chunk of its own at [DONE] or flush().

    An event longer than `max_event` characters is not filtered, nor buffered: the text held back so far goes
    out, then the rest of the stream is relayed byte for byte (`.relaying` turns true).
    """

    def __init__(self, *, max_event: int = MAX_EVENT, max_block: int = MAX_BLOCK) -> None:
        self.saw_done = False
        self.relaying = False
        self.max_block = max_block
        self._sse = SSEDecoder(max_event)
        self._choices: dict[int, _Choice] = {}
        self._last: dict[str, Any] = {}  # the last chunk's id, object, created, model: for chunks of our own

    @property
    def blocks(self) -> dict[int, list[str]]:
        """The block bodies seen so far per choice index; one still open is added by flush() (or [DONE])."""
        return {index: list(state.filter.blocks) for index, state in sorted(self._choices.items())
                if state.filter.blocks}

    def decode(self, chunk: bytes) -> list[bytes]:
        if self.relaying:
            return [chunk] if chunk else []
        out = self._send(self._sse.decode(chunk))
        if self._sse.overflowed:
            self.relaying = True
            out += [*self._release_all(), self._sse.spill()]
        return out

    def flush(self, *, broken: bool = False) -> list[bytes]:
        """The end of the stream: what is held goes out. `broken`: the upstream broke off (an event cut short is
        dropped, a block begun too; BlockFilter.flush)."""
        if self.relaying:
            return []
        return ([] if broken else self._send(self._sse.flush())) + self._release_all(broken=broken)

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
            chunk = jsontext.loads(data)
        except ValueError:
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
        try:
            data = jsontext.dumps_like(data, chunk, {**chunk, "choices": choices}).decode()
        except TypeError:  # what JSON cannot carry (a lone surrogate in a key): the event as it came
            return [event.encode()]
        return [SSEEvent(data, event.event, event.id, event.retry).encode()]

    def _choice(self, choice: Any, position: int) -> Any:
        """The choice with its content filtered, or the very same object when nothing had to change."""
        if not isinstance(choice, dict):
            return choice
        index = choice.get("index")
        delta = choice.get("delta")
        content = delta.get("content") if isinstance(delta, dict) else None
        finishing = choice.get("finish_reason") is not None
        if not isinstance(content, str | list) and not finishing:
            return choice
        # An odd index still gets a filter of its own: content is never let through unfiltered.
        state = self._choices.setdefault(index if isinstance(index, int) else position, _Choice(self.max_block))
        if isinstance(content, list) and isinstance(delta, dict):  # Mistral's parts; per-token data not tracked
            filtered = parts.through(content, state.filter, end=finishing)
            return choice if filtered is content else {**choice, "delta": {**delta, "content": filtered}}
        text = content if isinstance(content, str) else ""
        untouched = not state.filter.undecided and not state.logprobs
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
        kept = state.logprobs.settle(released, state.filter.consumed - state.filter.undecided)
        new = dict(choice)
        if isinstance(content, str) or visible:
            new["delta"] = {**delta, "content": visible} if isinstance(delta, dict) else {"content": visible}
        if isinstance(entries, list) or kept:
            new["logprobs"] = {**logprobs, "content": kept} if isinstance(logprobs, dict) else {"content": kept}
        return new

    def _release_all(self, *, broken: bool = False) -> list[bytes]:
        """The text every choice still holds back, each in a chunk of its own (the stream is ending)."""
        out = []
        for index, state in sorted(self._choices.items()):
            visible = state.filter.flush(broken=broken)
            kept = state.logprobs.settle(state.filter.released, state.filter.consumed)
            if visible:
                choice = {"index": index, "delta": {"content": visible},
                          "logprobs": {"content": kept} if kept else None, "finish_reason": None}
                chunk = {"object": "chat.completion.chunk", **self._last, "choices": [choice]}
                out.append(SSEEvent(jsontext.dumps(chunk).decode()).encode())
        return out


TEMPLATE_KEYS = ("id", "object", "created", "model", "system_fingerprint")
EMPTY: tuple[Any, ...] = (None, "", [], {})


class _Choice:
    def __init__(self, max_block: int) -> None:
        self.filter = BlockFilter(max_block)
        self.logprobs = Logprobs()


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


def filter_completion(body: dict[str, Any], max_block: int = MAX_BLOCK) -> tuple[dict[str, Any], dict[int, list[str]]]:
    """A whole `chat.completion` without blocks (and the whitespace before them), logprobs trimmed alike; the
    blocks per choice index. `body` is not modified; it is returned as is when it held no block."""
    choices = body.get("choices")
    if not isinstance(choices, list):
        return body, {}
    blocks: dict[int, list[str]] = {}
    filtered = []
    for position, choice in enumerate(choices):
        message = choice.get("message") if isinstance(choice, dict) else None
        index = choice.get("index", position) if isinstance(choice, dict) else position
        if isinstance(message, dict) and isinstance(message.get("content"), list):  # Mistral's parts
            text_filter = BlockFilter(max_block)
            content_parts = parts.through(message["content"], text_filter, end=True)
            if text_filter.blocks:
                blocks[index if isinstance(index, int) else position] = text_filter.blocks
            filtered.append(choice if content_parts is message["content"]
                            else {**choice, "message": {**message, "content": content_parts}})
            continue
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            filtered.append(choice)
            continue
        content: str = message["content"]
        text_filter = BlockFilter(max_block)
        visible = text_filter.feed(content)
        released = text_filter.released
        visible += text_filter.flush()
        if text_filter.blocks:
            blocks[index if isinstance(index, int) else position] = text_filter.blocks
        if visible == content:
            filtered.append(choice)
            continue
        new = {**choice, "message": {**message, "content": visible}}
        logprobs = choice.get("logprobs")
        if isinstance(logprobs, dict) and isinstance(logprobs.get("content"), list):
            tracker = Logprobs()
            tracker.track(logprobs["content"], content, 0)
            new["logprobs"] = {**logprobs, "content": tracker.settle(released + text_filter.released, len(content))}
        filtered.append(new)
    if all(new is old for new, old in zip(filtered, choices, strict=True)):
        return body, blocks
    return {**body, "choices": filtered}, blocks
