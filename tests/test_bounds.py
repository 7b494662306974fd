"""Bounded whatever the upstream sends: a proxy process's peak memory stays flat through answers of hundreds of
megabytes that it cannot filter (one SSE line with no end, a block that never closes, a huge JSON body).

The proxy runs as `memory-proxy serve` in a process of its own, so its peak resident memory (VmHWM) can be read;
the upstream is a raw ASGI app in this process that writes its answer in 1 MiB pieces.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from proxy import chat
from proxy.app import create_app
from proxy.config import Settings
from tests.fakeupstream import FakeUpstream, Reply
from tests.servers import peak_rss, running, serving

MIB = 1024 * 1024
PIECE = b"x" * MIB


def huge_line(mib: int) -> Iterator[bytes]:
    """One SSE event whose data line never ends: a content delta of `mib` MiB."""
    yield b'data: {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "'
    for _ in range(mib):
        yield PIECE
    yield b'"}}]}\n\ndata: [DONE]\n\n'


def endless_block(mib: int) -> Iterator[bytes]:
    """A block that opens and never closes, sent as ordinary 1 MiB content deltas."""
    def event(content: str) -> bytes:
        return b"data: " + orjson.dumps({"id": "c", "object": "chat.completion.chunk",
                                         "choices": [{"index": 0, "delta": {"content": content}}]}) + b"\n\n"
    yield event("Sure. <memory>[")
    chunk = event('"' + "y" * (MIB - 8) + '", ')
    for _ in range(mib):
        yield chunk
    yield b"data: [DONE]\n\n"


def huge_json(mib: int) -> Iterator[bytes]:
    yield b'{"id": "c", "object": "chat.completion", "choices": [{"index": 0, "message": {"content": "'
    for _ in range(mib):
        yield PIECE
    yield b'"}}]}'


def upstream_app(body: Callable[[], Iterator[bytes]], content_type: bytes) -> Any:
    """Answers its first request with a small answer of the same kind, every later one with `body`."""
    served = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", content_type)]})
        pieces = body() if served else small(content_type)
        served.append(True)
        for piece in pieces:
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    return app


def small(content_type: bytes) -> Iterator[bytes]:
    if content_type == b"text/event-stream":
        yield b'data: {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": '
        yield b'"Hello"}}]}\n\ndata: [DONE]\n\n'
    else:
        yield b'{"id": "c", "object": "chat.completion", "choices": [{"index": 0, "message": {"content": "Hi"}}]}'


CASES = {
    "one SSE line of 100 MiB": (lambda: huge_line(100), b"text/event-stream", True),
    "a block that never closes, 100 MiB": (lambda: endless_block(100), b"text/event-stream", True),
    "a JSON answer of 100 MiB": (lambda: huge_json(100), b"application/json", False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_memory_stays_bounded_whatever_the_answer(case: str, tmp_path: Path) -> None:
    body, content_type, stream = CASES[case]
    with running(upstream_app(body, content_type)) as upstream, \
            serving(upstream + "/v1", tmp_path, filter_max_bytes=str(MIB), recall_budget_ms="5000") as (pid, proxy):
        request = {"model": "m", "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
        headers = {"X-Memory-User": "alice"}
        with httpx.Client(timeout=120) as client:
            with client.stream("POST", proxy + "/v1/chat/completions", json=request, headers=headers) as warm:
                warm.read()  # a small answer first: the first request's own costs are not the big answer's
            before = peak_rss(pid) / MIB
            size = 0
            with client.stream("POST", proxy + "/v1/chat/completions", json=request, headers=headers) as response:
                assert response.status_code == 200
                tail = b""
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    tail = (tail + chunk)[-64:]
        grown = peak_rss(pid) / MIB - before
    assert size > 100 * MIB  # all of it reached the client
    assert tail.endswith(b"[DONE]\n\n" if stream else b'"}}]}')
    assert grown < 48, f"peak RSS grew {grown:.0f} MiB relaying {size / MIB:.0f} MiB"



def test_large_json_is_read_off_the_event_loop(upstream: tuple[FakeUpstream, str],
                                               settings_for: Callable[..., Settings],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """30 MB of `[],` take orjson seconds to read: a large request or answer is read in a thread, a small one
    where it is (a thread costs more than the read)."""
    on_loop: dict[str, list[bool]] = {"request": [], "answer": []}

    def spied(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def spy(*args: Any) -> Any:
            on_loop[name].append(asyncio._get_running_loop() is not None)
            return real(*args)
        return spy

    monkeypatch.setattr(chat, "parse_request", spied("request", chat.parse_request))
    monkeypatch.setattr(chat, "filter_completion", spied("answer", chat.filter_completion))
    fake, url = upstream
    with running(create_app(settings_for(url), environ={})) as proxy:
        for size in (10, 400_000):
            fake.reply(Reply(text="Hi " + "x" * size + ' <memory>["User likes tea"]</memory>'))
            response = httpx.post(f"{proxy}/v1/chat/completions", headers={"X-Memory-User": "big"}, timeout=60,
                                  json={"model": "m", "messages": [{"role": "user", "content": "hi " * size}]})
            assert response.status_code == 200 and "<memory>" not in response.text
    assert on_loop == {"request": [True, False], "answer": [True, False]}
