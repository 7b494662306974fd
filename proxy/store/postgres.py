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

The per-instance cache, its coherence across instances and the search: proxy/store/postgres_cache.py.

Writes: each call is one transaction that first takes `pg_advisory_xact_lock(hashtextextended(user, 0))`, so
every write for one user is serialised across all processes. In READ COMMITTED each later statement sees what
the previous holder committed, so dedupe holds when two instances receive the same fact at the same moment.
Schema steps are numbered (memory_schema_version); migrating takes a transaction-level advisory lock of its own,
so instances starting together apply them once.
"""

from __future__ import annotations

import builtins
import os
import time
import weakref
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Self

import numpy as np
import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from proxy.models import PROFILE, TENANT_SEPARATOR, Memory, NewMemory
from proxy.store import Vector
from proxy.store.draft import Draft
from proxy.store.postgres_cache import CachedEngine, UserWrites, off_loop
from proxy.store.postgres_db import (
    COLUMNS,
    LIVE,
    MIGRATIONS,
    PREFIXED,
    Conn,
    Floats,
    VectorDumper,
    VectorLoader,
    describe,
    migrate,
    to_memory,
)
from proxy.store.vectors import UserVectors, VectorCache, unit

__all__ = ["COLUMNS", "MIGRATIONS", "Conn", "PostgresStore", "VectorDumper", "describe"]

def random_generation() -> int:
    return int.from_bytes(os.urandom(8), "big") >> 1  # fits a bigint


class PostgresStore(CachedEngine):
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
    async def bump(conn: Conn, user: str) -> int:
        generation = random_generation()
        await conn.execute('INSERT INTO memory_users ("user", generation) VALUES (%s, %s) '
                           "ON CONFLICT (\"user\") DO UPDATE SET generation = excluded.generation", (user, generation))
        return generation

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


