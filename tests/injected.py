"""What the proxy adds to the messages it sends upstream, told apart from what the client wrote."""

from __future__ import annotations

import re
from typing import Any

from proxy.extract import INSTRUCTION

MEMORIES = re.compile(r"<memories>\n.*?\n</memories>", re.S)


def text_of(message: Any) -> str:
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, list):
        return "\n\n".join(p["text"] for p in content if isinstance(p, dict) and p.get("type") == "text")
    return content if isinstance(content, str) else ""


def client_text(content: str) -> str:
    """A message's text as the client wrote it: the proxy's memories and instruction paragraphs taken out."""
    paragraphs = MEMORIES.sub("", content.replace(INSTRUCTION, "")).split("\n\n")
    return "\n\n".join(p for p in paragraphs if p)


def memories_sent(messages: list[Any]) -> str:
    """The memories blocks the proxy added to any of the messages, joined; '' when none."""
    return "\n".join(m.group() for message in messages for m in MEMORIES.finditer(text_of(message)))


def instruction_sent(messages: list[Any]) -> bool:
    return any(INSTRUCTION in text_of(message) for message in messages)
