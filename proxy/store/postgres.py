"""The PostgreSQL engine (pgvector): one database that several proxy processes and machines share.

Layout and search, chosen by measuring (`python -m bench.store_pg`; 384-d, 2-core machine, PostgreSQL 18 +
pgvector 0.8.6, shared_buffers 4 GB, 1M memories in the table: 100k users of 10 plus one of 1k and one of 10k):

    search (one user's top 5), ms                        @10      @1k p50 / p95     @10k p50 / p95
    PostgresStore.search: heap rows through the B-tree    0.72     3.67 / 5.72       20.5 / 26.7
    plain exact scan, ORDER BY embedding <=> q LIMIT 5    0.18     1.75 / 2.97       18.3 / 22.1
    the same with <#> on stored unit vectors              0.17     1.32 / 2.46       18.6 / 21.4
    index-only scan, (user) INCLUDE (embedding, ...)      0.20     0.66 / 1.18       12.4 / 16.3  (built in bulk)
    HNSW + user filter (issue 6, 100k rows)               ~30 ms, recall@5 0.2-0.4

One table, primary key ("user", id): the B-tree finds one user's rows and every search is exact, so recall is
exact and the cost grows with that user's memories, never with the table. HNSW (even with pgvector 0.8's
iterative scans) answers a per-user filter slowly and misses most of the true top 5, and one index per user or a
partition per user does not scale to many users. Vectors are stored unit length (`<#>`, no norms, never NaN).

Per-instance cache: scoring in SQL costs ~1.3 us per memory (20 ms for a user with 10k), so each process keeps
users' vectors and words in memory (proxy/store/vectors.py, as the SQLite engine does) and scores them in numpy.
Coherence across instances: every write bumps the user's random `memory_users.generation` under the user's lock,
in its own transaction; a search reads the generation (with the winners, one statement) and uses its cache
entry only if it was made for that generation; else it reads again when a write of this process overtook its
snapshot, and reloads the user's rows when another process wrote. This process's writes to one user queue in
the process; each edits the entry instead of dropping it (dedupe answered from it too) and stores it right after
its COMMIT, so recall right after a write, and the next write, find it warm. `purge_expired` bumps nothing:
expired rows are never eligible in an entry anyway. Users too big for the cache are scored in SQL.

The numpy work on a user's rows (scoring, indexing their words, editing the entry) runs in a thread once the user
has more than OFF_LOOP_ROWS of them, as the SQLite engine's reads and writes always do: indexing a 10k-memory
user's words takes ~75 ms, scoring them ~1 ms, and the event loop must not wait on either.

Writes: each call is one transaction that first takes `pg_advisory_xact_lock(hashtextextended(user, 0))`, so
every write for one user is serialised across all processes. In READ COMMITTED each later statement sees what
the previous holder committed, so dedupe holds when two instances receive the same fact at the same moment.
Schema steps are numbered (memory_schema_version); migrating takes a transaction-level advisory lock of its own,
so instances starting together apply them once.
"""

from __future__ import annotations

import asyncio
import builtins
import os
import time
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Self, TypeVar

import numpy as np
import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from proxy.errors import StoreError
from proxy.models import PROFILE, TENANT_SEPARATOR, Hit, Memory, NewMemory
from proxy.search import DENSE, Fusion, Lexicon
from proxy.store import Engine, Query, Vector, resolved
from proxy.store.postgres_db import (
    COLUMNS,
    LIVE,
    MIGRATIONS,
    PREFIXED,
    Conn,
    Floats,
    RawVectorLoader,
    VectorDumper,
    VectorLoader,
    describe,
    matrix_of,
    migrate,
    to_memory,
)
from proxy.store.vectors import TIE, Draft, UserVectors, VectorCache, choose, newest_first, rank, unit

__all__ = ["COLUMNS", "MIGRATIONS", "Conn", "PostgresStore", "VectorDumper", "describe"]

EXTRA = 5  # rows fetched past the k-th: enough, nearly always, to show that no near-tie was left out
# Narrow rows through the scan and its top-N sort (id and score only); the full columns of the few winners after.
# ORDER BY the output column, not the expression again: PostgreSQL would compute each distance twice (+25%).
TOP = f"""WITH top AS (
    SELECT id, -(embedding <#> %(query)b) AS score FROM memories WHERE "user" = %(user)s AND {LIVE}
    ORDER BY score DESC LIMIT %(limit)s)
SELECT {", ".join("m." + c.strip() for c in COLUMNS.split(","))}, top.score FROM top
JOIN memories m ON m."user" = %(user)s AND m.id = top.id ORDER BY top.score DESC"""
# Every row within TIE of the k-th best, however many: for when TOP's last row is itself within TIE.
TIES = f"""
WITH scored AS MATERIALIZED (
    SELECT id, -(embedding <#> %(query)b) AS score FROM memories WHERE "user" = %(user)s AND {LIVE}
)
SELECT {COLUMNS}, -(embedding <#> %(query)b) FROM memories WHERE "user" = %(user)s AND id = ANY (ARRAY(
    SELECT id FROM scored WHERE score >= greatest(%(min_score)s,
        coalesce((SELECT score FROM scored ORDER BY score DESC OFFSET %(offset)s LIMIT 1), -2) - {TIE})))"""



SCORE = len(COLUMNS.split(","))  # the column after the memory's own: its cosine
READ_AGAIN = 3  # times a search reads again when writes came between, before it ranks in one SQL statement
# Below this many rows a user's numpy work (~0.1 ms per 1,000 rows to score) costs less than a thread hop.
OFF_LOOP_ROWS = 1000
# Building a cache entry indexes the rows' words too: ~7 us a row (7 ms for 1,000), so past 100 rows it moves.
OFF_LOOP_INDEX_ROWS = 100
T = TypeVar("T")


async def off_loop(rows: int, work: Callable[[], T], limit: int = OFF_LOOP_ROWS) -> T:
    """`work()` over `rows` of one user's memories: in a thread when there are more than `limit`."""
    return await asyncio.to_thread(work) if rows > limit else work()


def random_generation() -> int:
    return int.from_bytes(os.urandom(8), "big") >> 1  # fits a bigint


class UserWrites:
    """This process's writes to one user: one at a time (`lock`), and `ended`, set as the current one ends."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.ended = asyncio.Event()


class PostgresStore(Engine):
    def __init__(self, url: str, dimension: int, dedupe_similarity: float, pool: AsyncConnectionPool[Conn],
                 vector_oid: int, cache_bytes: int) -> None:
        self.url = url
        self.dimension = dimension
        self.dedupe_similarity = dedupe_similarity
        self.pool = pool
        self.vector_oid = vector_oid
        self.cache = VectorCache(cache_bytes)
        self.writers: weakref.WeakValueDictionary[str, UserWrites] = weakref.WeakValueDictionary()
        # A user whose matrix would take over a quarter of the cache is scored in SQL instead.
        self.max_cached_rows = cache_bytes // 4 // (4 * dimension)
        self.closed = False

    @classmethod
    async def open(cls, url: str, *, dimension: int, dedupe_similarity: float, min_size: int = 1,
                   max_size: int = 10, wait: float = 10.0, cache_bytes: int = 128 << 20,
                   model: str | None = None) -> Self:
        """Connect, migrate, and open a pool of `min_size`..`max_size` connections (connecting and waiting
        for a free connection give up after `wait` seconds). `cache_bytes`: this process's vector cache. With
        `model`, a database whose vectors another model made is refused."""
        try:
            async with await psycopg.AsyncConnection.connect(url, autocommit=True,
                                                        connect_timeout=max(1, round(wait))) as conn:
                oid = await migrate(conn, dimension, model)
        except psycopg.Error as exc:
            raise describe(url, exc) from exc
        dumper = type("BoundVectorDumper", (VectorDumper,), {"oid": oid})

        async def configure(conn: Conn) -> None:
            conn.adapters.register_dumper(np.ndarray, dumper)
            conn.adapters.register_loader(oid, VectorLoader)

        pool: AsyncConnectionPool[Conn] = AsyncConnectionPool(
            url, min_size=min_size, max_size=max_size, open=False, timeout=wait, name="memory-store",
            kwargs={"autocommit": True, "connect_timeout": max(1, round(wait))}, configure=configure,
            check=AsyncConnectionPool.check_connection)
        try:
            await pool.open(wait=True, timeout=wait)
        except (psycopg.Error, PoolTimeout) as exc:
            await pool.close()
            raise describe(url, exc) from exc
        return cls(url, dimension, dedupe_similarity, pool, oid, cache_bytes)

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            await self.pool.close()

    # --- plumbing -------------------------------------------------------------------------------------------

    @asynccontextmanager
    async def connection(self, user: str | None = None) -> AsyncIterator[Conn]:
        """A pooled connection; with a `user`, inside a transaction holding that user's write lock."""
        if self.closed:
            raise StoreError("the memory store is closed")
        try:
            async with self.pool.connection() as conn:
                if user is None:
                    yield conn
                    return
                async with conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (user,))
                    yield conn
        except (psycopg.Error, PoolTimeout) as exc:
            raise describe(self.url, exc) from exc

    @asynccontextmanager
    async def serialised(self, user: str) -> AsyncIterator[None]:
        """This process's writes to one user, one at a time (the advisory lock orders processes): each finds the
        entry the one before stored after its COMMIT, and waits here rather than on a pooled connection."""
        writes = self.writers.get(user)
        if writes is None:
            writes = self.writers[user] = UserWrites()
        async with writes.lock:
            writes.ended = asyncio.Event()
            try:
                yield
            finally:
                writes.ended.set()

    def write_under_way(self, user: str) -> UserWrites | None:
        """This process's writes to the user when one is under way, else None."""
        writes = self.writers.get(user)
        return writes if writes is not None and writes.lock.locked() else None

    async def settled(self, user: str) -> None:
        """Wait for the write of this process to the user that is under way, if any (not for those queued after
        it). Never with a pooled connection held: that write may be waiting for one."""
        if writes := self.write_under_way(user):
            await writes.ended.wait()

    @asynccontextmanager
    async def writing(self, user: str) -> AsyncIterator[Conn]:
        """A write transaction for the user that bumps their generation; this process's entry is dropped after
        (unless the write stored the new one itself: see `add`), also when the write fails."""
        async with self.serialised(user):
            try:
                async with self.connection(user) as conn:
                    yield conn
                    await self.bump(conn, user)
            finally:
                self.cache.discard(user)

    @staticmethod
    async def fetch(conn: Conn, sql: str, params: dict[str, Any] | Sequence[Any]) -> list[tuple[Any, ...]]:
        return await (await conn.execute(sql, params)).fetchall()

    @staticmethod
    async def bump(conn: Conn, user: str) -> int:
        generation = random_generation()
        await conn.execute('INSERT INTO memory_users ("user", generation) VALUES (%s, %s) '
                           "ON CONFLICT (\"user\") DO UPDATE SET generation = excluded.generation", (user, generation))
        return generation

    async def current_generation(self, user: str) -> int | None:
        """The user's generation now, on a connection of its own (None: no such user)."""
        async with self.connection() as conn:
            return await self.generation(conn, user)

    @staticmethod
    async def generation(conn: Conn, user: str) -> int | None:
        rows = await (await conn.execute('SELECT generation FROM memory_users WHERE "user" = %s', (user,))).fetchall()
        return int(rows[0][0]) if rows else None

    # --- writes (each one transaction under the user's lock) ------------------------------------------------

    async def add(self, user: str, items: Sequence[NewMemory], vectors: Vector) -> list[Memory]:
        matrix = unit(self.as_matrix(vectors, len(items)))
        if not items:
            return []
        stored = []
        entry: UserVectors | None = None
        async with self.serialised(user):
            try:
                async with self.connection(user) as conn:
                    now = time.time()
                    draft = await self.draft(conn, user, now)
                    for item, vector in zip(items, matrix, strict=True):
                        stored.append(await self.add_one(conn, user, item, vector, now, draft))
                    generation = await self.bump(conn, user)
                    if draft is not None:
                        entry = await off_loop(len(draft.base.ids), lambda: draft.build(generation))
            finally:
                self.cache.discard(user)
            if entry is not None:  # committed: this process's next write and recall of the user start warm
                self.cache.put(user, entry if len(entry.ids) <= self.max_cached_rows else UserVectors(entry.generation))
        return stored

    async def add_one(self, conn: Conn, user: str, item: NewMemory, vector: Floats, now: float,
                      draft: Draft | None) -> Memory:
        expires_at = None if item.ttl_seconds is None else now + item.ttl_seconds
        replaced = await self.replaceable(conn, user, item.replaces)
        if draft is None:
            memory_id = await self.twin(conn, user, vector, now, replaced)
        else:
            memory_id = await off_loop(len(draft.base.ids),
                                       lambda: draft.twin(vector, now, replaced, self.dedupe_similarity))
        values = {"user": user, "text": item.text, "category": item.category, "source": item.source,
                  "now": now, "expires_at": expires_at, "replaced": replaced, "vector": vector,
                  "happened_at": item.happened_at, "keep": item.keep_category}
        stated = None  # the text the near-duplicate held (the subquery reads the row as it was)
        if memory_id is not None:
            rows = await self.fetch(conn, f"""UPDATE memories m SET text = %(text)s,
                category = CASE WHEN %(keep)s THEN m.category ELSE %(category)s END,
                updated_at = %(now)s, expires_at = %(expires_at)s, embedding = %(vector)b,
                supersedes = coalesce(m.supersedes, %(replaced)s),
                happened_at = coalesce(%(happened_at)s, m.happened_at)
                FROM (SELECT text FROM memories WHERE "user" = %(user)s AND id = %(id)s) stated
                WHERE m."user" = %(user)s AND m.id = %(id)s RETURNING {PREFIXED}, stated.text""",
                                    {**values, "id": memory_id})
            stated = rows[0][-1]
        else:
            memory_id = self.next_id()
            rows = await self.fetch(conn, f"""INSERT INTO memories ({COLUMNS}, embedding) VALUES (
                %(id)s, %(user)s, %(text)s, %(category)s, %(source)s, %(now)s, %(now)s, %(expires_at)s,
                %(replaced)s, NULL, %(happened_at)s, NULL, %(vector)b) RETURNING {COLUMNS}""",
                                    {**values, "id": memory_id})
        if replaced is not None:
            await conn.execute('UPDATE memories SET superseded_by = %s, valid_until = %s WHERE "user" = %s AND id = %s',
                               (memory_id, now, user, replaced))
        stored = to_memory(rows[0])
        if draft is not None:
            pinned = stored.category == PROFILE
            if stated != item.text or not draft.touch(memory_id, now, expires_at, vector, pinned, stored):
                draft.put(memory_id, now, expires_at, vector, item.text, pinned, stored)
            if replaced is not None:
                draft.remove(replaced)
        return stored

    async def draft(self, conn: Conn, user: str, now: float) -> Draft | None:
        """The user's cached vectors to edit along this write (loaded now if need be: writes are off the request
        path, and the next recall finds them warm); None when the user is too big to cache."""
        generation = await self.generation(conn, user)
        entry = None if generation is None else self.cache.get(user, generation)
        if entry is None:
            entry = await self.load(conn, user, generation or 0, now)
        return None if entry.matrix is None else Draft(entry)

    @classmethod
    async def replaceable(cls, conn: Conn, user: str, memory_id: str | None) -> str | None:
        """The id to supersede: the user's own memory, not already superseded; anything else is ignored."""
        if memory_id is None:
            return None
        rows = await cls.fetch(conn, 'SELECT id FROM memories WHERE "user" = %s AND id = %s '
                                     "AND superseded_by IS NULL", (user, memory_id))
        return str(rows[0][0]) if rows else None

    async def twin(self, conn: Conn, user: str, vector: Floats, now: float, exclude: str | None) -> str | None:
        """The user's closest active memory if it is a near-duplicate (the one being replaced does not count)."""
        rows = await self.fetch(conn, f"""SELECT id, -(embedding <#> %(vector)b) AS score FROM memories
            WHERE "user" = %(user)s AND {LIVE} AND id IS DISTINCT FROM %(exclude)s
            ORDER BY score DESC LIMIT 1""", {"vector": vector, "user": user, "now": now, "exclude": exclude})
        return str(rows[0][0]) if rows and rows[0][1] >= self.dedupe_similarity else None

    async def update(self, user: str, memory_id: str, *, text: str | None = None, category: str | None = None,
                     vector: Vector | None = None, expires_at: float | None = None,
                     happened_at: str | None = None) -> Memory | None:
        direction = None if vector is None else unit(self.as_matrix(vector, 1))[0]
        async with self.writing(user) as conn:
            now = time.time()
            rows = await self.fetch(conn, f"""UPDATE memories SET text = coalesce(%(text)s, text),
                category = coalesce(%(category)s, category), embedding = coalesce(%(vector)b, embedding),
                expires_at = coalesce(%(expires_at)s, expires_at), updated_at = %(now)s,
                happened_at = coalesce(%(happened_at)s, happened_at)
                WHERE "user" = %(user)s AND id = %(id)s AND (expires_at IS NULL OR expires_at > %(now)s)
                RETURNING {COLUMNS}""", {"text": text, "category": category, "vector": direction,
                                         "expires_at": expires_at, "now": now, "user": user, "id": memory_id,
                                         "happened_at": happened_at})
        return to_memory(rows[0]) if rows else None

    async def forget(self, user: str, memory_id: str) -> bool:
        async with self.writing(user) as conn:
            cursor = await conn.execute('DELETE FROM memories WHERE "user" = %s AND id = %s', (user, memory_id))
            return cursor.rowcount > 0

    async def erase(self, user: str) -> int:
        try:
            async with self.connection(user) as conn:
                await conn.execute('DELETE FROM memory_users WHERE "user" = %s', (user,))
                return (await conn.execute('DELETE FROM memories WHERE "user" = %s', (user,))).rowcount
        finally:
            self.cache.discard(user)

    async def purge_expired(self) -> int:
        async with self.connection() as conn:
            return (await conn.execute("DELETE FROM memories WHERE expires_at <= %s", (time.time(),))).rowcount

    # --- reads ----------------------------------------------------------------------------------------------

    async def get(self, user: str, memory_id: str) -> Memory | None:
        async with self.connection() as conn:
            rows = await self.fetch(conn, f'SELECT {COLUMNS} FROM memories WHERE "user" = %s AND id = %s '
                                          "AND (expires_at IS NULL OR expires_at > %s)", (user, memory_id, time.time()))
        return to_memory(rows[0]) if rows else None

    async def list(self, user: str, limit: int = 100, before: str | None = None,
                   include_history: bool = False) -> builtins.list[Memory]:
        sql = f'SELECT {COLUMNS} FROM memories WHERE "user" = %(user)s AND (expires_at IS NULL OR expires_at > %(now)s)'
        sql += "" if before is None else " AND id < %(before)s"
        sql += "" if include_history else " AND superseded_by IS NULL"
        params = {"user": user, "now": time.time(), "before": before, "limit": max(0, limit)}
        async with self.connection() as conn:
            rows = await self.fetch(conn, sql + " ORDER BY id DESC LIMIT %(limit)s", params)
        return [to_memory(row) for row in rows]

    async def users(self, prefix: str = "", limit: int = 100, after: str | None = None) -> builtins.list[str]:
        # The database's collation orders the ids (the primary key's order, so each table's first `limit` come
        # off its index), and may ignore control characters: the prefix and the separator are filters, not
        # bounds. The session tables exist once a session store has opened on this database.
        where = '"user" > %(after)s AND starts_with("user", %(prefix)s)'
        where += ' AND strpos("user", chr(31)) = 0' if TENANT_SEPARATOR not in prefix else ""
        params = {"prefix": prefix, "after": after or "", "now": time.time(), "limit": max(0, limit)}
        async with self.connection() as conn:
            found = (await self.fetch(conn, "SELECT to_regclass('sessions'), to_regclass('conversation_chunks')",
                                      ()))[0]
            tables = ["memories", *(["sessions", "conversation_chunks"] if all(found) else [])]
            parts = [f'(SELECT DISTINCT "user" FROM {table} WHERE {where}'
                     + ("" if table == "conversation_chunks" else " AND (expires_at IS NULL OR expires_at > %(now)s)")
                     + " ORDER BY 1 LIMIT %(limit)s)" for table in tables]
            sql = 'SELECT "user" FROM (' + " UNION ".join(parts) + ") AS found ORDER BY 1 LIMIT %(limit)s"
            rows = await self.fetch(conn, sql, params)
        return [row[0] for row in rows]

    async def count(self, user: str | None = None) -> int:
        """Active memories (what search can return) of the user, or of everyone."""
        sql = f"SELECT count(*) FROM memories WHERE {LIVE}" + ("" if user is None else ' AND "user" = %(user)s')
        async with self.connection() as conn:
            rows = await self.fetch(conn, sql, {"now": time.time(), "user": user})
        return int(rows[0][0])

    async def tenants_of(self, user: str) -> builtins.list[str]:
        """The tenants under which `user` has memories (a scan of the table: for the CLI's hints, not requests)."""
        sql = ('SELECT DISTINCT left("user", -length(%(user)s) - 1) FROM memories '
               'WHERE right("user", length(%(user)s) + 1) = chr(31) || %(user)s ORDER BY 1')
        async with self.connection() as conn:
            rows = await self.fetch(conn, sql, {"user": user})
        return [row[0] for row in rows]

    async def known(self, user: str) -> bool:
        """Whether the user has (or had) memories: a user who never had any needs no embedding of the question.
        A user whose vectors this process holds is known without a round trip."""
        if user in self.cache.entries:
            return True
        async with self.connection() as conn:
            return await self.generation(conn, user) is not None

    async def search(self, user: str, vector: Query, k: int, min_score: float = -1.0, *, text: str = "",
                     fusion: Fusion = DENSE, profile: int = 0) -> builtins.list[Hit]:
        if k <= 0 and profile <= 0:
            await resolved(vector)
            return []
        # No round trip after the question's embedding when the entry this process holds is current: the user's
        # generation is asked for while the model runs, and the entry holds the rows it ranks. (A write of this
        # process under way has not changed it yet, or its COMMIT changed it and the entry is one behind: then the
        # generations differ and the search goes on below.)
        entry = self.cache.peek(user)
        if entry is not None and entry.memories is not None:
            generation, question = await asyncio.gather(self.current_generation(user), resolved(vector))
            if generation is None:
                self.cache.discard(user)  # erased by another instance: `known` asks the database again
                return []
            if generation == entry.generation:
                top = await self.ranked(entry, unit(self.as_matrix(question, 1))[0], time.time(), k, min_score, text,
                                        fusion, profile)
                return [Hit(entry.memories[row], score) for row, score in top]
            entry = self.cache.peek(user)
        else:
            question = await resolved(vector)
        query = unit(self.as_matrix(question, 1))[0]
        now = time.time()
        # Else one round trip: rank with the entry, then fetch the winners together with the user's generation,
        # and use them only if that generation is the entry's. Else: a write of this process came in between (read
        # again, once it is done: waited for with no connection held, as that write may need one), or another
        # process's (load).
        for _ in range(READ_AGAIN + 1):
            async with self.connection() as conn:
                if entry is None or entry.matrix is None:
                    generation = await self.generation(conn, user)
                    if generation is None:
                        self.cache.discard(user)  # erased by another instance: `known` asks the database again
                        return []
                    entry = self.cache.get(user, generation) or await self.load(conn, user, generation, now)
                    if entry.matrix is None:
                        return await self.search_in_sql(conn, user, query, k, min_score, text, fusion, profile)
                top = await self.ranked(entry, query, now, k, min_score, text, fusion, profile)
                generation, rows = await self.winners(conn, user, entry, top)
                if generation is None:
                    self.cache.discard(user)
                    return []
                if generation == entry.generation:
                    return self.hits(entry, top, rows)
                if not entry.follows(generation) and self.write_under_way(user) is None:  # another process wrote
                    entry = self.cache.get(user, generation) or await self.load(conn, user, generation, now)
                    continue
            await self.settled(user)
            entry = self.cache.peek(user)
        async with self.connection() as conn:  # writes kept landing in between: rank in one statement
            return await self.search_in_sql(conn, user, query, k, min_score, text, fusion, profile)

    @staticmethod
    async def ranked(entry: UserVectors, query: Floats, now: float, k: int, min_score: float, text: str,
                     fusion: Fusion, profile: int) -> builtins.list[tuple[int, float]]:
        """(row, score) of what the search returns, ranked from the entry (vectors/choose)."""
        return await off_loop(len(entry.ids), lambda: choose(
            entry.scores(query, now), entry.updated, entry.ids, k, min_score, text=text, lexicon=entry.lexicon,
            fusion=fusion, profile=entry.profile(now, profile)))

    async def winners(self, conn: Conn, user: str, entry: UserVectors, top: builtins.list[tuple[int, float]]
                      ) -> tuple[int | None, builtins.list[tuple[Any, ...]]]:
        """The user's generation and the rows of the ranked memories, in one statement (one snapshot)."""
        wanted = [str(entry.ids[row]) for row, _ in top]
        rows = await self.fetch(conn, f"""SELECT g.generation, {PREFIXED}
            FROM memory_users g LEFT JOIN memories m ON m."user" = g."user" AND m.id = ANY(%(ids)s)
            WHERE g."user" = %(user)s""", {"user": user, "ids": wanted})
        if not rows:
            return None, []
        return int(rows[0][0]), [row[1:] for row in rows if row[1] is not None]

    @staticmethod
    def hits(entry: UserVectors, top: builtins.list[tuple[int, float]], rows: builtins.list[tuple[Any, ...]]
             ) -> builtins.list[Hit]:
        memories = {memory.id: memory for memory in map(to_memory, rows)}
        return [Hit(memories[str(entry.ids[row])], score) for row, score in top if str(entry.ids[row]) in memories]

    async def search_in_sql(self, conn: Conn, user: str, query: Floats, k: int, min_score: float, text: str,
                            fusion: Fusion, profile: int) -> builtins.list[Hit]:
        """A user too big for the cache: vectors only, the top k in SQL; with words or profile memories, every
        live row scored and ranked here, as the cache would."""
        params = {"query": query, "user": user, "now": time.time(), "limit": k + EXTRA, "offset": max(0, k - 1),
                  "min_score": max(min_score, -2.0)}
        if not fusion.lexical and not profile:
            rows = await self.fetch(conn, TOP, params)
            if len(rows) == k + EXTRA and rows[-1][SCORE] >= rows[k - 1][SCORE] - TIE:
                rows = await self.fetch(conn, TIES, params)
            scores = np.array([row[SCORE] for row in rows], dtype=np.float64)
            top = rank(scores, [row[6] for row in rows], [row[0] for row in rows], k, min_score)
            return [Hit(to_memory(rows[index]), score) for index, score in top]
        rows = await self.fetch(conn, f'SELECT {COLUMNS}, -(embedding <#> %(query)b) FROM memories '
                                      f'WHERE "user" = %(user)s AND {LIVE} ORDER BY id', params)

        def ranked() -> builtins.list[Hit]:
            memories = [to_memory(row) for row in rows]
            updated = [m.updated_at for m in memories]
            ids = [m.id for m in memories]
            pinned = newest_first([n for n, m in enumerate(memories) if m.category == PROFILE], updated, ids)
            top = choose(np.array([row[SCORE] for row in rows], dtype=np.float64), updated, ids, k, min_score,
                         text=text, lexicon=Lexicon.build(m.text for m in memories) if fusion.lexical else None,
                         fusion=fusion, profile=pinned[:profile])
            return [Hit(memories[index], score) for index, score in top]

        return await off_loop(len(rows), ranked)

    async def load(self, conn: Conn, user: str, generation: int, now: float) -> UserVectors:
        """Read the user's live vectors and words into a cache entry (or a marker that they are too many)."""
        cursor = conn.cursor(binary=True)
        cursor.adapters.register_loader(self.vector_oid, RawVectorLoader)  # one matrix from all rows at once
        await cursor.execute(f'SELECT {COLUMNS}, embedding FROM memories '
                             f'WHERE "user" = %(user)s AND {LIVE} ORDER BY id LIMIT %(limit)s',
                             {"user": user, "now": now, "limit": self.max_cached_rows + 1})
        rows = await cursor.fetchall()
        if len(rows) > self.max_cached_rows:
            entry = UserVectors(generation)
        else:
            entry = await off_loop(len(rows), lambda: self.entry_of(rows, generation), limit=OFF_LOOP_INDEX_ROWS)
        self.cache.put(user, entry)
        return entry

    def entry_of(self, rows: builtins.list[tuple[Any, ...]], generation: int) -> UserVectors:
        """The cache entry of the rows `load` read: COLUMNS, then the embedding."""
        memories = [to_memory(row) for row in rows]
        expires = np.array([np.inf if m.expires_at is None else m.expires_at for m in memories], dtype=np.float64)
        pinned = np.array([m.category == PROFILE for m in memories], dtype=bool)
        return UserVectors(generation, np.array([m.id for m in memories], dtype=str),
                           np.array([m.updated_at for m in memories], dtype=np.float64), expires,
                           unit(matrix_of([row[-1] for row in rows], self.dimension)),
                           float(expires.min(initial=np.inf)), lexicon=Lexicon.build(m.text for m in memories),
                           pinned=pinned if pinned.any() else None, memories=memories)
