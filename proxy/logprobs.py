"""Pure: per-token data (`logprobs` entries) that follows a text through the block filter.

An entry is kept only when every character of its token came out visible, so a client never gets the logprob of
a token it did not see. Used by the chat filter (`choices[].logprobs.content`) and the Responses filter
(`logprobs` of output_text deltas, done events and parts).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from typing import Any

from proxy.blocks import Span


class Logprobs:
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
        for (begin, end), entry in zip(token_spans(entries, text), entries, strict=True):
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


def token_spans(entries: list[Any], text: str) -> list[Span]:
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
