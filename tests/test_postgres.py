"""PostgreSQL beyond the shared store suite: many instances on one database, migrations, `memory-proxy migrate`.

Everything runs against a real PostgreSQL 18 + pgvector (tests/pgserver.py); the end-to-end tests run two real
`memory-proxy serve` processes (real ONNX model) in front of one fake upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import psycopg
import pytest

from proxy.cli import main
from proxy.errors import StoreError
from proxy.migrate import PostgresEndpoint
from proxy.models import NewMemory
from proxy.store import open_store
from proxy.store.postgres import MIGRATIONS, PostgresStore
from proxy.store.sqlite import SqliteStore
from tests.fakeupstream import FakeUpstream
from tests.pgserver import Databases, PostgresServer, postgres_databases, postgres_location, postgres_server
from tests.servers import free_port, running
from tests.test_store import BASIS, DEDUPE, DIM, QUERY, near, random_units, stack, toward

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = (postgres_server, postgres_databases, postgres_location)  # the shared server, a fresh database per test


async def open_pg(url: str, dimension: int = DIM) -> PostgresStore:
    return await PostgresStore.open(url, dimension=dimension, dedupe_similarity=DEDUPE)


# --- schema and concurrency, store level ----------------------------------------------------------------------

async def test_instances_starting_together_migrate_once(postgres_location: str) -> None:
    stores = await asyncio.gather(*(open_pg(postgres_location) for _ in range(6)))
    try:
        async with await psycopg.AsyncConnection.connect(postgres_location) as conn:
            versions = await (await conn.execute("SELECT version FROM memory_schema_version ORDER BY 1")).fetchall()
        assert [v for (v,) in versions] == list(range(1, len(MIGRATIONS) + 1))
        await stores[0].add("alice", [NewMemory("likes tea")], stack(BASIS[1]))
        assert [await store.count("alice") for store in stores] == [1] * 6
    finally:
        for store in stores:
            await store.close()


async def test_a_newer_schema_is_refused(postgres_location: str) -> None:
    await (await open_pg(postgres_location)).close()
    async with await psycopg.AsyncConnection.connect(postgres_location, autocommit=True) as conn:
        await conn.execute("INSERT INTO memory_schema_version (version) VALUES (%s)", (len(MIGRATIONS) + 1,))
    with pytest.raises(StoreError, match="newer"):
        await open_pg(postgres_location)


async def test_a_role_without_create_rights_uses_the_schema_an_admin_made(postgres_location: str) -> None:
    """Deployments often run the proxy as a plain role: once an admin's first start made the schema (or the
    extension), later starts need no CREATE right at all; without the extension the error says what to do."""
    app_url = postgres_location.replace("postgresql://postgres@", "postgresql://memory_app@")
    async with await psycopg.AsyncConnection.connect(postgres_location, autocommit=True) as conn:
        await conn.execute("DO $$ BEGIN CREATE ROLE memory_app LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; "
                           "END $$")
        await conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
    with pytest.raises(StoreError, match="permission denied"):
        await open_pg(app_url)
    await (await open_pg(postgres_location)).close()  # the admin's first start
    async with await psycopg.AsyncConnection.connect(postgres_location, autocommit=True) as conn:
        await conn.execute("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO memory_app")
    store = await open_pg(app_url)
    try:
        await store.add("alice", [NewMemory("likes tea")], stack(BASIS[1]))
        assert [h.memory.text for h in await store.search("alice", BASIS[1], k=1)] == ["likes tea"]
    finally:
        await store.close()


async def test_many_near_ties_still_give_the_newest(postgres_location: str) -> None:
    """Search fetches k + EXTRA rows; when even the last of them ties with the k-th best, it fetches every tie,
    so the newest still win however many memories score alike."""
    store = await open_pg(postgres_location)
    try:
        ids = [(await store.add("alice", [NewMemory(f"tie {n}")], stack(toward(n + 1, 0.6))))[0].id for n in range(12)]
        await store.add("alice", [NewMemory("weaker")], stack(toward(20, 0.5)))
        assert [h.memory.id for h in await store.search("alice", QUERY, k=3)] == ids[::-1][:3]
        await store.update("alice", ids[0], text="tie 0, restated")  # now the most recently updated
        assert [h.memory.id for h in await store.search("alice", QUERY, k=2)] == [ids[0], ids[-1]]
    finally:
        await store.close()


async def test_large_vectors_work(postgres_location: str) -> None:
    """A 1,024-d model's vectors (4 KB, stored out of line by PostgreSQL) are stored and searched alike."""
    store = await open_pg(postgres_location, dimension=1024)
    try:
        vectors = np.random.default_rng(3).standard_normal((3, 1024)).astype(np.float32)
        await store.add("alice", [NewMemory(f"fact {n}") for n in range(3)], vectors)
        assert [h.memory.text for h in await store.search("alice", vectors[1], k=1)] == ["fact 1"]
    finally:
        await store.close()


async def test_an_unreachable_server_is_a_store_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there once the socket is closed
    with pytest.raises(StoreError, match="cannot reach") as caught:
        await open_store(f"postgresql://someone:secret@127.0.0.1:{port}/nothing", dimension=DIM)
    assert "secret" not in caught.value.message


async def test_the_same_fact_through_two_instances_is_stored_once(postgres_location: str) -> None:
    """Two stores with pools of their own act as two proxy processes; every round sends near-duplicates of one
    fact through both at the same moment. The per-user advisory lock lets exactly one of each round insert."""
    first, second = await open_pg(postgres_location), await open_pg(postgres_location)
    try:
        for round_ in range(8):
            user = f"user-{round_}"
            writes = [(first if n % 2 else second).add(user, [NewMemory(f"has a dog ({n})")],
                                                       stack(near(BASIS[1], 0.99, n + 2)))
                      for n in range(8)]
            stored = await asyncio.gather(*writes)
            assert len({memory.id for [memory] in stored}) == 1
            assert await first.count(user) == 1 and await second.count(user) == 1
        distinct = await asyncio.gather(*((first, second)[n % 2].add("zed", [NewMemory(f"fact {n}")], stack(v))
                                          for n, v in enumerate(random_units(12, seed=9))))
        assert len({memory.id for [memory] in distinct}) == 12 and await second.count("zed") == 12
    finally:
        await first.close()
        await second.close()


async def test_one_instance_sees_the_others_writes_at_once(postgres_location: str) -> None:
    writer, reader = await open_pg(postgres_location), await open_pg(postgres_location)
    try:
        [kept] = await writer.add("alice", [NewMemory("likes tea")], stack(toward(1, 0.5)))
        [gone] = await writer.add("alice", [NewMemory("likes coffee")], stack(toward(2, 0.9)))
        assert [h.memory.id for h in await reader.search("alice", QUERY, k=5)] == [gone.id, kept.id]
        assert await writer.forget("alice", gone.id)
        assert [h.memory.id for h in await reader.search("alice", QUERY, k=5)] == [kept.id]
    finally:
        await writer.close()
        await reader.close()


# --- memory-proxy migrate --------------------------------------------------------------------------------------

async def fill(store: Any) -> None:
    """Memories of two users with history, an expiry and a near-tie, written through the store's own API."""
    old = (await store.add("alice", [NewMemory("lives in Paris", category="context")], stack(BASIS[1])))[0].id
    await store.add("alice", [NewMemory("lives in Rome", replaces=old, ttl_seconds=3600)], stack(toward(2, 0.6)))
    await store.add("alice", [NewMemory(f"fact {n}", source="chat") for n in range(30)], random_units(30, seed=5))
    await store.add("bob", [NewMemory("likes jazz"), NewMemory("is in a meeting", ttl_seconds=3600)],
                    stack(BASIS[3], BASIS[4]))


async def snapshot(store: Any) -> dict[str, Any]:
    """Everything a client can see: every row with its history, and what recall returns with its scores."""
    rows = {user: await store.list(user, limit=1000, include_history=True) for user in ("alice", "bob")}
    hits = {user: await store.search(user, QUERY, k=8) for user in ("alice", "bob")}
    return {"rows": rows, "recalled": {user: [h.memory for h in found] for user, found in hits.items()},
            "scores": {user: [h.score for h in found] for user, found in hits.items()}, "count": await store.count()}


def same(seen: dict[str, Any], expected: dict[str, Any]) -> bool:
    """Equal, scores within float32 rounding (SQLite scores in numpy, PostgreSQL in pgvector)."""
    scores_match = all(seen["scores"][user] == pytest.approx(scores, abs=1e-5)
                       for user, scores in expected["scores"].items())
    return scores_match and {**seen, "scores": None} == {**expected, "scores": None}


def migrate(capsys: pytest.CaptureFixture[str], source: str, target: str) -> str:
    assert main(["migrate", "--from", source, "--to", target, "--batch", "7"]) == 0
    return capsys.readouterr().out


def test_migrate_sqlite_to_postgres_and_back(postgres_location: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    async def prepare() -> dict[str, Any]:
        store = await SqliteStore.open(str(tmp_path / "old.db"), dimension=DIM, dedupe_similarity=DEDUPE)
        await fill(store)
        seen = await snapshot(store)
        await store.close()
        return seen

    async def look(url: str) -> dict[str, Any]:
        store = await open_store(url, dimension=DIM, dedupe_similarity=DEDUPE)
        try:
            return await snapshot(store)
        finally:
            await store.close()

    original = asyncio.run(prepare())
    assert len(original["rows"]["alice"]) == 32 and original["count"] == 33 and len(original["recalled"]["alice"]) == 8
    old = f"sqlite://{tmp_path / 'old.db'}"
    out = migrate(capsys, old, postgres_location)
    assert "34 memories of 2 users read, 34 written, 0 already there" in out
    assert same(asyncio.run(look(postgres_location)), original)
    assert "0 written, 34 already there" in migrate(capsys, old, postgres_location)  # idempotent
    assert same(asyncio.run(look(postgres_location)), original)

    out = migrate(capsys, postgres_location, str(tmp_path / "new" / "copy.db"))
    assert "34 written" in out
    assert same(asyncio.run(look(str(tmp_path / "new" / "copy.db"))), original)
    assert "0 written, 34 already there" in migrate(capsys, postgres_location, str(tmp_path / "new" / "copy.db"))


def test_migrate_catches_up_with_changes(postgres_location: str, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A second run copies what changed since the first: new rows, updates, newly superseded ones."""
    source = str(tmp_path / "m.db")

    async def step(change: Callable[[SqliteStore], Any]) -> None:
        store = await SqliteStore.open(source, dimension=DIM, dedupe_similarity=DEDUPE)
        try:
            await change(store)
        finally:
            await store.close()

    async def first(store: SqliteStore) -> None:
        await store.add("alice", [NewMemory("lives in Paris"), NewMemory("likes tea")], stack(BASIS[1], BASIS[2]))

    async def second(store: SqliteStore) -> None:
        [paris, tea] = sorted(await store.list("alice"), key=lambda m: m.text)
        await store.add("alice", [NewMemory("lives in Oslo", replaces=paris.id)], stack(BASIS[3]))
        await store.update("alice", tea.id, text="likes green tea")

    asyncio.run(step(first))
    migrate(capsys, source, postgres_location)
    asyncio.run(step(second))
    assert "3 written" in migrate(capsys, source, postgres_location)  # Oslo added, Paris superseded, tea updated

    async def check() -> None:
        store = await open_pg(postgres_location)
        try:
            assert sorted(m.text for m in await store.list("alice")) == ["likes green tea", "lives in Oslo"]
            assert len(await store.list("alice", include_history=True)) == 3
        finally:
            await store.close()

    asyncio.run(check())


def test_migrate_refuses_a_missing_source_and_the_same_store(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["migrate", "--from", str(tmp_path / "none.db"), "--to", str(tmp_path / "x.db")]) == 2
    assert "no SQLite memory store" in capsys.readouterr().err
    assert main(["migrate", "--from", str(tmp_path / "x.db"), "--to", f"sqlite://{tmp_path / 'x.db'}"]) == 2
    assert "same store" in capsys.readouterr().err


# --- two real proxy processes on one database ----------------------------------------------------------------

@contextlib.contextmanager
def proxy_process(db: str, upstream: str, home: Path, *extra: str) -> Iterator[str]:
    """`python -m proxy serve` in a process of its own; yields its base URL once /readyz says 200."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMORY_PROXY_")}
    env |= {"HOME": str(home), "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "proxy", "serve", "--port", str(port), "--upstream", upstream, "--db", db,
               "--log-level", "warning", *extra]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                        break
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"the proxy did not start: {log.read().decode(errors='replace')}")
                time.sleep(0.05)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def two_proxies(postgres_server: PostgresServer, postgres_databases: Databases,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FakeUpstream, str, str]]:
    """One fake upstream and two proxy processes, the first with two workers, on one PostgreSQL database; shared
    by the tests below (each uses users of its own), since starting them costs seconds."""
    fake, name, home = FakeUpstream(), postgres_databases.take(), tmp_path_factory.mktemp("proxies")
    db = postgres_server.url(name)
    with (running(fake.app) as upstream, proxy_process(db, upstream + "/v1", home, "--workers", "2") as first,
          proxy_process(db, upstream + "/v1", home) as second):
        yield fake, first, second
    postgres_databases.give_back(name)


def texts(proxy: str, user: str) -> list[str]:
    response = httpx.get(f"{proxy}/memories/{user}", timeout=10)
    assert response.status_code == 200
    return sorted(m["text"] for m in response.json()["data"])


def wait_for(condition: Callable[[], bool], seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def chat(proxy: str, user: str, text: str) -> Any:
    with openai.OpenAI(base_url=proxy + "/v1", api_key="sk-client", max_retries=0) as client:
        return client.chat.completions.create(model="m", messages=[{"role": "user", "content": text}],
                                              extra_headers={"X-Memory-User": user})


def test_a_fact_learned_through_one_proxy_is_recalled_through_the_other(
        two_proxies: tuple[FakeUpstream, str, str]) -> None:
    fake, first, second = two_proxies
    fake.reply('Noted, no meat then!\n<memory>\n[{"text": "User is vegetarian", "category": "fact"}]\n</memory>')
    assert chat(first, "alice", "I'm vegetarian.").choices[0].message.content == "Noted, no meat then!"
    wait_for(lambda: texts(second, "alice") == ["User is vegetarian"])
    fake.reply("How about a mushroom risotto?")
    chat(second, "alice", "Suggest a recipe for dinner")
    messages = fake.chats[-1].json()["messages"]
    recalled = [m["content"] for m in messages if str(m.get("content", "")).startswith("<memories>")]
    assert len(recalled) == 1 and "User is vegetarian" in recalled[0]
    fake.reply("A steak?")
    chat(second, "bob", "Suggest a recipe for dinner")
    assert not [m for m in fake.chats[-1].json()["messages"] if str(m.get("content", "")).startswith("<memories>")]


def test_the_same_fact_sent_to_both_proxies_at_once_is_stored_once(
        two_proxies: tuple[FakeUpstream, str, str]) -> None:
    proxies = two_proxies[1:]
    facts = ["Plays the cello in an orchestra", "Has two cats named Miso and Tofu", "Is allergic to peanuts",
             "Works night shifts at a hospital", "Is learning Japanese for a trip to Kyoto"]
    barrier = threading.Barrier(2)
    failures: list[BaseException] = []

    def send(proxy: str) -> None:
        try:
            with httpx.Client(timeout=30) as client:
                for fact in facts:
                    barrier.wait(timeout=30)
                    answer = client.post(f"{proxy}/memories/carol", json={"text": fact})
                    assert answer.status_code in (200, 201), answer.text
        except BaseException as exc:  # reported below, in the test's own thread
            barrier.abort()
            failures.append(exc)

    threads = [threading.Thread(target=send, args=(proxy,)) for proxy in proxies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures
    assert texts(proxies[0], "carol") == texts(proxies[1], "carol") == sorted(facts)


def test_vectors_survive_the_round_trip(postgres_location: str) -> None:
    """The binary vector adapter: what goes in comes out bit for bit (after normalising to unit length)."""
    async def run() -> None:
        store = await open_pg(postgres_location)
        try:
            vectors = random_units(3, seed=11)
            await store.add("alice", [NewMemory(f"v{n}") for n in range(3)], vectors * 2.5)
            rows = await PostgresEndpoint(store).export_rows(None, 10)
            assert [m.text for m, _ in rows] == ["v0", "v1", "v2"]
            np.testing.assert_allclose(np.stack([v for _, v in rows]), vectors, atol=1e-6)
        finally:
            await store.close()

    asyncio.run(run())
