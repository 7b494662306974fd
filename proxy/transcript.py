"""Pure: what one turn leaves in a session, and the texts made from a session.

    new_messages     the client's messages this turn adds (system messages are the client's set-up, not the talk)
    answer           the assistant message the client saw, from the upstream's raw answer (JSON or SSE), block out
    chunks           a conversation cut into overlapping windows of a few messages, for recall
    summary_request  the call that folds older messages into the rolling summary; `summary_text` reads its answer
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from proxy import jsontext
from proxy.blocks import BlockFilter
from proxy.context import is_system
from proxy.responses_output import texts
from proxy.rewrite import message_text
from proxy.sse import SSEDecoder
from proxy.store.sessions import Message, NewChunk

KEPT = ("role", "content", "name", "tool_calls", "tool_call_id")
CHUNK_MESSAGES = 4  # a chunk: the turn and the one before it, so an answer is found with its question
CHUNK_STRIDE = 2
CHUNK_LINE_CHARS = 200  # four lines of this stay under the model's 256 tokens, and embedding costs by the token
SUMMARY_LINE_CHARS = 2000
SUMMARY_MAX_CHARS = 4000
SUMMARY_INSTRUCTION = (
    "You keep the running summary of a conversation between a user and an assistant. Rewrite the summary so far "
    "to also cover the new messages. Keep what later turns may need: facts about the user, decisions, names, "
    "numbers, code identifiers, problems and how they were solved, open questions. Write plain prose, at most "
    "300 words, in the conversation's language. Answer with the summary only.")


def stored(message: Any) -> dict[str, Any] | None:
    """The message as a session keeps it: its role and what the model reads, nothing else."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        return None
    return {key: message[key] for key in KEPT if key in message}


def new_messages(messages: Sequence[Any], *, everything: bool) -> list[dict[str, Any]]:
    """The non-system messages this turn adds: all of them (prepend mode, or the session's first turn), else
    those after the last assistant message (the client resends the whole conversation)."""
    start = 0
    if not everything:
        start = next((i + 1 for i in range(len(messages) - 1, -1, -1)
                      if isinstance(messages[i], dict) and messages[i].get("role") == "assistant"), 0)
    kept = [stored(message) for message in messages[start:] if not is_system(message)]
    return [message for message in kept if message is not None]


SAID_CHARS = 8000  # what a background extraction call is shown of one turn's user text, at most (its end)


def said(messages: Sequence[Any], limit: int = SAID_CHARS) -> str:
    """What the user said this turn: the text of the user messages after the last assistant message, its last
    `limit` characters (a 30 MB message costs no more than a short one)."""
    texts = [message_text(m)[-limit:] for m in new_messages(messages, everything=False) if m.get("role") == "user"]
    return "\n".join(texts)[-limit:]


def answer_text(raw: bytes) -> str:
    """The text of the answer the client saw (tool calls named), from the upstream's raw answer; '' if none."""
    message = answer(raw) if raw else None
    return line(message, 1 << 30).partition(": ")[2] if message else ""


def visible(text: str) -> str:
    block_filter = BlockFilter()
    return block_filter.feed(text) + block_filter.flush()


def answer(raw: bytes) -> dict[str, Any] | None:
    """The first choice's assistant message as the client saw it (no `<memory>` block), from a chat.completion
    body or its SSE stream, or a Responses API response or stream; None when there is none."""
    try:
        body = jsontext.loads(raw)
    except ValueError:
        return streamed_answer(raw)
    if isinstance(body, dict) and body.get("object") == "response":
        return response_answer(body)
    choices = body.get("choices") if isinstance(body, dict) else None
    first = choices[0] if isinstance(choices, list) and choices else None
    message = first.get("message") if isinstance(first, dict) else None
    if not isinstance(message, dict):
        return None
    content = message.get("content")
    result: dict[str, Any] = {"role": "assistant", "content": visible(content) if isinstance(content, str) else None}
    if message.get("tool_calls"):
        result["tool_calls"] = message["tool_calls"]
    return result if result["content"] or "tool_calls" in result else None


def streamed_answer(raw: bytes) -> dict[str, Any] | None:
    decoder = SSEDecoder()
    text: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    for event in [*decoder.decode(raw), *decoder.flush()]:
        if not event.data or event.data.strip() == "[DONE]":
            continue
        try:
            chunk = jsontext.loads(event.data)
        except ValueError:
            continue
        if isinstance(chunk, dict) and chunk.get("type") in ("response.completed", "response.incomplete"):
            return response_answer(chunk.get("response"))
        if isinstance(chunk, dict) and chunk.get("type") == "response.output_text.delta":  # cut off: the deltas
            text.append(str(chunk.get("delta")))
        choices = chunk.get("choices") if isinstance(chunk, dict) else None
        for choice in choices if isinstance(choices, list) else ():
            delta = choice.get("delta") if isinstance(choice, dict) and choice.get("index", 0) == 0 else None
            if not isinstance(delta, dict):
                continue
            if isinstance(delta.get("content"), str):
                text.append(delta["content"])
            for call in delta.get("tool_calls") or ():
                merge_call(calls, call)
    result: dict[str, Any] = {"role": "assistant", "content": visible("".join(text)) or None}
    if calls:
        result["tool_calls"] = [calls[index] for index in sorted(calls)]
    return result if result["content"] or calls else None


def response_answer(response: Any) -> dict[str, Any] | None:
    """A Responses API response's output as one assistant message: its text, its function calls."""
    output = response.get("output") if isinstance(response, dict) else None
    if not isinstance(output, list):
        return None
    calls = [{"id": item.get("call_id"), "type": "function", "function": {
        "name": item.get("name"), "arguments": item.get("arguments")}}
        for item in output if isinstance(item, dict) and item.get("type") == "function_call"]
    result: dict[str, Any] = {"role": "assistant", "content": "".join(visible(text) for text in texts(output)) or None}
    if calls:
        result["tool_calls"] = calls
    return result if result["content"] or calls else None


def merge_call(calls: dict[int, dict[str, Any]], delta: Any) -> None:
    """A streamed tool call comes in pieces by index: the id, type and name once, the arguments in parts."""
    if not isinstance(delta, dict) or not isinstance(delta.get("index", 0), int):
        return
    call = calls.setdefault(delta.get("index", 0), {"id": "", "type": "function",
                                                    "function": {"name": "", "arguments": ""}})
    for key in ("id", "type"):
        if isinstance(delta.get(key), str):
            call[key] = delta[key]
    function = delta.get("function")
    if isinstance(function, dict):
        if isinstance(function.get("name"), str):
            call["function"]["name"] += function["name"]
        if isinstance(function.get("arguments"), str):
            call["function"]["arguments"] += function["arguments"]


def line(message: dict[str, Any], max_chars: int) -> str:
    """`role: text` on one line, cut at `max_chars`; tool calls are named by their function."""
    text = " ".join(message_text(message).split())
    calls = [call.get("function", {}).get("name", "") for call in message.get("tool_calls") or ()
             if isinstance(call, dict)]
    if calls:
        text = (text + " " if text else "") + "[calls " + ", ".join(filter(None, calls)) + "]"
    if len(text) > max_chars:
        text = text[:max_chars - 1].rstrip() + "…"
    return f"{message.get('role', '?')}: {text}" if text else ""


def chunk_ends(chunked_through: int, last_seq: int) -> list[int]:
    """Where the next chunks end: every CHUNK_STRIDE messages, and at the newest message."""
    ends = list(range(chunked_through + CHUNK_STRIDE, last_seq + 1, CHUNK_STRIDE))
    if last_seq > chunked_through and (not ends or ends[-1] != last_seq):
        ends.append(last_seq)
    return ends


def chunks(messages: Sequence[Message], chunked_through: int) -> list[NewChunk]:
    """The chunks of the messages after `chunked_through`, each with the CHUNK_MESSAGES - CHUNK_STRIDE messages
    before it (pass those in `messages` too)."""
    by_seq = {message.seq: message for message in messages}
    result = []
    for end in chunk_ends(chunked_through, max(by_seq, default=0)):
        window = [by_seq[seq] for seq in range(end - CHUNK_MESSAGES + 1, end + 1) if seq in by_seq]
        text = "\n".join(filter(None, (line(m.message, CHUNK_LINE_CHARS) for m in window)))
        if text:
            result.append(NewChunk(window[0].seq, end, text))
    return result


def summary_request(model: str, summary: str, messages: Sequence[dict[str, Any]]) -> dict[str, Any]:
    shown = "\n".join(filter(None, (line(message, SUMMARY_LINE_CHARS) for message in messages)))
    return {"model": model, "stream": False, "messages": [
        {"role": "system", "content": SUMMARY_INSTRUCTION},
        {"role": "user", "content": f"Summary so far:\n{summary or '(none yet)'}\n\nNew messages:\n{shown}"}]}


def summary_text(raw: bytes) -> str:
    """The summary from the summariser's answer, '' when it gave none."""
    message = answer(raw)
    content = message.get("content") if message else None
    return " ".join(content.split())[:SUMMARY_MAX_CHARS] if isinstance(content, str) else ""
