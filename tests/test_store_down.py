"""Issue 17, section 5: the store disappears under a running proxy.

- The SQLite file deleted or replaced while serving: writes fail with 503 and /readyz says not ready (before the
  fix both said all was well, and the writes vanished at the next start).
- PostgreSQL down for a few seconds under chat traffic: the memories the chats produce wait in the write queue
  and are all stored, once each, when it is back.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from psycopg_pool import PoolTimeout

from proxy.app import create_app
from proxy.config import Settings
from proxy.embed import HashEmbedder
from proxy.errors import StoreError, StoreUnavailable
from proxy.store.postgres import describe
from tests.fakeupstream import FakeUpstream
from tests.pgserver import PostgresServer, binaries, ensure_os_user, run, running_postgres
from tests.servers import running

Upstream = tuple[FakeUpstream, str]
ALICE = {"x-memory-user": "alice"}
WORD_LIST = ("amber basil cobalt dahlia ember fennel garnet hazel indigo juniper kestrel lilac maple nutmeg onyx "
             "pepper "
             "quartz rowan saffron tamarind umber violet willow yarrow zinnia acorn birch cedar dune elm fjord grove "
             "heath iris jade kelp lotus moss nettle oak")
WORDS = WORD_LIST.split()


def fact(number: int) -> str:
    return f"User collects {WORDS[number]} and {WORDS[number + 16]} stamps"  # 24 facts, no two near-duplicates


def chat(proxy: str, fake: FakeUpstream, number: int) -> None:
    fake.reply("Noted." + '\n<memory>\n[{"text": "' + fact(number) + '"}]\n</memory>')
    response = httpx.post(proxy + "/v1/chat/completions", headers=ALICE, timeout=60,
                          json={"model": "m", "messages": [{"role": "user", "content": f"message {number}"}]})
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == "Noted."


def stored(proxy: str) -> list[str]:
    response = httpx.get(proxy + "/memories/alice", params={"limit": 1000}, timeout=30)
    assert response.status_code == 200, response.text
    return sorted(m["text"] for m in response.json()["data"])


@pytest.fixture
def sqlite_proxy(upstream: Upstream, settings_for: Callable[..., Settings],
                 tmp_path: Path) -> Iterator[tuple[str, Path]]:
    path = tmp_path / "data" / "memory.db"
    with running(create_app(settings_for(upstream[1], db=str(path)), embedder=HashEmbedder())) as proxy:
        yield proxy, path


def test_a_deleted_database_fails_writes_and_readiness(sqlite_proxy: tuple[str, Path]) -> None:
    proxy, path = sqlite_proxy
    assert httpx.post(proxy + "/memories/alice", json={"text": "User is vegetarian"}).status_code == 201
    assert httpx.get(proxy + "/readyz").status_code == 200
    for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        name.unlink(missing_ok=True)
    refused = httpx.post(proxy + "/memories/alice", json={"text": "User has a cat"})
    assert refused.status_code == 503 and "deleted" in refused.json()["error"]["message"]
    ready = httpx.get(proxy + "/readyz")
    assert ready.status_code == 503 and ready.json()["status"] == "store-unavailable"
    assert ready.json()["parts"]["store"] is False and "deleted" in ready.json()["problem"]
    assert httpx.get(proxy + "/healthz").status_code == 200  # alive: a restart, not a kill loop, mends it


def test_a_replaced_database_fails_writes_and_readiness(sqlite_proxy: tuple[str, Path]) -> None:
    proxy, path = sqlite_proxy
    assert httpx.post(proxy + "/memories/alice", json={"text": "User is vegetarian"}).status_code == 201
    shutil.copy(path, path.with_suffix(".restored"))
    os.replace(path.with_suffix(".restored"), path)  # a restore over the open file: a new inode at the same path
    refused = httpx.post(proxy + "/memories/alice", json={"text": "User has a cat"})
    assert refused.status_code == 503 and "replaced" in refused.json()["error"]["message"]
    assert httpx.get(proxy + "/readyz").status_code == 503


def test_postgres_faults_that_pass_are_told_apart() -> None:
    url = "postgresql://u:secret@db/x"
    assert isinstance(describe(url, PoolTimeout("no connection")), StoreUnavailable)
    assert isinstance(describe(url, psycopg.OperationalError("server closed the connection")), StoreUnavailable)
    lasting = describe(url, psycopg.errors.UndefinedTable("relation does not exist"))
    assert isinstance(lasting, StoreError) and not isinstance(lasting, StoreUnavailable)
    assert "secret" not in lasting.message


def pg_ctl(server: PostgresServer, *args: str) -> None:
    account = ensure_os_user() if os.geteuid() == 0 else None
    run([str(binaries() / "pg_ctl"), "-D", str(server.root / "data"), "-l", str(server.root / "server.log"), "-w",
         "-t", "60", *args], account, server.root, timeout=90)


def test_postgres_down_under_chat_traffic_loses_no_fact(upstream: Upstream,
                                                        settings_for: Callable[..., Settings]) -> None:
    fake, url = upstream
    with running_postgres() as server:
        database = server.create_database("down")
        app = create_app(settings_for(url, db=database), embedder=HashEmbedder())
        with running(app) as proxy:
            for number in range(6):  # the store is up
                chat(proxy, fake, number)
            traffic_done = threading.Event()
            errors: list[BaseException] = []

            def traffic() -> None:  # chats go on while the server is stopped and started again
                try:
                    for number in range(6, 18):
                        chat(proxy, fake, number)
                        time.sleep(0.25)
                except BaseException as exc:  # reported by the test thread
                    errors.append(exc)
                finally:
                    traffic_done.set()

            pg_ctl(server, "-m", "fast", "stop")
            thread = threading.Thread(target=traffic)
            thread.start()
            time.sleep(3)
            pg_ctl(server, "-o", f"-p {server.port}", "start")
            thread.join(timeout=120)
            assert traffic_done.is_set() and not errors, errors
            for number in range(18, 24):  # and it is up again
                chat(proxy, fake, number)
            memories = app.state.memories
            deadline = time.monotonic() + 60
            while (len(stored(proxy)) < 24 or memories.waiting) and time.monotonic() < deadline:
                time.sleep(0.2)
            found = stored(proxy)
            missing = [number for number in range(24) if fact(number) not in found]
            assert not missing and len(found) == 24, missing  # every fact, once
            assert memories.dropped == 0 and memories.failed == 0


def test_past_the_queue_bound_writes_are_dropped_counted_and_logged(upstream: Upstream,
                                                                    settings_for: Callable[..., Settings],
                                                                    tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    import asyncio

    from proxy.store.sqlite import SqliteStore, db

    fake, url = upstream
    path = tmp_path / "memory.db"
    store = asyncio.run(SqliteStore.open(str(path), dimension=256, dedupe_similarity=0.9, busy_timeout=0.2))
    app = create_app(settings_for(url, write_queue=2), store=store, embedder=HashEmbedder())
    try:
        with running(app) as proxy:
            other = db.connect(str(path), isolation_level=None)
            other.execute("BEGIN IMMEDIATE")  # another process holds the write lock: the store is down
            memories = app.state.memories
            chat(proxy, fake, 0)
            deadline = time.monotonic() + 10
            while memories.waiting != 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert memories.waiting == 1  # the writer holds it, retrying
            for number in range(1, 6):
                chat(proxy, fake, number)
            assert memories.dropped == 3 and memories.queue.qsize() == 2  # two wait in the queue, three dropped
            full = [r.getMessage() for r in caplog.records if "queue is full" in r.getMessage()]
            assert len(full) == 3 and all("the store is down" in message for message in full)
            other.execute("ROLLBACK")
            other.close()
            deadline = time.monotonic() + 30
            while len(stored(proxy)) < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert stored(proxy) == sorted(fact(number) for number in range(3))  # in order, the dropped ones not
    finally:
        asyncio.run(store.close())
