"""Pure: the block out of an assistant `content` given as a list of parts, as Mistral's API (Magistral's thinking
models among them) writes it, whole or streamed: `[{"type": "thinking", ...}, {"type": "text", "text": "..."}]`.

Text parts go through one BlockFilter in order (a block may even straddle two of them); every other part (thinking,
images, references) is left as it came.
"""

from __future__ import annotations

from typing import Any

from proxy.blocks import BlockFilter

TEXT_TYPES = frozenset({"text", "output_text"})


def is_text(part: Any) -> bool:
    """A part a person reads: a plain string, or an object with a string `text` and a text type (any case) or none
    (servers differ; an unknown type such as `thinking` or `image_url` is not text)."""
    if isinstance(part, str):
        return True
    if not (isinstance(part, dict) and isinstance(part.get("text"), str)):
        return False
    kind = part.get("type")
    return kind is None or (isinstance(kind, str) and kind.casefold() in TEXT_TYPES)


def text_of(part: Any) -> str:
    return part if isinstance(part, str) else str(part["text"])


def with_text(part: Any, text: str) -> Any:
    return text if isinstance(part, str) else {**part, "text": text}


def through(parts: list[Any], blocks: BlockFilter, *, end: bool) -> list[Any]:
    """`parts` with each text part's text fed to `blocks` and replaced by what it lets through; with `end`, what
    the filter still holds goes at the end of the last text part (a text part of its own if there is none).
    Returns the very same list when nothing changed."""
    out: list[Any] = []
    last = -1
    for part in parts:
        if is_text(part):
            visible = blocks.feed(text_of(part))
            out.append(part if visible == text_of(part) else with_text(part, visible))
            last = len(out) - 1
        else:
            out.append(part)
    rest = blocks.flush() if end else ""
    if rest and last >= 0:
        out[last] = with_text(out[last], text_of(out[last]) + rest)
    elif rest:
        out.append({"type": "text", "text": rest})
    if len(out) == len(parts) and all(new is old for new, old in zip(out, parts, strict=False)):
        return parts
    return out
