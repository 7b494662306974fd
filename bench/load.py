"""Load generators: wrk (Debian's `wrk`) driven by a generated Lua script, and an async fallback.

Both keep N keep-alive connections busy for a fixed time (and, the fallback, a fixed count) and report
req/s and p50/p99 latency. The fallback (uvloop + httptools, no HTTP client library) is only trusted after it has
been pointed at the bare upstream: its ceiling there must be well above what it measures on a proxy.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools
import uvloop

WRK_MISSING = "wrk is not installed: `apt-get update && apt-get install -y wrk` (Debian) gives the real figures"


@dataclass(frozen=True)
class Load:
    """One request shape. `varied` appends a per-request counter to `vary` in the body (defeats caches)."""
    method: str
    url: str
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    vary: str = ""


@dataclass(frozen=True)
class Result:
    requests: int
    seconds: float
    errors: int
    p50: float  # seconds
    p99: float
    tool: str

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def _lua_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid Lua string literal for our ASCII bodies


def wrk_script(load: Load) -> str:
    lines = [f"wrk.method = {_lua_string(load.method)}", f"wrk.body = {_lua_string(load.body.decode())}"]
    lines += [f"wrk.headers[{_lua_string(k)}] = {_lua_string(v)}" for k, v in load.headers]
    if load.vary:
        head, _, tail = load.body.decode().partition(load.vary)
        lines += [
            "local threads, counter = 0, 0",
            "function setup(thread) threads = threads + 1; thread:set('tid', threads) end",
            "function request()",
            "  counter = counter + 1",
            f"  local body = {_lua_string(head + load.vary)} .. ' #' .. tid .. '-' .. counter .. {_lua_string(tail)}",
            "  return wrk.format(nil, nil, nil, body)",
            "end",
        ]
    lines += [
        "function done(summary, latency, requests)",
        "  local e = summary.errors",
        "  io.write(string.format('BENCH %d %d %d %d %d\\n', summary.requests, summary.duration,",
        "    e.connect + e.read + e.write + e.status + e.timeout, latency:percentile(50), latency:percentile(99)))",
        "end",
    ]
    return "\n".join(lines) + "\n"


def run_wrk(load: Load, connections: int, seconds: float) -> Result:
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(wrk_script(load))
        script.flush()
        # One thread: on two cores a second wrk thread only steals CPU from the server, and the fight for the
        # cores shows up as a p99 tail that is the machine's, not the server's (measured: 0.8 s vs 0.1 s).
        args = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
                "-s", script.name, load.url]
        out = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("BENCH "))
    requests, duration_us, errors, p50_us, p99_us = (int(x) for x in line.split()[1:])
    return Result(requests, duration_us / 1e6, errors, p50_us / 1e6, p99_us / 1e6, "wrk")


class _Connection(asyncio.Protocol):
    """One keep-alive connection sending the same request again as soon as the last answer is complete."""

    def __init__(self, load: Load, host: str, path: str, shared: _Shared) -> None:
        self.load, self.shared, self.host, self.path = load, shared, host, path
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.started = 0.0
        self.status = 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def request_bytes(self) -> bytes:
        body = self.load.body
        if self.load.vary:
            self.shared.counter += 1
            body = body.replace(self.load.vary.encode(), f"{self.load.vary} #{self.shared.counter}".encode(), 1)
        head = [f"{self.load.method} {self.path} HTTP/1.1", f"Host: {self.host}", f"Content-Length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in self.load.headers]
        return ("\r\n".join(head) + "\r\n\r\n").encode() + body

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not its subclasses
        self.send()

    def send(self) -> None:
        assert self.transport is not None
        if not self.shared.more():
            self.transport.close()
            return
        self.started = time.perf_counter()
        self.transport.write(self.request_bytes())

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.shared.errors += 1
            assert self.transport is not None
            self.transport.close()

    def on_status(self, _status: bytes) -> None:
        self.status = self.parser.get_status_code()

    def on_message_complete(self) -> None:
        self.shared.latencies.append(time.perf_counter() - self.started)
        if self.status >= 400:
            self.shared.errors += 1
        self.send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


class _Shared:
    def __init__(self, deadline: float, limit: int) -> None:
        self.deadline, self.limit = deadline, limit
        self.latencies: list[float] = []
        self.errors = 0
        self.counter = 0
        self.sent = 0

    def more(self) -> bool:
        self.sent += 1
        return self.sent <= self.limit and time.perf_counter() < self.deadline


async def _run_async(load: Load, connections: int, seconds: float, limit: int) -> Result:
    parts = urlsplit(load.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    start = time.perf_counter()
    shared = _Shared(start + seconds, limit)
    loop = asyncio.get_running_loop()
    conns = [(await loop.create_connection(lambda: _Connection(load, f"{host}:{port}", path, shared), host, port))[1]
             for _ in range(connections)]
    await asyncio.wait_for(asyncio.gather(*(c.done for c in conns)), timeout=seconds + 30)
    elapsed = time.perf_counter() - start
    ordered = sorted(shared.latencies) or [0.0]
    pick = lambda q: ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]  # noqa: E731
    return Result(len(shared.latencies), elapsed, shared.errors, pick(50), pick(99), "async")


def run_async(load: Load, connections: int, seconds: float, limit: int = 2_000_000) -> Result:
    """The fallback generator, in this process: bounded by `seconds` and by `limit` requests."""
    return uvloop.run(_run_async(load, connections, seconds, limit))


def run(load: Load, connections: int, seconds: float, tool: str) -> Result:
    return run_wrk(load, connections, seconds) if tool == "wrk" else run_async(load, connections, seconds)
