"""Faults, each forced for real: an upstream that refuses, stalls, resets or talks nonsense; a database that is
locked, read-only or full; a model that is missing or corrupt; a client that leaves at every stage.

After each: the client got a clear answer or error, the proxy still serves, nothing escaped into the log, and
memories acknowledged before the fault are intact. The upstream here is a raw TCP peer (`RawUpstream`) so the
test decides every byte, reset and silence; the proxy is the real app on a real uvicorn server.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
import uvicorn

from proxy.app import create_app
from proxy.config import Settings
from proxy.store.sqlite import SqliteStore, db
from proxy.use import DIMENSION  # the default model's
from tests.fakeupstream import FakeUpstream
from tests.servers import running

ROOT = Path(__file__).resolve().parent.parent
CHAT = {"model": "m", "messages": [{"role": "user", "content": "I am vegetarian, what should I cook?"}]}
ALICE = {"x-memory-user": "alice"}


# --- a scripted upstream ----------------------------------------------------------------------------------------

@dataclass
class Answer:
    """What RawUpstream does with one connection, once it has read the request: send `parts` (`gap` seconds
    apart), then end it with a close, a reset (RST), or by staying silent until the proxy hangs up."""

    parts: list[bytes] = field(default_factory=list)
    gap: float = 0.0
    end: str = "close"  # close | reset | hang


def http_answer(body: bytes, status: str = "200 OK", content_type: str = "application/json") -> Answer:
    head = f"HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\nconnection: close"
    return Answer([head.encode() + b"\r\n\r\n" + body])


def sse_answer(events: list[bytes], *, gap: float = 0.0, end: str = "close", finish: bool = True) -> Answer:
    """A chunked text/event-stream, one chunk per event; `finish` sends the last chunk that completes it."""
    head = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
            b"connection: close\r\n\r\n")
    chunks = [b"%x\r\n%s\r\n" % (len(event), event) for event in events]
    return Answer([head, *chunks, *([b"0\r\n\r\n"] if finish else [])], gap, end)


def delta(text: str) -> bytes:
    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def completion(text: str) -> bytes:
    return orjson.dumps({"id": "c1", "object": "chat.completion", "created": 1, "model": "m", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]})


FINE = http_answer(completion("All good."))


class RawUpstream:
    """A TCP peer on 127.0.0.1 that answers the n-th connection with the n-th Answer (FINE once they run out) and
    notes when the proxy hung up on it first. `listening=False` binds the port but refuses connections until
    `listen()`."""

    def __init__(self, *answers: Answer, listening: bool = True) -> None:
        self.answers = list(answers)
        self.requests: list[bytes] = []
        self.hung_up = 0  # connections the proxy closed before the answer was over
        self.sent = 0  # parts sent, over all connections
        self.done = 0  # connections finished, whoever ended them
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        if listening:
            self.listen()

    def listen(self) -> None:
        self.sock.listen(16)
        self.sock.settimeout(0.05)
        thread = threading.Thread(target=self.accept, daemon=True)
        thread.start()
        self.threads.append(thread)

    def accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            answer = self.answers.pop(0) if self.answers else FINE
            thread = threading.Thread(target=self.serve, args=(conn, answer), daemon=True)
            thread.start()
            self.threads.append(thread)

    def serve(self, conn: socket.socket, answer: Answer) -> None:
        with conn:
            conn.settimeout(10)
            try:
                self.requests.append(read_request(conn))
                for part in answer.parts:
                    conn.sendall(part)
                    self.sent += 1
                    if answer.gap and self.peer_left(conn, answer.gap):
                        self.hung_up += 1
                        return
                if answer.end == "reset":
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                elif answer.end == "hang" and self.peer_left(conn, 30):
                    self.hung_up += 1
            except OSError:
                self.hung_up += 1
            finally:
                self.done += 1

    def peer_left(self, conn: socket.socket, seconds: float) -> bool:
        """Wait up to `seconds` (less if the test ends); True as soon as the proxy closes its end."""
        deadline = time.monotonic() + seconds
        while not self.stopping.is_set() and time.monotonic() < deadline:
            readable, _, _ = select.select([conn], [], [], min(0.05, seconds))
            if readable:
                try:
                    if not conn.recv(65536):
                        return True
                except OSError:
                    return True
        return False

    def close(self) -> None:
        self.stopping.set()
        self.sock.close()
        for thread in self.threads:
            thread.join(timeout=5)


def read_request(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        more = conn.recv(65536)
        if not more:
            return data
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        more = conn.recv(65536)
        if not more:
            break
        body += more
    return head + b"\r\n\r\n" + body


@pytest.fixture
def raw_upstream() -> Iterator[Callable[..., RawUpstream]]:
    made: list[RawUpstream] = []

    def make(*answers: Answer, listening: bool = True) -> RawUpstream:
        made.append(RawUpstream(*answers, listening=listening))
        return made[-1]

    yield make
    for peer in made:
        peer.close()


# --- watching the proxy ----------------------------------------------------------------------------------------

@pytest.fixture
def log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Every log record of the proxy and of uvicorn (whose logger does not propagate to the root)."""
    caplog.set_level(logging.INFO)
    uvicorn_log = logging.getLogger("uvicorn")
    uvicorn_log.addHandler(caplog.handler)
    try:
        yield caplog
    finally:
        uvicorn_log.removeHandler(caplog.handler)


def escaped(log: pytest.LogCaptureFixture) -> list[str]:
    """Tracebacks and errors in the log: an exception the proxy did not handle."""
    return [record.getMessage() for record in log.records if record.exc_info or record.levelno >= logging.ERROR]


def unhandled(log: pytest.LogCaptureFixture) -> list[str]:
    """Exceptions nobody handled: one that reached uvicorn or the app's last-resort handler, or a task's that was
    never retrieved. (A store fault is logged where it is handled, and that is the point of these tests.)"""
    return [record.getMessage() for record in log.records
            if (record.name.startswith("uvicorn") and record.levelno >= logging.ERROR)
            or record.getMessage().startswith(("unexpected error", "Task exception was never retrieved"))]


def error_of(response: httpx.Response) -> dict[str, Any]:
    """The OpenAI-shaped error of a response, checked for its shape."""
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def wait_for(check: Callable[[], bool], seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def still_serving(proxy: str, peer: RawUpstream) -> None:
    """The proxy answers its health check and, with the upstream behaving again, a chat."""
    assert httpx.get(proxy + "/healthz").status_code == 200
    response = httpx.post(proxy + "/v1/chat/completions", json=CHAT, headers=ALICE, timeout=10)
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == "All good."


@contextmanager
def serving_on(app: Any, sock: socket.socket) -> Iterator[None]:
    """Serve `app` on an already bound socket (tests.servers.running picks its own port)."""
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                                           timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    assert wait_for(lambda: server.started or not thread.is_alive(), 30) and server.started
    try:
        yield
    finally:
        server.should_exit = True
        thread.join(timeout=10)


# --- the upstream fails ----------------------------------------------------------------------------------------

def test_upstream_refusing_is_502_until_it_comes_back(raw_upstream: Callable[..., RawUpstream],
                                                      settings_for: Callable[..., Settings],
                                                      start_proxy: Callable[..., str],
                                                      log: pytest.LogCaptureFixture) -> None:
    peer = raw_upstream(listening=False)  # the port is taken but nobody listens: connections are refused
    proxy = start_proxy(settings_for(peer.url))
    for headers, body in ((ALICE, CHAT), ({}, CHAT), (ALICE, {**CHAT, "stream": True})):
        response = httpx.post(proxy + "/v1/chat/completions", json=body, headers=headers)
        assert response.status_code == 502
        assert error_of(response)["code"] == "upstream_unreachable"
    with openai.OpenAI(base_url=proxy + "/v1", api_key="k", max_retries=0) as sdk, \
            pytest.raises(openai.InternalServerError) as caught:
        sdk.chat.completions.create(**CHAT, extra_headers=ALICE)  # type: ignore[call-overload]
    assert caught.value.status_code == 502 and caught.value.code == "upstream_unreachable"
    fake = FakeUpstream()
    fake.reply("All good.")
    with serving_on(fake.app, peer.sock):  # the upstream is back on the same port
        response = httpx.post(proxy + "/v1/chat/completions", json=CHAT, headers=ALICE)
        assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == "All good."
    assert escaped(log) == []


def test_upstream_silent_is_504_and_a_stall_mid_stream_ends_in_an_error_event(
        raw_upstream: Callable[..., RawUpstream], settings_for: Callable[..., Settings],
        start_proxy: Callable[..., str], log: pytest.LogCaptureFixture) -> None:
    stalled = sse_answer([delta("Let me think")], end="hang", finish=False)
    peer = raw_upstream(Answer(end="hang"), Answer(end="hang"), stalled)
    proxy = start_proxy(settings_for(peer.url, read_timeout=0.5))
    for body in (CHAT, {**CHAT, "stream": True}):
        response = httpx.post(proxy + "/v1/chat/completions", json=body, headers=ALICE)
        assert response.status_code == 504 and error_of(response)["code"] == "upstream_timeout"
    response = httpx.post(proxy + "/v1/chat/completions", json={**CHAT, "stream": True}, headers=ALICE)
    assert response.status_code == 200  # the headers were out before the upstream stalled
    assert b"Let me think" in response.content
    assert b'"code":"upstream_disconnected"' in response.content.rsplit(b"data: ", 1)[1]
    assert wait_for(lambda: peer.hung_up == 3)  # each stalled connection was closed, not left open
    still_serving(proxy, peer)
    assert escaped(log) == []


@pytest.mark.parametrize("where", ["before the block", "inside the block"])
def test_upstream_reset_mid_stream_ends_in_an_error_event_and_leaks_nothing(
        where: str, raw_upstream: Callable[..., RawUpstream], settings_for: Callable[..., Settings],
        start_proxy: Callable[..., str], log: pytest.LogCaptureFixture) -> None:
    events = [delta("Hi"), delta(" there!")]
    if where == "inside the block":
        events += [delta("\n<memo"), delta('ry>\n[{"text": "User is Hal'), delta('"}]')]
    peer = raw_upstream(sse_answer(events, end="reset", finish=False))
    proxy = start_proxy(settings_for(peer.url))
    with openai.OpenAI(base_url=proxy + "/v1", api_key="k", max_retries=0) as sdk:
        seen = ""
        with pytest.raises(openai.APIError) as caught:
            for chunk in sdk.chat.completions.create(**CHAT, stream=True, extra_headers=ALICE):  # type: ignore
                seen += "".join(choice.delta.content or "" for choice in chunk.choices)
    assert seen == "Hi there!" and "upstream broke off" in str(caught.value.message)
    response = httpx.get(proxy + "/memories/alice")
    assert response.json()["data"] == []  # half a block is never stored
    still_serving(proxy, peer)
    assert escaped(log) == []


GARBAGE = [b"", b"not json at all", b"\xff\xfe\x00 binary", b"null", b"[1, 2]", b'{"choices": 5}',
           b'{"choices": [null, 3, {"message": 7}, {"message": {"content": 9}}]}', b'{"choices": [{}]}']


@pytest.mark.parametrize("body", GARBAGE)
def test_upstream_garbage_answer_is_handed_over_as_it_came(body: bytes, raw_upstream: Callable[..., RawUpstream],
                                                           settings_for: Callable[..., Settings],
                                                           start_proxy: Callable[..., str],
                                                           log: pytest.LogCaptureFixture) -> None:
    peer = raw_upstream(http_answer(body))
    proxy = start_proxy(settings_for(peer.url))
    response = httpx.post(proxy + "/v1/chat/completions", json=CHAT, headers=ALICE)
    assert response.status_code == 200  # the client sees what the model said: the same bytes, or the same JSON
    assert response.content == body or orjson.loads(response.content) == orjson.loads(body)
    still_serving(proxy, peer)
    assert escaped(log) == []


def test_upstream_garbage_stream_is_passed_on_and_nothing_is_stored(raw_upstream: Callable[..., RawUpstream],
                                                                    settings_for: Callable[..., Settings],
                                                                    start_proxy: Callable[..., str],
                                                                    log: pytest.LogCaptureFixture) -> None:
    events = [b"data: {not json\n\n", b"\xff\xfe\xfd\n\n", b"event: odd\ndata: 12\n\n", b": comment\n\n",
              b'data: {"choices": "x"}\n\n', b'data: {"choices": [{"delta": {"content": 5}}]}\n\n',
              delta('<memory>[{"text": "User is garbage"}]'), b"data: [DONE]\n\n", b"data: after done\n\n"]
    peer = raw_upstream(sse_answer(events))
    proxy = start_proxy(settings_for(peer.url))
    response = httpx.post(proxy + "/v1/chat/completions", json={**CHAT, "stream": True}, headers=ALICE)
    assert response.status_code == 200
    assert b"data: {not json" in response.content and b"data: after done" in response.content
    assert b"<memory" not in response.content and b"garbage" not in response.content  # unclosed: never shown
    still_serving(proxy, peer)
    assert escaped(log) == []


@pytest.mark.parametrize("answer", [b"HELLO THERE\r\n\r\n", b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n", b""])
def test_upstream_speaking_no_http_is_502(answer: bytes, raw_upstream: Callable[..., RawUpstream],
                                          settings_for: Callable[..., Settings], start_proxy: Callable[..., str],
                                          log: pytest.LogCaptureFixture) -> None:
    peer = raw_upstream(Answer([answer]) if answer else Answer(end="reset"))
    proxy = start_proxy(settings_for(peer.url))
    response = httpx.post(proxy + "/v1/chat/completions", json=CHAT, headers=ALICE)
    assert response.status_code == 502 and error_of(response)["type"] == "upstream_error"
    still_serving(proxy, peer)
    assert escaped(log) == []


# --- the database fails ----------------------------------------------------------------------------------------

def block(text: str) -> str:
    return f'\n<memory>[{{"text": "{text}"}}]</memory>'


@contextmanager
def proxy_app(settings: Settings, **options: Any) -> Iterator[tuple[str, Any]]:
    """A real proxy server and its app (whose state tells how many memory writes failed)."""
    app = create_app(settings, **options)
    with running(app) as url:
        yield url, app


def memory_texts(proxy: str, user: str = "alice") -> list[str]:
    response = httpx.get(f"{proxy}/memories/{user}")
    assert response.status_code == 200
    return sorted(memory["text"] for memory in response.json()["data"])


def remember_directly(proxy: str, text: str) -> None:
    """A memory acknowledged by the API (201): it must survive whatever comes next."""
    response = httpx.post(proxy + "/memories/alice", json={"text": text})
    assert response.status_code == 201, response.text


def chat_through_fault(proxy: str, app: Any, fake: FakeUpstream, log: pytest.LogCaptureFixture, cause: str) -> None:
    """With the store failing writes: the chat answers (recall still works: reads are unaffected), its block
    stays hidden, the write waits in the queue with its cause in the log (once), and the API says so in OpenAI's
    shape."""
    fake.reply("Try a mushroom risotto." + block("User lives in Lisbon"))
    response = httpx.post(proxy + "/v1/chat/completions", json=CHAT, headers=ALICE)
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "Try a mushroom risotto."
    assert response.headers["x-memory-recalled"] == "1" and "x-memory-error" not in response.headers
    memories = app.state.memories
    assert wait_for(lambda: memories.waiting == 1 and cause in memories.down)
    failures = [r.getMessage() for r in log.records if r.name == "memory_proxy.memories"]
    assert len(failures) == 1 and cause in failures[0] and "wait to be retried" in failures[0]
    assert memories.failed == 0 and memories.dropped == 0
    refused = httpx.post(proxy + "/memories/alice", json={"text": "User has a cat"})
    assert refused.status_code == 503 and cause in error_of(refused)["message"]
    assert memory_texts(proxy) == ["User is vegetarian"]  # acknowledged before: intact


def waited_write_lands(proxy: str) -> None:
    """Once the store is back, the write that waited is stored without anything being sent again."""
    assert wait_for(lambda: len(memory_texts(proxy)) == 2)
    assert memory_texts(proxy) == ["User is vegetarian", "User lives in Lisbon"]


def chat_after_recovery(proxy: str, fake: FakeUpstream) -> None:
    fake.reply("Lisbon it is." + block("User lives in Lisbon"))
    assert httpx.post(proxy + "/v1/chat/completions", json=CHAT, headers=ALICE).status_code == 200
    assert wait_for(lambda: len(memory_texts(proxy)) == 2)
    time.sleep(0.3)  # the same fact again: deduplicated, not a third memory
    assert memory_texts(proxy) == ["User is vegetarian", "User lives in Lisbon"]


def check_file(path: Path) -> None:
    """The database opens cleanly with the store's own code and passes SQLite's integrity check."""
    async def check() -> str:
        store = await SqliteStore.open(str(path), dimension=DIMENSION, dedupe_similarity=0.9)
        try:
            return str(await store.read(lambda conn: conn.execute("PRAGMA integrity_check").fetchone()[0]))
        finally:
            await store.close()

    assert asyncio.run(check()) == "ok"


def test_database_locked_by_another_writer(upstream: tuple[FakeUpstream, str], settings_for: Callable[..., Settings],
                                           tmp_path: Path, log: pytest.LogCaptureFixture) -> None:
    fake, url = upstream
    path = tmp_path / "memory.db"
    # The store as `serve` opens it, with a short busy timeout so the test does not wait the default 5 s.
    store = asyncio.run(SqliteStore.open(str(path), dimension=DIMENSION, dedupe_similarity=0.9, busy_timeout=0.2))
    try:
        with proxy_app(settings_for(url), store=store) as (proxy, app):
            remember_directly(proxy, "User is vegetarian")
            other = db.connect(str(path), isolation_level=None)
            try:
                other.execute("BEGIN IMMEDIATE")  # another process holds the write lock, past the busy timeout
                other.execute("INSERT INTO meta (key, value) VALUES ('held', 'by another writer')")
                chat_through_fault(proxy, app, fake, log, "locked")
            finally:
                other.execute("ROLLBACK")
                other.close()
            waited_write_lands(proxy)
            chat_after_recovery(proxy, fake)
    finally:
        asyncio.run(store.close())
    assert unhandled(log) == []
    check_file(path)


def mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
    if done.returncode:
        pytest.skip(f"cannot mount here (needs root and CAP_SYS_ADMIN): {done.stderr.strip()}")


def unmount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def test_database_read_only(upstream: tuple[FakeUpstream, str], settings_for: Callable[..., Settings],
                            tmp_path: Path, log: pytest.LogCaptureFixture) -> None:
    """A second proxy sees the database through a read-only mount (as root, chmod would not stop a write)."""
    fake, url = upstream
    data, view = tmp_path / "data", tmp_path / "view"
    view.mkdir()
    with proxy_app(settings_for(url, db=str(data / "memory.db"))) as (writer, _):
        remember_directly(writer, "User is vegetarian")
        mount("--bind", str(data), str(view))
        try:
            mount("-o", "remount,bind,ro", str(view))
            with proxy_app(settings_for(url, db=str(view / "memory.db"))) as (proxy, app):
                assert memory_texts(proxy) == ["User is vegetarian"]
                chat_through_fault(proxy, app, fake, log, "read-only")
                assert httpx.get(proxy + "/readyz").status_code == 200
        finally:
            unmount(view)
        chat_after_recovery(writer, fake)
    assert unhandled(log) == []
    check_file(data / "memory.db")


def test_disk_full(upstream: tuple[FakeUpstream, str], settings_for: Callable[..., Settings], tmp_path: Path,
                   log: pytest.LogCaptureFixture) -> None:
    """The database on a tiny tmpfs, filled up by another file until the disk is out of space."""
    fake, url = upstream
    disk = tmp_path / "disk"
    disk.mkdir()
    mount("-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk))
    try:
        with proxy_app(settings_for(url, db=str(disk / "memory.db"))) as (proxy, app):
            remember_directly(proxy, "User is vegetarian")
            filler = disk / "filler"
            with filler.open("wb", buffering=0) as f, pytest.raises(OSError, match="No space left"):
                for _ in range(1024):  # bounded: 2 MiB of disk is gone long before 16 MiB are written
                    f.write(b"\0" * 16384)
            chat_through_fault(proxy, app, fake, log, "full")
            filler.unlink()
            waited_write_lands(proxy)
            chat_after_recovery(proxy, fake)
        shutil.copy(disk / "memory.db", tmp_path / "memory.db")  # closed: the WAL is checkpointed into the file
    finally:
        unmount(disk)
    assert unhandled(log) == []
    check_file(tmp_path / "memory.db")


# --- the model is missing or corrupt at start --------------------------------------------------------------------

def bad_model_dir(tmp_path: Path, kind: str) -> Path:
    model = tmp_path / "model"
    if kind == "missing":
        return model
    model.mkdir()
    shutil.copy(ROOT / "proxy" / "data" / "tokenizer.json", model / "tokenizer.json")
    if kind == "corrupt":
        (model / "model.onnx").write_bytes(b"\x08\x07" + os.urandom(4096))  # truncated garbage, not a graph
    return model


@pytest.mark.parametrize(("kind", "says"), [("missing", "embedding model directory not found"),
                                            ("no model file", "embedding model not found"),
                                            ("corrupt", "cannot be loaded")])
def test_serve_with_a_bad_model_exits_with_one_clear_line(kind: str, says: str, tmp_path: Path) -> None:
    env = {**os.environ, "MEMORY_PROXY_MODEL_DIR": str(bad_model_dir(tmp_path, kind)),
           "MEMORY_PROXY_DATA_DIR": str(tmp_path / "data"), "PYTHONPATH": str(ROOT)}
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    with port:
        args = ["--port", str(port.getsockname()[1]), "--upstream", "http://127.0.0.1:9/v1"]
    done = subprocess.run([sys.executable, "-m", "proxy", "serve", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    assert len([line for line in done.stderr.splitlines() if says in line]) == 1, done.stderr


# --- the client leaves ------------------------------------------------------------------------------------------

SLOW = 0.05  # seconds between the upstream's events
LONG = 400  # events of a long answer: 20 s if nobody hangs up, so a prompt hang-up proves the proxy closed it


def content_of(line: str) -> str:
    if not line.startswith("data: {"):
        return ""
    return "".join(choice["delta"].get("content") or "" for choice in orjson.loads(line[6:])["choices"])


@pytest.mark.parametrize("stream", [False, True])
def test_client_leaving_before_the_upstream_answers(stream: bool, raw_upstream: Callable[..., RawUpstream],
                                                    settings_for: Callable[..., Settings],
                                                    start_proxy: Callable[..., str],
                                                    log: pytest.LogCaptureFixture) -> None:
    peer = raw_upstream(Answer(end="hang"))  # the model thinks for 30 s
    proxy = start_proxy(settings_for(peer.url))
    with pytest.raises(httpx.ReadTimeout):  # the client gives up after half a second, as impatient apps do
        httpx.post(proxy + "/v1/chat/completions", json={**CHAT, "stream": stream}, headers=ALICE,
                   timeout=httpx.Timeout(5, read=0.5))
    assert len(peer.requests) == 1
    assert wait_for(lambda: peer.hung_up == 1, 5)  # the proxy stopped waiting for the model too
    still_serving(proxy, peer)
    assert escaped(log) == []


def leave_when(proxy: str, seen_enough: Callable[[str], bool]) -> str:
    """Stream a chat and hang up as soon as `seen_enough(text so far)`; the text seen."""
    seen = ""
    with httpx.Client(timeout=10) as client, \
            client.stream("POST", proxy + "/v1/chat/completions", json={**CHAT, "stream": True},
                          headers=ALICE) as response:
        for line in response.iter_lines():
            seen += content_of(line)
            if seen_enough(seen):
                return seen
    raise AssertionError(f"the stream ended before the client meant to leave: {seen!r}")


def test_client_leaving_mid_stream_before_the_block(raw_upstream: Callable[..., RawUpstream],
                                                     settings_for: Callable[..., Settings],
                                                     start_proxy: Callable[..., str],
                                                     log: pytest.LogCaptureFixture) -> None:
    events = [delta("Hello."), *[delta(" word") for _ in range(LONG)], delta(block("User is Hal"))]
    peer = raw_upstream(sse_answer(events, gap=SLOW))
    proxy = start_proxy(settings_for(peer.url))
    assert leave_when(proxy, lambda seen: "word word" in seen).startswith("Hello. word word")
    assert wait_for(lambda: peer.hung_up == 1, 5)
    time.sleep(0.2)  # a write, were one queued, would land now
    assert memory_texts(proxy) == []
    still_serving(proxy, peer)
    assert escaped(log) == []


def test_client_leaving_mid_block(raw_upstream: Callable[..., RawUpstream], settings_for: Callable[..., Settings],
                                  start_proxy: Callable[..., str], log: pytest.LogCaptureFixture) -> None:
    events = [delta("Hello."), delta('\n<memory>[{"text": "User is'), *[delta(" very") for _ in range(LONG)],
              delta(' Hal"}]</memory>')]
    peer = raw_upstream(sse_answer(events, gap=SLOW))
    proxy = start_proxy(settings_for(peer.url))

    def inside_block(seen: str) -> bool:
        return seen == "Hello." and wait_for(lambda: peer.sent >= 6, 5)  # head, Hello, block start, some more

    assert leave_when(proxy, inside_block) == "Hello."
    assert wait_for(lambda: peer.hung_up == 1, 5)
    time.sleep(0.2)
    assert memory_texts(proxy) == []  # half a block is not a memory
    still_serving(proxy, peer)
    assert escaped(log) == []


def test_client_leaving_after_the_block_keeps_the_fact(raw_upstream: Callable[..., RawUpstream],
                                                       settings_for: Callable[..., Settings],
                                                       start_proxy: Callable[..., str],
                                                       log: pytest.LogCaptureFixture) -> None:
    events = [delta("Hello."), delta(block("User is Hal")), *[delta(" More") for _ in range(LONG)]]
    peer = raw_upstream(sse_answer(events, gap=SLOW))
    proxy = start_proxy(settings_for(peer.url))
    assert leave_when(proxy, lambda seen: "More" in seen) == "Hello. More"
    assert wait_for(lambda: peer.hung_up == 1, 5)
    assert wait_for(lambda: memory_texts(proxy) == ["User is Hal"])
    still_serving(proxy, peer)
    assert escaped(log) == []
