"""Code fences and whitespace around a `<memory>` block (proxy/blocks.py): which held text goes with a block.

A model often wraps its block in a fenced code block (```` ```json ```` … ```` ``` ````) and puts a blank line
before it; both go with the block, so the client sees neither an empty fence nor a stray gap. A block inside a
fenced code block the answer was already showing is code, not a block: `Fences` tracks that, line by line.
"""

from __future__ import annotations

import re

MAX_SPACE = 64  # whitespace held back before a possible block; more than this is shown as it comes
FENCE_OPENER = re.compile(r"```[\w+.-]{0,32}[ \t]*\Z")  # a fence line's start, anchored at the search's endpos
FENCE_LINE = re.compile(r"```[\w+.-]{0,32}[ \t]*(?:\r\n|\n|\r)")
FENCE_LINE_START = re.compile(r"`{1,2}|```[\w+.-]{0,32}[ \t]*\r?")  # fullmatch: could still become FENCE_LINE
PARTIAL_FENCE = re.compile(r"(?:`{1,3}|```[\w+.-]{1,32}[ \t]*|```[ \t]+)\Z")
TRAILING_SPACE = re.compile(rf"\s{{1,{MAX_SPACE}}}\Z")
NEWLINE = re.compile(r"\r\n|\r|\n")


class Fences:
    """Whether the text shown so far is inside a fenced code block: a line that starts with ``` (after up to
    three spaces) opens or closes one. Fed incrementally; only a line's first few characters are looked at."""

    def __init__(self) -> None:
        self.inside = False
        self._head: str | None = ""  # the current line's start while it may still be a fence line, else None

    @property
    def line_start(self) -> bool:
        return self._head == ""

    def feed(self, text: str) -> None:
        start = 0
        for newline in NEWLINE.finditer(text):
            self._line(text[start:min(newline.start(), start + 7)])
            self._head = ""
            start = newline.end()
        self._line(text[start:start + 7])

    def _line(self, piece: str) -> None:
        if self._head is None or not piece:
            return
        head = self._head + piece
        code = head.lstrip(" ")
        if len(head) - len(code) > 3 or (code and code != "`" * len(code) and not code.startswith("```")):
            self._head = None
        elif code.startswith("```"):
            self.inside = not self.inside
            self._head = None
        else:
            self._head = head


def prefix(buffer: str, position: int, end: int, line_start: bool) -> tuple[int, int, int]:
    """What goes with a block starting at `end`: (where its whitespace begins, and the start and end of a
    code-fence line right before that whitespace, or -1, -1). Looks no further back than `position`;
    `line_start` says whether `position` begins a line."""
    start = space_before(buffer, position, end)
    gap = buffer[start:end]
    if "\n" in gap or "\r" in gap:
        fence = FENCE_OPENER.search(buffer, max(position, start - 40), start)
        if fence is not None and begins_line(buffer, position, fence.start(), line_start):
            return space_before(buffer, position, fence.start()), fence.start(), fence.end()
    return start, -1, -1


def begins_line(buffer: str, position: int, at: int, line_start: bool) -> bool:
    """Whether `at` begins a line, up to three spaces of indent allowed."""
    indent = 0
    while at > position and buffer[at - 1] == " " and indent < 3:
        at, indent = at - 1, indent + 1
    return line_start if at == position else buffer[at - 1] in "\r\n"


def space_before(buffer: str, position: int, end: int) -> int:
    space = TRAILING_SPACE.search(buffer, max(position, end - MAX_SPACE), end)
    return space.start() if space is not None else end
