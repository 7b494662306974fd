"""SIGKILL while writing: every memory the API acknowledged (201) is in the database afterwards, which opens cleanly.

Why it holds: the store's single writer thread runs each write in its own transaction and COMMITs before it
resolves the future the request awaits, so a 201 is only ever sent after the commit (proxy/store/sqlite.py,
Writer.run). The database is in WAL mode with `synchronous = NORMAL`: a commit is a write() of its frames to the
-wal file, which then sits in the OS page cache. Killing the process cannot take those pages back, so a SIGKILL
loses nothing acknowledged; only an OS crash or power cut before the next checkpoint's fsync could drop the last
commits (never corrupt the file). `synchronous = FULL` would close that gap at the cost of an fsync per write.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from proxy.models import NewMemory
from proxy.store.sqlite import SqliteStore, db

ROOT = Path(__file__).resolve().parent.parent
WRITERS = 16
ROUNDS = 2  # the second round starts on the file the first one was killed over: recovery, then more kills


@contextmanager
def serve(path: Path, home: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`python -m proxy serve` on the SQLite file `path`, until the block ends (or the test kills it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "HOME": str(home), "MEMORY_PROXY_LOG_LEVEL": "warning", "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-m", "proxy", "serve", "--port", str(port), "--db", str(path),
            "--upstream", "http://127.0.0.1:9/v1"]
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "memory-proxy serve exited at start"
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "memory-proxy serve did not become ready"
            time.sleep(0.05)
        yield url, proc
    finally:
        proc.kill()
        proc.wait(10)


class Writers:
    """Threads that POST one memory after another, each to a user of its own (so no dedupe merges two), and
    record what was acknowledged."""

    def __init__(self, url: str, tag: str) -> None:
        self.url, self.tag = url, tag
        self.acked: list[tuple[str, str, str]] = []  # (user, id, text)
        self.in_flight = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.write, args=(n,), daemon=True) for n in range(WRITERS)]

    def write(self, writer: int) -> None:
        with httpx.Client(timeout=10) as client:
            for turn in range(10_000):  # bounded; the kill or `stop` ends it long before
                if self.stop.is_set():
                    return
                user, text = f"{self.tag}-w{writer}-t{turn}", f"Fact {turn} told to writer {writer} in {self.tag}"
                with self.lock:
                    self.in_flight += 1
                try:
                    response = client.post(f"{self.url}/memories/{user}", json={"text": text})
                except httpx.HTTPError:
                    return  # the server is gone
                finally:
                    with self.lock:
                        self.in_flight -= 1
                if response.status_code in (200, 201):  # created, or a near-duplicate updated
                    with self.lock:
                        self.acked += [(user, m["id"], m["text"]) for m in response.json()["data"]]

    def __enter__(self) -> Writers:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=15)


async def stored(path: Path, acked: list[tuple[str, str, str]]) -> tuple[str, list[tuple[str, str, str]]]:
    """The integrity check of the file, and the acknowledged memories missing from it (or changed)."""
    store = await SqliteStore.open(str(path), dimension=384, dedupe_similarity=0.9)
    try:
        check = await store.read(lambda conn: str(conn.execute("PRAGMA integrity_check").fetchone()[0]))
        missing = [(user, mid, text) for user, mid, text in acked
                   if getattr(await store.get(user, mid), "text", None) != text]
        return check, missing
    finally:
        await store.close()


def test_sigkill_mid_writes_loses_no_acknowledged_memory(tmp_path: Path) -> None:
    path = tmp_path / "memory.db"
    acked: list[tuple[str, str, str]] = []
    for round_ in range(ROUNDS):
        with serve(path, tmp_path) as (url, proc), Writers(url, f"r{round_}") as writers:
            deadline = time.monotonic() + 60
            # Kill once a good number are acknowledged, at a moment when several more are on their way.
            while not (len(writers.acked) >= 100 and writers.in_flight >= 4):
                assert time.monotonic() < deadline, f"too slow: {len(writers.acked)} acknowledged"
                time.sleep(0.002)
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(10) == -signal.SIGKILL
        acked += writers.acked
        check, missing = asyncio.run(stored(path, acked))
        assert check == "ok"
        assert missing == [], f"{len(missing)} of {len(acked)} acknowledged memories lost"
    assert len(acked) >= 100 * ROUNDS


def test_a_write_is_committed_before_it_returns(tmp_path: Path) -> None:
    """What the 201 rests on: when `add` returns, another connection already sees the row; and the settings the
    module docstring reasons from are the ones in force."""
    import numpy as np

    path = tmp_path / "memory.db"

    async def scenario() -> tuple[str, int, int]:
        store = await SqliteStore.open(str(path), dimension=8, dedupe_similarity=0.9)
        try:
            [memory] = await store.add("u", [NewMemory("Likes tea")], np.ones((1, 8), dtype=np.float32))
            other = db.connect(str(path))
            try:
                seen = other.execute("SELECT count(*) FROM memories WHERE id = ?", (memory.id,)).fetchone()[0]
            finally:
                other.close()
            mode, sync = await asyncio.wrap_future(store.writer.submit(lambda conn: (
                conn.execute("PRAGMA journal_mode").fetchone()[0], conn.execute("PRAGMA synchronous").fetchone()[0])))
            return str(mode), int(sync), int(seen)
        finally:
            await store.close()

    mode, sync, seen = asyncio.run(scenario())
    assert seen == 1
    assert mode == "wal" and sync == 1  # 1 = NORMAL: safe against a process kill, as the docstring explains
