"""A recording relay in front of a model server, for benchmarks that need to see what the model itself answered.

    with Tap("http://127.0.0.1:8001/v1", timeout=180) as tap:   # tap.url: give it to the proxy and to clients
        ...
        tap.calls       every chat completion passed on, in order: a proxy's background extraction call or a chat,
                        status, seconds, the server's `usage`, the answer's text (before any proxy filters it)
        tap.wait_idle() until no call is in flight

A threaded stdlib HTTP/1.1 server on 127.0.0.1 that forwards each request whole (non-streamed answers only, which
is all the benchmarks send) with httpx; it costs a local hop of about a millisecond, the same on every path.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import orjson

from proxy.extract import EXTRACTION_PROMPT

HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding"})


@dataclass
class Call:
    extraction: bool  # a proxy's background extraction call (its prompt opens the one message)
    status: int
    seconds: float
    prompt_tokens: int
    completion_tokens: int
    text: str  # the first choice's content


class Tap:
    def __init__(self, upstream: str, timeout: float) -> None:
        self.upstream = upstream.rstrip("/").removesuffix("/v1")
        self.calls: list[Call] = []
        self.in_flight = 0
        self.last_active = time.monotonic()
        self._lock = threading.Lock()
        self._client = httpx.Client(timeout=timeout)
        tap = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                self.relay()

            def do_POST(self) -> None:
                self.relay()

            def relay(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                status, headers, content = tap.forward(self.command, self.path, dict(self.headers.items()), body)
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("content-length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> Tap:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._client.close()

    def forward(self, method: str, path: str, headers: dict[str, str], body: bytes
                ) -> tuple[int, list[tuple[str, str]], bytes]:
        sent = {k: v for k, v in headers.items() if k.lower() in ("content-type", "authorization", "accept")}
        with self._lock:
            self.in_flight += 1
        started = time.perf_counter()
        try:
            response = self._client.request(method, self.upstream + path, content=body or None, headers=sent)
            status, content = response.status_code, response.content
            kept = [(k, v) for k, v in response.headers.items() if k.lower() not in HOP_BY_HOP]
        except httpx.HTTPError as exc:
            status, content, kept = 502, orjson.dumps({"error": {"message": str(exc)}}), []
        seconds = time.perf_counter() - started
        if method == "POST" and path.endswith("/chat/completions"):
            call = recorded(body, status, seconds, content)
            with self._lock:
                self.calls.append(call)
        with self._lock:
            self.in_flight -= 1
            self.last_active = time.monotonic()
        return status, kept, content

    def wait_idle(self, limit: float) -> None:
        """Until no call is in flight, at most `limit` seconds."""
        deadline = time.monotonic() + limit
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)

    def settle(self, since: int, window: float, quiet: float, limit: float) -> None:
        """After a turn whose facts a background call learns: until an extraction call after `calls[since]` has
        succeeded and nothing is in flight, or the model has been idle for `quiet` seconds after the coalescing
        `window` (a call that failed, with its retries), or `limit` seconds."""
        started = time.monotonic()
        while time.monotonic() - started < limit:
            time.sleep(0.05)
            if self.in_flight:
                continue
            if any(c.extraction and c.status == 200 for c in self.calls[since:]):
                return
            if time.monotonic() - started > window and time.monotonic() - self.last_active > quiet:
                return


def recorded(body: bytes, status: int, seconds: float, content: bytes) -> Call:
    try:
        first = orjson.loads(body)["messages"][0]["content"]
        extraction = isinstance(first, str) and first.startswith(EXTRACTION_PROMPT[:60])
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        extraction = False
    try:
        data = orjson.loads(content)
        usage = data.get("usage") or {}
        text = data["choices"][0]["message"]["content"] or ""
        return Call(extraction, status, seconds, int(usage.get("prompt_tokens") or 0),
                    int(usage.get("completion_tokens") or 0), text)
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
        return Call(extraction, status, seconds, 0, 0, content[:300].decode(errors="replace"))
