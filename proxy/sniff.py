"""Whether an upstream answer is a stream, decided by its first bytes rather than its Content-Type alone.

Servers label streams wrongly (SSE sent as `application/json`, JSON as `text/event-stream`), and the client's
`stream` flag is a wish, not a promise. The first non-blank bytes tell: a server-sent event starts with a field
name or a comment (`data:`, `event:`, `id:`, `retry:`, `:`), a JSON body with `{` or `[`. Only when they say
neither does the header decide.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx

SSE_STARTS = (b"data:", b"event:", b"id:", b"retry:", b":")
BLANK = b" \t\r\n"
SNIFF_BYTES = 1024  # blank bytes read before giving up on the body and trusting the header


@dataclass
class Answer:
    """An answer being read: `head` holds the chunks read so far, `rest` yields the others."""

    streamed: bool
    rest: AsyncIterator[bytes]
    head: list[bytes] = field(default_factory=list)
    complete: bool = False  # the whole body is in `head` (non-streamed answers under the cap)

    async def chunks(self) -> AsyncIterator[bytes]:
        """Every chunk of the body, the ones already read first."""
        for chunk in self.head:
            yield chunk
        self.head = []
        async for chunk in self.rest:
            yield chunk


def looks_streamed(start: bytes, content_type: str) -> bool:
    """Whether a body that begins with `start` is server-sent events."""
    start = start.lstrip(b"\xef\xbb\xbf" + BLANK)
    if start.startswith(SSE_STARTS):
        return True
    if start[:1] in (b"{", b"["):
        return False
    return content_type.split(";")[0].strip().lower() == "text/event-stream"


async def read_answer(response: httpx.Response, max_bytes: int) -> Answer:
    """Read enough of `response` to know whether it is a stream; a non-streamed body is read whole, unless it is
    longer than `max_bytes` (then `complete` stays false and the rest is left unread)."""
    rest = response.aiter_bytes()
    answer = Answer(False, rest)
    size = 0
    async for chunk in rest:
        answer.head.append(chunk)
        size += len(chunk)
        if chunk.strip(BLANK) or size > SNIFF_BYTES:
            break
    else:
        answer.complete = True
    answer.streamed = looks_streamed(b"".join(answer.head)[:SNIFF_BYTES], response.headers.get("content-type", ""))
    if answer.streamed or answer.complete:
        return answer
    async for chunk in rest:
        answer.head.append(chunk)
        size += len(chunk)
        if size > max_bytes:
            return answer
    answer.complete = True
    return answer
