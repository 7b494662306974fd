"""Pure and incremental: the real `<memory>` block taken out of an answer's text, fed in pieces split anywhere.

What makes a block real (everything else that looks like one is text, and reaches the client unchanged):

1. The opening tag is `<memory>` itself: any case, a few spaces or tabs inside, no attributes, and not right
   after a backtick (inline code such as "the `<memory>` element" is prose about the tag).
2. Its body is the memory payload: after the tag and optional whitespace comes `[` or `{` (a code fence around
   the payload, ```` ```json ````, is allowed). `<memory>2097152</memory>` in libvirt XML is text.
3. The body is one or more JSON (or Python-literal) values and nothing else: a closing tag inside a quoted string
   does not end it (`"User writes a </memory> tag"`), and a character outside any value that is not `,`, a
   fence or the closing tag (`<memory>[] = xs;`) shows it is not a block.
4. At the closing tag, the body is a memory payload (proxy.extract.is_payload: memory items, or a garbled
   attempt at them): `<memory>[1, 2, 3]</memory>` and `<memory>[ ... ]</memory>` are text.
5. Past `max_block` characters of body it is not a block either: no model writes that much about a user, and
   holding it longer would let a peer fill our memory. The text held so far is released unchanged.

A block closes at its closing tag, or at the end of the answer (a block cut off by `max_tokens`; not when the
upstream broke off: `flush(broken=True)`). Whitespace
right before a block goes with it, and so does a code fence that the model wrapped around the whole block.

Nothing is held back except what is still undecided: a trailing run of whitespace (at most `MAX_SPACE`), an
unfinished opening tag, a code-fence opener right before them, or a candidate block. Held text that turns out
not to be a block is released exactly as it came. Every call costs time linear in the text it is given.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from proxy.extract import CLOSE_TAG, OPEN_TAG, OPEN_TAG_MAX, OPEN_TAG_START, TAG_SPACE, is_payload
from proxy.fences import FENCE_LINE, FENCE_LINE_START, PARTIAL_FENCE, Fences, prefix

Span = tuple[int, int]
MAX_BLOCK = 64 * 1024  # default cap on a block's body, in characters
MAX_GAP = 256  # whitespace allowed between the opening tag and the payload

_S = f"[ \\t]{{0,{TAG_SPACE}}}"
CLOSE_TAG_START = re.compile(f"<{_S}(?:/{_S}(?:m(?:e(?:m(?:o(?:r(?:y{_S})?)?)?)?)?)?)?", re.IGNORECASE)
IN_DOUBLE = re.compile(r'["\\]')
IN_SINGLE = re.compile(r"['\\]")
# Inside a value, outside strings, JSON and Python literals hold only these (true, false, null, True, None...):
# the first other character is structure, a string, the closing tag, or a sign that this is not a payload.
STRUCTURE = re.compile(r"[^\s,:0-9.+\-truefalsnTFNoE]")
NOT_SPACE = re.compile(r"\S")


@dataclass
class _Candidate:
    """A block being read: everything from its prefix (whitespace, fence) on is held in `text` until decided."""

    start: int  # offset of the held text in everything fed
    head: int  # length of prefix + opening tag within `text`
    fenced: bool  # a fence opener stood before the tag: a closing fence after the block goes with it
    text: list[str] = field(default_factory=list)
    size: int = 0
    stage: str = "open"  # open (before the payload) → body → after (closed; looking for the closing fence)
    depth: int = 0
    quote: str = ""
    escape: bool = False
    values: int = 0
    inner_fence: bool = False
    body_end: int = -1  # where the body ends within `text`, once the closing tag is read

    def take(self, piece: str) -> None:
        if piece:
            self.text.append(piece)
            self.size += len(piece)


class BlockFilter:
    """`feed(text) -> visible`, `flush() -> visible`; `.blocks` holds the bodies taken out.

    `.released` lists the input spans (offsets into everything fed) that the last call let through, so that
    per-token data (logprobs) can follow the text; `.undecided` counts the characters fed but not yet shown or
    taken out.
    """

    def __init__(self, max_block: int = MAX_BLOCK) -> None:
        self.max_block = max_block
        self.blocks: list[str] = []
        self.unclosed = False
        self.consumed = 0
        self.released: list[Span] = []
        self._tail = ""  # text fed but not yet scanned to a decision
        self._candidate: _Candidate | None = None
        self._fences = Fences()

    @property
    def undecided(self) -> int:
        return len(self._tail) + (self._candidate.size if self._candidate else 0)

    @property
    def inside(self) -> bool:
        """Whether a candidate block is being read."""
        return self._candidate is not None

    def feed(self, text: str) -> str:
        self.released = []
        base = self.consumed - len(self._tail)
        self.consumed += len(text)
        buffer, self._tail = self._tail + text, ""
        visible: list[str] = []
        position = 0
        while position < len(buffer):
            if self._candidate is None:
                position = self._scan(buffer, position, base, visible)
            else:
                position = self._read(buffer, position, visible)
                if position < 0:  # the rest is held until more text decides it
                    break
        return "".join(visible)

    def flush(self, *, broken: bool = False) -> str:
        """End of text: what is held is shown, unless it is a block (an unclosed one is taken out too). With
        `broken` (the upstream broke off), a block begun is dropped, neither shown nor kept: half a block is not
        one to store, and an opening tag is never shown; other held text (`<mem`, spaces) is shown."""
        self.released = []
        visible: list[str] = []
        candidate, tail = self._candidate, self._tail
        self._candidate, self._tail = None, ""
        held = "".join(candidate.text) if candidate is not None else ""
        if candidate is not None and broken:
            pass
        elif candidate is not None and candidate.stage == "body":  # cut off (max_tokens): taken out all the same
            self.blocks.append((held + tail)[candidate.head:])
            self.unclosed = True
        elif candidate is not None and candidate.stage == "after":
            self.blocks.append(held[candidate.head:candidate.body_end])
            self._show(visible, tail, self.consumed - len(tail))
        else:
            self._show(visible, held + tail, self.consumed - len(held) - len(tail))
        return "".join(visible)

    # -- outside a block ------------------------------------------------------------------------------------

    def _scan(self, buffer: str, position: int, base: int, visible: list[str]) -> int:
        tag = OPEN_TAG.search(buffer, position)
        if tag is None:
            end = _tag_start(buffer, position)
            if end == len(buffer):
                partial = PARTIAL_FENCE.search(buffer, max(position, end - 40))
                end = partial.start() if partial is not None else end
            keep = prefix(buffer, position, end, self._fences.line_start)[0]
            self._show(visible, buffer[position:keep], base + position)
            self._tail = buffer[keep:]
            return len(buffer)
        start, fence, fence_end = prefix(buffer, position, tag.start(), self._fences.line_start)
        self._show(visible, buffer[position:start], base + position)
        if fence >= 0 and self._fences.inside:  # that fence line closes a code block: it is text
            self._show(visible, buffer[start:fence_end], base + start)
            start, fence = fence_end, -1
        if (fence < 0 and self._fences.inside) or (tag.start() > 0 and buffer[tag.start() - 1] == "`"):
            self._show(visible, buffer[start:tag.end()], base + start)  # a tag inside code is code
            return tag.end()
        candidate = _Candidate(base + start, tag.end() - start, fence >= 0)
        candidate.take(buffer[start:tag.end()])
        self._candidate = candidate
        return tag.end()

    def _show(self, visible: list[str], text: str, start: int) -> None:
        if text:
            visible.append(text)
            self.released.append((start, start + len(text)))
            self._fences.feed(text)

    # -- inside a candidate ---------------------------------------------------------------------------------

    def _read(self, buffer: str, position: int, visible: list[str]) -> int:
        """Read candidate text from `position`; returns where to go on, or -1 when the rest is held."""
        while position < len(buffer) and self._candidate is not None:
            candidate = self._candidate
            if candidate.size - candidate.head > self.max_block:
                return self._reject(position, visible)
            if candidate.stage == "open":
                position = self._open(candidate, buffer, position, visible)
            elif candidate.stage == "body":
                position = self._body(candidate, buffer, position, visible)
            else:
                position = self._after(candidate, buffer, position)
            if position < 0:
                return position
        return position

    def _open(self, candidate: _Candidate, buffer: str, position: int, visible: list[str]) -> int:
        """Between the opening tag and the payload: whitespace, at most one fence line, then `[` or `{`."""
        found = NOT_SPACE.search(buffer, position)
        gap_end = found.start() if found else len(buffer)
        candidate.take(buffer[position:gap_end])
        if candidate.size - candidate.head > MAX_GAP:
            return self._reject(gap_end, visible)
        if found is None:
            return gap_end
        char = buffer[gap_end]
        if char in "[{":
            candidate.stage = "body"
            return gap_end
        if char == "`" and not candidate.inner_fence:
            line = FENCE_LINE.match(buffer, gap_end)
            if line is not None:
                candidate.inner_fence = True
                candidate.take(line.group())
                return line.end()
            if FENCE_LINE_START.fullmatch(buffer, gap_end):
                return self._hold(buffer, gap_end)
        return self._reject(gap_end, visible)

    def _body(self, candidate: _Candidate, buffer: str, position: int, visible: list[str]) -> int:
        """The payload: strings skipped whole (a closing tag inside one is text), brackets counted."""
        if candidate.escape:
            candidate.escape = False
            candidate.take(buffer[position])
            return position + 1
        if candidate.quote:
            found = (IN_DOUBLE if candidate.quote == '"' else IN_SINGLE).search(buffer, position)
            end = found.start() + 1 if found else len(buffer)
            if found is not None and found.group() == "\\":
                candidate.escape = True
            elif found is not None:
                candidate.quote = ""
            candidate.take(buffer[position:end])
            return end
        found = (STRUCTURE if candidate.depth else NOT_SPACE).search(buffer, position)
        at = found.start() if found else len(buffer)
        candidate.take(buffer[position:at])
        if found is None:
            return at
        char = buffer[at]
        if char == "<":
            close = CLOSE_TAG.match(buffer, at)
            if close is not None:
                if not is_payload("".join(candidate.text)[candidate.head:]):
                    return self._reject(at, visible)
                candidate.body_end = candidate.size
                candidate.take(close.group())
                if candidate.fenced:
                    candidate.stage = "after"
                    return close.end()
                return self._accept(candidate, close.end())
            if CLOSE_TAG_START.fullmatch(buffer, at):
                return self._hold(buffer, at)
            return self._reject(at, visible)
        if char == "`" and candidate.depth == 0 and candidate.inner_fence:
            if buffer.startswith("```", at):
                candidate.take("```")
                return at + 3
            if "```".startswith(buffer[at:]):
                return self._hold(buffer, at)
        if char in "[{":
            candidate.values += candidate.depth == 0
            candidate.depth += 1
        elif char in "]}" and candidate.depth:
            candidate.depth -= 1
        elif char in "\"'" and candidate.depth:
            candidate.quote = char
        elif not (char == "," and candidate.depth == 0 and candidate.values):
            return self._reject(at, visible)
        candidate.take(char)
        return at + 1

    def _after(self, candidate: _Candidate, buffer: str, position: int) -> int:
        """A fenced block has closed: a closing fence right after it (whitespace between) goes with it."""
        found = NOT_SPACE.search(buffer, position)
        if found is None:
            return self._hold(buffer, position)
        at = found.start()
        if buffer.startswith("```", at):
            candidate.take(buffer[position:at + 3])
            return self._accept(candidate, at + 3)
        if "```".startswith(buffer[at:]):
            return self._hold(buffer, position)
        return self._accept(candidate, position)

    def _hold(self, buffer: str, position: int) -> int:
        self._tail = buffer[position:]
        return -1

    def _accept(self, candidate: _Candidate, position: int) -> int:
        self.blocks.append("".join(candidate.text)[candidate.head:candidate.body_end])
        self._candidate = None
        return position

    def _reject(self, position: int, visible: list[str]) -> int:
        """Not a block after all: everything held is shown as it came; reading goes on after it."""
        candidate = self._candidate
        assert candidate is not None
        self._candidate = None
        self._show(visible, "".join(candidate.text), candidate.start)
        return position


def strip_blocks(text: str, max_block: int = MAX_BLOCK) -> tuple[str, list[str]]:
    """A whole text without its blocks, and the blocks: exactly what streaming it would give."""
    blocks = BlockFilter(max_block)
    visible = blocks.feed(text) + blocks.flush()
    return visible, blocks.blocks


def _tag_start(buffer: str, position: int) -> int:
    """Where an unfinished opening tag at the end of `buffer` begins, or len(buffer) if there is none."""
    start = buffer.rfind("<", max(position, len(buffer) - OPEN_TAG_MAX))
    if start < 0 or not OPEN_TAG_START.fullmatch(buffer, start) or (start > 0 and buffer[start - 1] == "`"):
        return len(buffer)
    return start
