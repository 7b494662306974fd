"""The PostgreSQL engine's per-instance cache (users' vectors and words in memory, kept coherent by a per-user
generation that every write bumps) and the schema step that brought it, against a real PostgreSQL + pgvector."""

from __future__ import annotations

import asyncio
from datetime import datetime
from decimal import Decimal
from typing import Any

import numpy as np
import psycopg
import pytest
from psycopg.adapt import Buffer, Loader
from psycopg.pq import Format

from proxy.models import NewMemory
from proxy.search import Fusion
from proxy.store.postgres import MIGRATIONS, PostgresStore
from proxy.store.postgres_db import RawVectorLoader, VectorDumper, rows_of
from proxy.store.vectors import held_bytes
from tests.pgserver import postgres_databases, postgres_location, postgres_server
from tests.test_store import DEDUPE, DIM, QUERY, assert_cache_and_sql_agree, counted_loads, near, stack, toward

FIXTURES = (postgres_server, postgres_databases, postgres_location)


async def open_pg(url: str, **options: Any) -> PostgresStore:
    return await PostgresStore.open(url, dimension=DIM, dedupe_similarity=DEDUPE, **options)


async def one(store: PostgresStore, user: str, text: str, vector: Any, **fields: Any) -> str:
    [memory] = await store.add(user, [NewMemory(text, **fields)], stack(vector))
    return memory.id


async def test_cache_and_sql_scoring_agree(postgres_location: str) -> None:
    cached, uncached = await open_pg(postgres_location), await open_pg(postgres_location, cache_bytes=0)
    try:
        await assert_cache_and_sql_agree(cached, uncached)
    finally:
        await cached.close()
        await uncached.close()


async def test_own_writes_keep_the_cache_warm_and_exact(postgres_location: str) -> None:
    """A write edits this instance's entry instead of dropping it, so the next recall loads nothing; what it answers
    equals a cold load, through adds, dedupe, replacement and expiry."""
    store, cold = await open_pg(postgres_location), await open_pg(postgres_location)
    loads = counted_loads(store)
    try:
        first = await one(store, "alice", "likes tea", toward(1, 0.5))
        await store.search("alice", QUERY, k=5)
        after_first = loads[0]
        assert await one(store, "alice", "likes tea a lot", near(toward(1, 0.5), 0.95, 3)) == first
        second = await one(store, "alice", "likes coffee", toward(2, 0.9))
        third = await one(store, "alice", "drinks coffee now", toward(4, 0.8), replaces=second)
        await one(store, "alice", "is in Rome this week", toward(5, 0.7), ttl_seconds=0.05)
        await asyncio.sleep(0.1)
        fusion = Fusion(lexical_weight=0.5)
        warm = [(h.memory, round(h.score, 5)) for h in await store.search("alice", QUERY, k=10, text="coffee",
                                                                             fusion=fusion)]
        assert loads[0] == after_first
        assert warm == [(h.memory, round(h.score, 5))  # the rows too: a warm search answers them from its entry
                        for h in await cold.search("alice", QUERY, k=10, text="coffee", fusion=fusion)]
        assert [memory.id for memory, _ in warm] == [third, first]
        entry = store.cache.peek("alice")  # its rows' cost, counted along the writes, is what a recount gives
        assert entry is not None and entry.memories and entry.memories_bytes == held_bytes(entry.memories)
    finally:
        await store.close()
        await cold.close()


async def test_another_instances_writes_reach_a_warm_cache(postgres_location: str) -> None:
    reader, writer = await open_pg(postgres_location), await open_pg(postgres_location)
    try:
        first = await one(writer, "alice", "likes tea", toward(1, 0.5))
        assert [h.memory.id for h in await reader.search("alice", QUERY, k=5)] == [first]
        renamed = await writer.update("alice", first, text="likes green tea", vector=toward(1, 0.7))
        assert renamed is not None
        [hit] = await reader.search("alice", QUERY, k=5)
        assert hit.memory.text == "likes green tea" and hit.score == pytest.approx(0.7, abs=1e-5)
        second = await one(writer, "alice", "likes coffee", toward(2, 0.9), category="profile")
        assert [h.memory.id for h in await reader.search("alice", QUERY, k=5, profile=1)] == [second, first]
        await writer.erase("alice")
        assert await reader.search("alice", QUERY, k=5) == []
        assert not await reader.known("alice")
    finally:
        await reader.close()
        await writer.close()


async def test_the_upgrade_keeps_existing_memories_recallable(postgres_location: str) -> None:
    """A database made before the per-user generation: its users get one, replaced rows get their validity end."""
    async with await psycopg.AsyncConnection.connect(postgres_location, autocommit=True) as conn:
        await conn.execute("CREATE TABLE memory_schema_version (version integer PRIMARY KEY, "
                           "applied_at timestamptz NOT NULL DEFAULT now())")
        for statement in MIGRATIONS[0]:
            await conn.execute(statement)
        await conn.execute("INSERT INTO memory_schema_version (version) VALUES (1)")
        oid = (await (await conn.execute("SELECT 'vector'::regtype::oid")).fetchone() or [0])[0]
        conn.adapters.register_dumper(np.ndarray, type("Dumper", (VectorDumper,), {"oid": oid}))
        for memory_id, text, vector, created, superseded_by in (
                ("00000000000100000001", "lives in Paris", toward(1, 0.5), 100.0, "00000000000200000001"),
                ("00000000000200000001", "lives in Rome", toward(2, 0.6), 200.0, None)):
            await conn.execute('INSERT INTO memories (id, "user", text, category, source, created_at, updated_at, '
                               "superseded_by, embedding) VALUES (%s, 'alice', %s, 'fact', 'api', %s, %s, %s, %b)",
                               (memory_id, text, created, created, superseded_by, vector))
    store = await open_pg(postgres_location)
    try:
        [hit] = await store.search("alice", QUERY, k=5)
        assert hit.memory.text == "lives in Rome" and await store.known("alice")
        [new, old] = await store.list("alice", include_history=True)
        assert old.valid_until == 200.0 and new.valid_until is None and new.happened_at is None
    finally:
        await store.close()


async def test_a_big_users_numpy_work_runs_off_the_event_loop(postgres_location: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Indexing a 10k-memory user's words takes ~75 ms and scoring them ~1 ms: past OFF_LOOP_ROWS memories the
    engine does it in a thread (loading, ranking, dedupe and editing the entry on a write); a small user's work
    stays on the loop, where it costs less than the hop."""
    from proxy.search import Lexicon
    from proxy.store import postgres, postgres_cache
    from proxy.store.draft import Draft

    on_loop: dict[str, list[bool]] = {"index": [], "rank": [], "dedupe": [], "edit": [], "decode": []}

    def seen(step: str) -> None:
        on_loop[step].append(asyncio._get_running_loop() is not None)

    class WatchedLexicon(Lexicon):
        @classmethod
        def build(cls, texts: Any) -> Lexicon:
            seen("index")
            return Lexicon.build(texts)

    class WatchedDraft(Draft):
        def twin(self, *args: Any) -> str | None:
            seen("dedupe")
            return super().twin(*args)

        def build(self, generation: int) -> Any:
            seen("edit")
            return super().build(generation)

    class WatchedFusion(Fusion):
        @property
        def lexical(self) -> bool:
            seen("rank")
            return True

    def decode(loader: RawVectorLoader, data: Any) -> bytes:  # psycopg turning the rows' vectors into objects
        seen("decode")
        return bytes(data)

    monkeypatch.setattr(postgres_cache, "Lexicon", WatchedLexicon)
    monkeypatch.setattr(postgres, "Draft", WatchedDraft)
    monkeypatch.setattr(RawVectorLoader, "load", decode)
    big = postgres_cache.OFF_LOOP_ROWS + 50
    writer, reader = await open_pg(postgres_location), await open_pg(postgres_location)
    try:
        rng = np.random.default_rng(3)
        vectors = rng.standard_normal((big, DIM)).astype(np.float32)
        await writer.add("big", [NewMemory(f"note {n} about bread") for n in range(big)], vectors)
        await writer.add("small", [NewMemory(f"note {n} about tea") for n in range(10)], vectors[:10])
        for step in on_loop.values():
            step.clear()
        await writer.add("big", [NewMemory("likes rye bread")], vectors[:1] + 0.01)  # dedupe and edit, warm
        assert await reader.search("big", vectors[5], k=3, text="note 5", fusion=WatchedFusion())  # load + rank
        assert on_loop["index"] and on_loop["rank"] and on_loop["dedupe"] and on_loop["edit"] and on_loop["decode"]
        assert not any(flag for step in on_loop.values() for flag in step), on_loop
        for step in on_loop.values():
            step.clear()
        await writer.add("small", [NewMemory("likes green tea")], vectors[:1] + 0.01)
        assert await reader.search("small", vectors[5], k=3, text="note 5", fusion=WatchedFusion())
        assert all(on_loop["index"]) and all(on_loop["rank"]) and all(on_loop["dedupe"]) and all(on_loop["edit"])
        assert on_loop["decode"] and all(on_loop["decode"])
        # Indexing words costs ~10x scoring a row: a user past OFF_LOOP_INDEX_ROWS is indexed in a thread.
        middling = postgres_cache.OFF_LOOP_INDEX_ROWS + 50
        await writer.add("middling", [NewMemory(f"note {n} about rice") for n in range(middling)], vectors[:middling])
        for step in on_loop.values():
            step.clear()
        assert await reader.search("middling", vectors[5], k=3, text="note 5", fusion=WatchedFusion())
        assert on_loop["index"] == [False] and on_loop["rank"] and all(on_loop["rank"])
        assert len(on_loop["decode"]) == middling and all(on_loop["decode"])  # under OFF_LOOP_DECODE_ROWS
    finally:
        await writer.close()
        await reader.close()


class TaggedVector(Loader):
    """A loader of the connection's own (psycopg's defaults would give str or bytes): ("vector", raw bytes)."""

    def load(self, data: Buffer) -> tuple[str, bytes]:
        return ("vector", bytes(data))


class BinaryTaggedVector(TaggedVector):
    format = Format.BINARY


@pytest.mark.parametrize("count", [3, 1200])
async def test_rows_decoded_in_a_thread_equal_psycopg_s_own(postgres_location: str, count: int) -> None:
    """Past OFF_LOOP_DECODE_ROWS a result's rows are decoded in a thread, by the cursor's own loaders (those the
    connection registered included): the same values, types and NULLs as psycopg's fetchall."""
    sql = """SELECT n, 'row ' || n, CASE WHEN n %% 3 = 0 THEN NULL ELSE n / 7.0 END, n %% 2 = 0,
             timestamptz '2024-05-12 10:00+00' + n * interval '1 hour', ('[' || n || ',1,2]')::vector
             FROM generate_series(1, %s) AS n"""
    async with await psycopg.AsyncConnection.connect(postgres_location, autocommit=True) as conn:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        vector_oid = (await (await conn.execute("SELECT 'vector'::regtype::oid")).fetchone() or [0])[0]
        conn.adapters.register_loader(vector_oid, TaggedVector)
        conn.adapters.register_loader(vector_oid, BinaryTaggedVector)
        for binary in (False, True):
            own = await (await conn.cursor(binary=binary).execute(sql, (count,))).fetchall()
            rows = await rows_of(await conn.cursor(binary=binary).execute(sql, (count,)))
            assert rows == own and len(rows) == count and all(isinstance(row, tuple) for row in rows)
            assert [type(value) for value in rows[1]] == [int, str, Decimal, bool, datetime, tuple]
            assert rows[2][2] is None and rows[1][5][0] == "vector"


async def test_writes_in_a_row_find_the_entry_the_last_one_made(postgres_location: str) -> None:
    """Writes to one user queue on the user's lock; each finds the entry the one before it made, even when they
    come together from one process, and a search a few writes behind uses it too: nothing reloads the rows."""
    store = await open_pg(postgres_location)
    loads = counted_loads(store)
    try:
        await one(store, "alice", "likes tea", toward(1, 0.5))
        await store.search("alice", QUERY, k=5)
        warm = loads[0]
        writes = [one(store, "alice", f"fact number {n}", toward(2 + n, 0.3 + n / 100)) for n in range(30)]
        searches = [store.search("alice", QUERY, k=5) for _ in range(30)]
        await asyncio.gather(*(job for pair in zip(writes, searches, strict=True) for job in pair))
        assert loads[0] == warm
        assert len(await store.search("alice", QUERY, k=40)) == 31
        entry = store.cache.peek("alice")
        assert entry is not None and entry.memories and entry.memories_bytes == held_bytes(entry.memories)
    finally:
        await store.close()


SLOW_COMMIT = """
CREATE FUNCTION slow_commit() RETURNS trigger AS $$ BEGIN
  IF NEW.text LIKE 'slow:%' THEN PERFORM pg_sleep(0.4); END IF; RETURN NULL; END $$ LANGUAGE plpgsql;
CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT OR UPDATE ON memories DEFERRABLE INITIALLY DEFERRED
  FOR EACH ROW EXECUTE FUNCTION slow_commit()"""


async def test_a_search_during_a_write_sees_the_state_before_it_or_after_it(postgres_location: str) -> None:
    """A COMMIT that takes its time (a busy or distant server; here a deferred trigger): a search of the same
    process meanwhile answers as before the write, one after it answers as after, never a mix (a replaced memory
    gone and its replacement not there yet)."""
    store, cold = await open_pg(postgres_location), await open_pg(postgres_location, cache_bytes=0)
    async with await psycopg.AsyncConnection.connect(postgres_location, autocommit=True) as conn:
        await conn.execute(SLOW_COMMIT)
    try:
        paris = await one(store, "alice", "lives in Paris", toward(1, 0.9))
        for n in range(5):
            await one(store, "alice", f"other {n}", toward(2 + n, 0.1 + 0.05 * n))
        async def texts(searcher: PostgresStore, k: int) -> list[str]:
            return [hit.memory.text for hit in await searcher.search("alice", QUERY, k=k)]

        before = await texts(store, 4)
        assert before[0] == "lives in Paris"
        write = asyncio.create_task(one(store, "alice", "slow: lives in Rome", toward(9, 0.95), replaces=paris))
        await asyncio.sleep(0.2)  # the write is committing
        assert await texts(store, 4) == before
        searched = asyncio.create_task(texts(store, 4))  # during that COMMIT or just after it
        await write
        batch = asyncio.create_task(store.add("alice", [NewMemory(f"slow: best {n}") for n in range(3)], stack(
            *[toward(20 + n, 0.97 - 0.001 * n) for n in range(3)])))
        await asyncio.sleep(0.2)  # the batch is committing
        after = await texts(cold, 4)
        assert after[0] == "slow: lives in Rome" and "lives in Paris" not in after
        assert await searched in (before, after)
        assert await texts(store, 4) == after  # the batch not committed yet: the write's state, whole
        await batch
        final = await texts(store, 4)
        assert final == await texts(cold, 4) and final[0].startswith("slow: best")  # (near-duplicates: merged)
    finally:
        await store.close()
        await cold.close()


async def test_searches_waiting_for_a_write_hold_no_connection_it_needs(postgres_location: str) -> None:
    """Searches that find this process's write to their user under way wait for it with no pooled connection
    held: with a pool of 2, two such searches once held both while the write waited for one (StoreUnavailable
    after the pool's wait, every user of the process stalled meanwhile)."""
    store = await open_pg(postgres_location, min_size=2, max_size=2, wait=5.0)
    other = await open_pg(postgres_location)
    try:
        await one(store, "alice", "lives in Paris", toward(1, 0.9))
        await store.search("alice", QUERY, k=3)
        await one(store, "bob", "likes jazz", toward(4, 0.7))
        await one(other, "alice", "has a cat", toward(2, 0.5))  # another instance: this one's entry is behind
        results = await asyncio.gather(store.search("alice", QUERY, k=3), store.search("alice", QUERY, k=3),
                                       one(store, "alice", "plays chess", toward(3, 0.4)),
                                       store.search("bob", QUERY, k=3), return_exceptions=True)
        assert not [r for r in results if isinstance(r, BaseException)], results
        assert len(await store.search("alice", QUERY, k=5)) == 3
    finally:
        await store.close()
        await other.close()


async def test_a_current_entry_answers_with_no_round_trip_after_the_embedding(postgres_location: str) -> None:
    """The user's generation is asked for while the question is still being embedded; once the vector is there, a
    current entry ranks and answers from the rows it holds, with no statement sent. Another instance's write since
    is still seen (the generation differs: the search reads the database)."""
    store, other = await open_pg(postgres_location), await open_pg(postgres_location)
    statements: list[tuple[str, bool]] = []
    vector: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    original_fetch, original_generation = store.fetch, store.generation

    async def fetch(conn: Any, sql: str, params: Any) -> Any:
        statements.append(("fetch", vector.done()))
        return await original_fetch(conn, sql, params)

    async def generation(conn: Any, user: str) -> Any:
        statements.append(("generation", vector.done()))
        return await original_generation(conn, user)

    try:
        tea = await one(store, "alice", "likes tea", toward(1, 0.5))
        coffee = await one(store, "alice", "likes coffee", toward(2, 0.9))
        expected = await other.search("alice", QUERY, k=5)
        assert await store.search("alice", QUERY, k=5) == expected  # warm: its own writes made the entry
        store.fetch, store.generation = fetch, generation  # type: ignore[method-assign]
        searching = asyncio.create_task(store.search("alice", vector, k=5))
        for _ in range(200):  # the generation is asked for before the vector exists
            if statements:
                break
            await asyncio.sleep(0.01)
        assert statements == [("generation", False)]
        vector.set_result(QUERY)
        assert await searching == expected and [h.memory.id for h in expected] == [coffee, tea]
        assert statements == [("generation", False)]  # nothing after the vector came
        # A write of this process landing while the question is embedded: the search answers from the entry that
        # write made, the one of the generation it reads, still with no statement after the vector.
        written, release = asyncio.Event(), asyncio.Event()
        original_current = store.current_generation

        async def current_generation(user: str) -> Any:
            written.set()
            await release.wait()
            return await original_current(user)

        store.current_generation = current_generation  # type: ignore[method-assign]
        statements.clear()
        vector = asyncio.get_running_loop().create_future()
        searching = asyncio.create_task(store.search("alice", vector, k=5))
        await asyncio.wait_for(written.wait(), 5)  # the search holds the older entry now
        water = await one(store, "alice", "likes water", toward(4, 0.7))
        statements.clear()
        release.set()
        await asyncio.sleep(0.05)
        vector.set_result(QUERY)
        assert [h.memory.id for h in await searching] == [coffee, water, tea]
        assert statements == [("generation", False)]
        store.current_generation = original_current  # type: ignore[method-assign]
        juice = await one(other, "alice", "likes juice", toward(3, 0.95))
        statements.clear()
        assert [h.memory.id for h in await store.search("alice", QUERY, k=5)] == [juice, coffee, water, tea]
        assert len(statements) > 1  # the entry was not current: the search read the database
    finally:
        await store.close()
        await other.close()

