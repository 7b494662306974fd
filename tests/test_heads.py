"""Rule 4 (Bounded) for message heads, on real sockets: a client's request head past `max_request_head_bytes` (or
MAX_HEADER_FIELDS fields) gets 431 and a closed connection; an upstream's response head past MAX_HEAD_BYTES (or
MAX_HEADER_FIELDS fields) gets the client a 502 naming the upstream, and the upstream connection closed. Neither
is read past its bound: the memory a giant head costs does not grow with its size."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import orjson
import pytest

from proxy import connection, limits
from proxy.config import Settings
from proxy.server import server_options
from tests.fakeupstream import FakeUpstream, Reply
from tests.servers import peak_rss, running, serving
from tests.test_limits import connect, read_response, status

Upstream = tuple[FakeUpstream, str]
MIB = 1024 * 1024
CHAT = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'


def head_of(size: int, path: bytes = b"/healthz") -> bytes:
    """A GET head of exactly `size` bytes (request line, headers, the blank line), padded in one header."""
    start, end = b"GET %s HTTP/1.1\r\nHost: x\r\nX-Pad: " % path, b"\r\n\r\n"
    return start + b"a" * (size - len(start) - len(end)) + end


def send_giant_head(sock: socket.socket, size: int) -> int:
    """A chat request whose X-Big header is `size` bytes, sent a MiB at a time; how much went out before the
    server stopped taking it (or all of it)."""
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\nX-Memory-User: alice\r\nX-Big: " % len(CHAT))
    sent, chunk = 0, b"a" * MIB
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        while sent < size:
            sock.sendall(chunk)
            sent += len(chunk)
        sock.sendall(b"\r\n\r\n" + CHAT)
    return sent


def refused_and_closed(sock: socket.socket) -> bytes:
    """The server's answer, once it has also closed the connection (else the test fails)."""
    answer = read_response(sock)
    sock.settimeout(5)
    with contextlib.suppress(ConnectionResetError):
        assert sock.recv(65536) == b"", "the connection was left open"
    return answer


def assert_431(answer: bytes) -> None:
    assert status(answer) == 431, answer[:200]
    head, body = answer.split(b"\r\n\r\n", 1)
    assert b"connection: close" in head.lower()
    error = orjson.loads(body)["error"]
    assert error["code"] == "request_header_fields_too_large" and error["type"] == "invalid_request_error"


# --- the client's request head ------------------------------------------------------------------------------------

def test_the_request_head_bound_is_exact_and_the_connection_closes(upstream: Upstream,
                                                                  settings_for: Callable[..., Settings],
                                                                  start_proxy: Callable[..., str]) -> None:
    proxy = start_proxy(settings_for(upstream[1], max_request_head_bytes=4096))
    with connect(proxy) as sock:  # exactly at the bound: served, and kept alive for the next request
        sock.sendall(head_of(4096))
        assert status(read_response(sock)) == 200
        sock.sendall(head_of(4097))  # one byte more, on the same connection
        assert_431(refused_and_closed(sock))
    # The head's bytes are what counts, wherever they are: in the request line too.
    with connect(proxy) as sock:
        sock.sendall(b"GET /v1/models?q=" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert_431(refused_and_closed(sock))
    # Too many fields, however short, within the byte bound.
    fields = b"".join(b"x%d:\r\n" % i for i in range(limits.MAX_HEADER_FIELDS + 1))
    proxy_wide = start_proxy(settings_for(upstream[1]))
    with connect(proxy_wide) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
        assert_431(refused_and_closed(sock))
    assert upstream[0].requests == []


def test_a_pipelined_giant_head_after_a_good_request(upstream: Upstream, settings_for: Callable[..., Settings],
                                                    start_proxy: Callable[..., str]) -> None:
    proxy = start_proxy(settings_for(upstream[1], max_request_head_bytes=4096))
    with connect(proxy) as sock:
        sock.sendall(head_of(200) + head_of(100_000))  # one write: the first is answered, then the second refused
        answer = read_response(sock)
        assert status(answer) == 200
        rest = answer.split(b"\r\n\r\n", 1)[1]
        rest = rest[int(answer.lower().split(b"content-length: ")[1].split(b"\r\n")[0]):]
        assert_431(rest or refused_and_closed(sock))


def test_a_giant_head_is_refused_before_the_upstream_or_authentication(upstream: Upstream,
                                                                      settings_for: Callable[..., Settings],
                                                                      start_proxy: Callable[..., str]) -> None:
    proxy = start_proxy(settings_for(upstream[1], proxy_keys="acme:pk-0123456789abcdef", upstream_key="sk-own"))
    with connect(proxy) as sock:
        send_giant_head(sock, 16 * MIB)
        assert_431(refused_and_closed(sock))
    assert upstream[0].requests == []


def test_a_chunked_body_s_trailers_are_bounded_too(upstream: Upstream, settings_for: Callable[..., Settings],
                                                   start_proxy: Callable[..., str]) -> None:
    fake, url = upstream
    proxy = start_proxy(settings_for(url, max_request_head_bytes=4096))
    start = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
             b"X-Memory-User: alice\r\nTransfer-Encoding: chunked\r\n\r\n")
    # A body in one-byte chunks is mostly framing, far past the bound in all: it is the content that counts.
    body = CHAT + b" " * 30_000
    with connect(proxy) as sock:
        sock.sendall(start + b"".join(b"1\r\n%c\r\n" % byte for byte in body) + b"0\r\n\r\n")
        assert status(read_response(sock)) == 200
    assert len(fake.chats) == 1
    # A trailer section without end: the connection is closed, the request goes nowhere.
    with connect(proxy) as sock:
        sock.sendall(start + b"%x\r\n%s\r\n0\r\nX-Trailer: " % (len(CHAT), CHAT))
        sent, chunk = 0, b"a" * MIB
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while sent < 64 * MIB:
                sock.sendall(chunk)
                sent += len(chunk)
        assert sent < 16 * MIB
        answer = b""
        with contextlib.suppress(ConnectionResetError, TimeoutError):
            answer = read_response(sock)
        assert b" 200 " not in answer[:20]
    assert len(fake.chats) == 1


def test_the_h11_protocol_is_bounded_too(upstream: Upstream, settings_for: Callable[..., Settings]) -> None:
    """`serve` runs httptools; uvicorn's h11 protocol, if chosen, gets the same bound (it answers 400 past it)."""
    from proxy.app import create_app

    settings = settings_for(upstream[1], max_request_head_bytes=4096)
    with running(create_app(settings, environ={}), **{**server_options(settings), "http": "h11"}) as proxy:
        with connect(proxy) as sock:
            sock.sendall(head_of(4000))
            assert status(read_response(sock)) == 200
        with connect(proxy) as sock:
            sent = send_giant_head(sock, 16 * MIB)
            answer = read_response(sock)
        assert sent < 16 * MIB or status(answer) in (400, 431)


# --- the upstream's response head ---------------------------------------------------------------------------------

class EndlessHead:
    """An upstream on a raw socket whose answer to a chat never ends its head: one header value growing forever
    (`one header`), or header fields without end (`many fields`); or never ends the trailer section of its chunked
    body (`trailers`); until the peer closes the connection. GET (the readiness probe's /models) gets an ordinary
    answer."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.sent = 0
        self.closed = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                threading.Thread(target=self.answer, args=(conn,), daemon=True).start()

    def answer(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            if data.startswith(b"GET"):
                body = b'{"object":"list","data":[]}'
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n%s" % (len(body), body))
                return
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n")
            if self.mode == "trailers":  # a chunked body whose trailer section never ends
                conn.sendall(b"transfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nx-trailer: ")
            else:
                conn.sendall(b"x-evil: ")
            chunk = b"x-h: v\r\n" * (MIB // 8) if self.mode == "many fields" else b"a" * MIB
            try:
                while self.sent < 512 * MIB:  # a bound for the test's own sake: the proxy must stop far sooner
                    conn.sendall(chunk)
                    self.sent += len(chunk)
            except OSError:
                self.closed.set()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=["one header", "many fields", "trailers"])
def endless(request: pytest.FixtureRequest) -> Iterator[EndlessHead]:
    server = EndlessHead(request.param)
    yield server
    server.close()


def test_an_endless_response_head_is_a_502_and_the_upstream_connection_closes(
        endless: EndlessHead, settings_for: Callable[..., Settings], start_proxy: Callable[..., str]) -> None:
    proxy = start_proxy(settings_for(endless.url))
    response = httpx.post(proxy + "/v1/chat/completions", content=CHAT,
                          headers={"content-type": "application/json", "x-memory-user": "alice"}, timeout=30)
    assert response.status_code == 502
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert endless.url.removesuffix("/v1").removeprefix("http://") in error["message"]
    assert ("chunk framing or trailers" if endless.mode == "trailers" else "response head") in error["message"]
    assert endless.closed.wait(10), "the proxy kept the upstream connection open"
    assert endless.sent < 16 * MIB  # it stopped reading at the bound, not at a timeout


def test_many_header_fields_from_the_upstream(upstream: Upstream, settings_for: Callable[..., Settings],
                                              start_proxy: Callable[..., str]) -> None:
    fake, url = upstream
    proxy = start_proxy(settings_for(url))
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    fake.reply(Reply(headers={f"x-h{i}": "v" for i in range(900)}))  # many, within the bound: relayed
    answer = httpx.post(proxy + "/v1/chat/completions", json=body, headers={"x-memory-user": "alice"})
    assert answer.status_code == 200 and answer.headers["x-h899"] == "v"
    fake.reply(Reply(headers={f"x-h{i}": "v" for i in range(connection.MAX_HEADER_FIELDS)}))
    answer = httpx.post(proxy + "/v1/chat/completions", json=body, headers={"x-memory-user": "alice"})
    assert answer.status_code == 502 and "header fields" in answer.json()["error"]["message"]
    fake.reply("fine again")  # the next request gets a fresh connection
    answer = httpx.post(proxy + "/v1/chat/completions", json=body, headers={"x-memory-user": "alice"})
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == "fine again"


# --- what giant heads cost ----------------------------------------------------------------------------------------

def test_giant_heads_cost_memory_that_does_not_grow_with_them(tmp_path: Path) -> None:
    """The tester's figures before the fix: 3 parallel 48 MB request heads took peak RSS to 656 MiB; a 64 MB
    response head raised it 203 → 440 MiB. `memory-proxy serve` runs in a process of its own, so its memory is
    its own."""
    upstream = EndlessHead("one header")
    try:
        with serving(upstream.url, tmp_path) as (pid, base):
            before = peak_rss(pid)

            def giant() -> bytes:
                with connect(base) as sock:
                    send_giant_head(sock, 48 * MIB)
                    return refused_and_closed(sock)

            with ThreadPoolExecutor(3) as pool:
                for answer in pool.map(lambda _: giant(), range(3)):
                    assert_431(answer)
            response = httpx.post(base + "/v1/chat/completions", content=CHAT, timeout=30,
                                  headers={"content-type": "application/json", "x-memory-user": "alice"})
            assert response.status_code == 502
            grown = (peak_rss(pid) - before) / MIB
    finally:
        upstream.close()
    assert grown < 24, f"peak RSS grew {grown:.0f} MiB for 3 x 48 MiB request heads and an endless response head"


def test_trailer_fields_are_not_counted_with_the_head(settings_for: Callable[..., Settings],
                                                      start_proxy: Callable[..., str]) -> None:
    """900 header fields and 900 trailer fields are each within the bound: the answer goes through (with the
    head's fields, not the trailers': the client's head is out before they come)."""
    sock = socket.create_server(("127.0.0.1", 0))
    completion = orjson.dumps({"id": "c", "object": "chat.completion", "created": 1, "model": "m", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": 'Hi <memory>["User likes tea"]</memory>'},
         "finish_reason": "stop"}]})

    def answer() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = sock.accept()
                with conn:
                    data = b""
                    while b"\r\n\r\n" not in data:
                        data += conn.recv(65536)
                    head = b"".join(b"x-h%d: v\r\n" % i for i in range(900))
                    trailers = b"".join(b"x-t%d: v\r\n" % i for i in range(900))
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n" + head
                                 + b"transfer-encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n%s\r\n"
                                 % (len(completion), completion, trailers))

    threading.Thread(target=answer, daemon=True).start()
    try:
        proxy = start_proxy(settings_for(f"http://127.0.0.1:{sock.getsockname()[1]}/v1"))
        response = httpx.post(proxy + "/v1/chat/completions", content=CHAT,
                              headers={"content-type": "application/json", "x-memory-user": "alice"})
        assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == "Hi"
        assert response.headers["x-h899"] == "v" and "x-t0" not in response.headers
    finally:
        sock.close()
