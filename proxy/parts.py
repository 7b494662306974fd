"""Pure: the block out of an assistant `content` given as a list of parts, as Mistral's API (Magistral's thinking
models among them) writes it, whole or streamed: `[{"type": "thinking", ...}, {"type": "text", "text": "..."}]`.

Text parts go through one BlockFilter in order (a block may even straddle two of them); every other part (thinking,
images, references) is left as it came.
"""

from __future__ import annotations

from typing import Any

from proxy.blocks import BlockFilter


def is_text(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)


def through(parts: list[Any], blocks: BlockFilter, *, end: bool) -> list[Any]:
    """`parts` with each text part's text fed to `blocks` and replaced by what it lets through; with `end`, what
    the filter still holds goes at the end of the last text part (a text part of its own if there is none).
    Returns the very same list when nothing changed."""
    out: list[Any] = []
    last = -1
    for part in parts:
        if is_text(part):
            visible = blocks.feed(part["text"])
            out.append(part if visible == part["text"] else {**part, "text": visible})
            last = len(out) - 1
        else:
            out.append(part)
    rest = blocks.flush() if end else ""
    if rest and last >= 0:
        out[last] = {**out[last], "text": out[last]["text"] + rest}
    elif rest:
        out.append({"type": "text", "text": rest})
    if len(out) == len(parts) and all(new is old for new, old in zip(out, parts, strict=False)):
        return parts
    return out
