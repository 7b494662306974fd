"""The PostgreSQL engine (pgvector): one database that several proxy processes and machines share.

Layout and search, chosen by measuring (`python -m bench.store_pg`; 384-d, 2-core machine, PostgreSQL 18 +
pgvector 0.8.6, shared_buffers 4 GB, 1M memories in the table: 100k users of 10 plus one of 1k and one of 10k):

    search (one user's top 5), ms                        @10      @1k p50 / p95     @10k p50 / p95
    PostgresStore.search: heap rows through the B-tree    0.72     3.67 / 5.72       20.5 / 26.7
    plain exact scan, ORDER BY embedding <=> q LIMIT 5    0.18     1.75 / 2.97       18.3 / 22.1
    the same with <#> on stored unit vectors              0.17     1.32 / 2.46       18.6 / 21.4
    index-only scan, (user) INCLUDE (embedding, ...)      0.20     0.66 / 1.18       12.4 / 16.3  (built in bulk)
    HNSW + user filter (issue 6, 100k rows)               ~30 ms, recall@5 0.2-0.4

One table, primary key ("user", id): the B-tree finds one user's rows and every search is an exact scan of
them, so recall is exact and the cost grows with that user's memories, never with the table. HNSW (even with
pgvector 0.8's iterative scans) answers a per-user filter slowly and misses most of the true top 5, and one
index per user or a partition per user does not scale to many users. Vectors are stored unit length, so the
scan computes a plain inner product (`<#>`, no norms) and never yields NaN. A search is one statement: score the
user's live rows once (a MATERIALIZED CTE), keep those within TIE of the k-th best, join back for their columns;
the tie-break (newest first among near-equal scores) is the shared `rank` in Python, as in SQLite.

Writes: each call is one transaction that first takes `pg_advisory_xact_lock(hashtextextended(user, 0))`, so
every write for one user is serialised across all processes. In READ COMMITTED each later statement sees what
the previous holder committed, so dedupe (the user's closest live memory, cosine >= dedupe_similarity) holds
when two instances receive the same fact at the same moment. Schema steps are numbered (memory_schema_version);
migrating takes a transaction-level advisory lock of its own, so instances starting together apply them once.
"""

from __future__ import annotations

import builtins
import struct
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, Self

import numpy as np
import numpy.typing as npt
import psycopg
from psycopg.adapt import Buffer, Dumper, Loader
from psycopg.pq import Format
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from proxy import metrics
from proxy.errors import StoreError, StoreUnavailable
from proxy.models import TENANT_SEPARATOR, Hit, Memory, NewMemory
from proxy.store import Engine, Vector, redact
from proxy.store.vectors import TIE, rank, unit

Floats = npt.NDArray[np.float32]
Conn = psycopg.AsyncConnection[tuple[Any, ...]]
COLUMNS = 'id, "user", text, category, source, created_at, updated_at, expires_at, supersedes, superseded_by'
LIVE = "superseded_by IS NULL AND (expires_at IS NULL OR expires_at > %(now)s)"
MIGRATION_LOCK = (0x6D656D70, 1)  # 'memp', 1: the two-int advisory key space never meets the per-user bigint keys

# Numbered schema steps; memory_schema_version holds one row per step applied. Append, never edit a released step.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        "CREATE EXTENSION IF NOT EXISTS vector",
        "CREATE TABLE memory_meta (key text PRIMARY KEY, value text NOT NULL)",
        """CREATE TABLE memories (
            "user" text NOT NULL, id text NOT NULL, text text NOT NULL, category text NOT NULL,
            source text NOT NULL, created_at double precision NOT NULL, updated_at double precision NOT NULL,
            expires_at double precision, supersedes text, superseded_by text, embedding vector NOT NULL,
            PRIMARY KEY ("user", id))""",
        "CREATE INDEX memories_expiry ON memories (expires_at) WHERE expires_at IS NOT NULL",
    ),
)

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


class VectorDumper(Dumper):
    """numpy float32 → pgvector's binary form: dimension and a reserved int16, then big-endian float4s.
    The `oid` is set per database in a subclass (the type comes from an extension, so its oid varies)."""

    format = Format.BINARY

    def dump(self, obj: Any) -> Buffer:
        vector = np.asarray(obj, dtype=">f4").ravel()
        return struct.pack(">HH", vector.size, 0) + vector.tobytes()


class VectorLoader(Loader):
    format = Format.BINARY

    def load(self, data: Buffer) -> Floats:
        (dimension,) = struct.unpack_from(">H", data)
        return np.frombuffer(data, dtype=">f4", count=dimension, offset=4).astype(np.float32)


def describe(url: str, exc: Exception) -> StoreError:
    """The fault in one line; StoreUnavailable when it passes (the server is down, restarting or unreachable)."""
    metrics.store_error("postgres")
    message = str(exc).strip() or type(exc).__name__
    kind = StoreUnavailable if isinstance(exc, PoolTimeout | psycopg.OperationalError) else StoreError
    if isinstance(exc, PoolTimeout):
        why = "no database connection became free in time (the server is down or the pool is exhausted)"
    elif isinstance(exc, psycopg.errors.InsufficientPrivilege) and "vector" in message:
        why = ("the pgvector extension is missing and this role may not create it: "
               "run CREATE EXTENSION vector as a superuser")
    elif isinstance(exc, psycopg.errors.UndefinedFile | psycopg.errors.FeatureNotSupported) and "vector" in message:
        why = "the server has no pgvector extension installed (use the pgvector/pgvector image or install it)"
    elif isinstance(exc, psycopg.OperationalError) and exc.sqlstate is None:
        why = "cannot reach the database"
    else:
        why = "the memory store failed"
    return kind(f"PostgreSQL memory store {redact(url)}: {why} ({message})")


async def stored_dimension(url: str) -> int:
    """The vector dimension of the memory-proxy store in this database; StoreError if it holds none (nothing
    is created)."""
    try:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True, connect_timeout=10) as conn:
            cursor = await conn.execute("SELECT to_regclass('memory_meta') IS NOT NULL")
            found = await cursor.fetchone()
            row = None
            if found and found[0]:
                row = await (await conn.execute("SELECT value FROM memory_meta WHERE key = 'dimension'")).fetchone()
    except psycopg.Error as exc:
        raise describe(url, exc) from exc
    if row is None:
        raise StoreError(f"the PostgreSQL database {redact(url)} holds no memory-proxy store (no memory_meta table)")
    return int(row[0])


async def migrate(conn: Conn, dimension: int) -> int:
    """Apply the pending numbered steps and record (or check) the vector dimension, in one transaction under a
    lock that other starting instances wait for; returns the oid of the vector type."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", MIGRATION_LOCK)
        found = await (await conn.execute("SELECT to_regclass('memory_schema_version') IS NOT NULL")).fetchone()
        if not (found and found[0]):  # IF NOT EXISTS alone would still need CREATE rights on every start
            await conn.execute("CREATE TABLE memory_schema_version ("
                               "version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())")
        row = await (await conn.execute("SELECT coalesce(max(version), 0) FROM memory_schema_version")).fetchone()
        version = int(row[0]) if row else 0
        if version > len(MIGRATIONS):
            raise StoreError(f"the database schema is version {version}, newer than this memory-proxy knows "
                             f"({len(MIGRATIONS)}): upgrade memory-proxy")
        for number, steps in enumerate(MIGRATIONS[version:], start=version + 1):
            for statement in steps:
                await conn.execute(statement)
            await conn.execute("INSERT INTO memory_schema_version (version) VALUES (%s)", (number,))
        row = await (await conn.execute("SELECT value FROM memory_meta WHERE key = 'dimension'")).fetchone()
        if row is None:
            await conn.execute("INSERT INTO memory_meta (key, value) VALUES ('dimension', %s)", (str(dimension),))
        elif int(row[0]) != dimension:
            raise StoreError(f"this database holds {row[0]}-dimensional vectors, but the embedding model makes "
                             f"{dimension}: use another database or the model it was made with")
        row = await (await conn.execute("SELECT 'vector'::regtype::oid")).fetchone()
        assert row is not None
        return int(row[0])


def to_memory(row: Sequence[Any]) -> Memory:
    return Memory(*row[:10])


class PostgresStore(Engine):
    def __init__(self, url: str, dimension: int, dedupe_similarity: float, pool: AsyncConnectionPool[Conn]) -> None:
        self.url = url
        self.dimension = dimension
        self.dedupe_similarity = dedupe_similarity
        self.pool = pool
        self.closed = False

    @classmethod
    async def open(cls, url: str, *, dimension: int, dedupe_similarity: float, min_size: int = 1,
                   max_size: int = 10, wait: float = 10.0) -> Self:
        """Connect, migrate, and open a pool of `min_size`..`max_size` connections (connecting and waiting
        for a free connection give up after `wait` seconds)."""
        try:
            async with await psycopg.AsyncConnection.connect(url, autocommit=True,
                                                        connect_timeout=max(1, round(wait))) as conn:
                oid = await migrate(conn, dimension)
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
        return cls(url, dimension, dedupe_similarity, pool)

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



    @staticmethod
    async def fetch(conn: Conn, sql: str, params: dict[str, Any] | Sequence[Any]) -> list[tuple[Any, ...]]:
        return await (await conn.execute(sql, params)).fetchall()

    # --- writes (each one transaction under the user's lock) ------------------------------------------------

    async def add(self, user: str, items: Sequence[NewMemory], vectors: Vector) -> list[Memory]:
        matrix = unit(self.as_matrix(vectors, len(items)))
        if not items:
            return []
        stored = []
        async with self.connection(user) as conn:
            now = time.time()
            for item, vector in zip(items, matrix, strict=True):
                expires_at = None if item.ttl_seconds is None else now + item.ttl_seconds
                replaced = await self.replaceable(conn, user, item.replaces)
                memory_id = await self.twin(conn, user, vector, now, replaced)
                values = {"user": user, "text": item.text, "category": item.category, "source": item.source,
                          "now": now, "expires_at": expires_at, "replaced": replaced, "vector": vector}
                if memory_id is not None:
                    rows = await self.fetch(conn, f"""UPDATE memories SET text = %(text)s, category = %(category)s,
                        updated_at = %(now)s, expires_at = %(expires_at)s, embedding = %(vector)b,
                        supersedes = coalesce(supersedes, %(replaced)s) WHERE "user" = %(user)s AND id = %(id)s
                        RETURNING {COLUMNS}""", {**values, "id": memory_id})
                else:
                    memory_id = self.next_id()
                    rows = await self.fetch(conn, f"""INSERT INTO memories ({COLUMNS}, embedding) VALUES (
                        %(id)s, %(user)s, %(text)s, %(category)s, %(source)s, %(now)s, %(now)s, %(expires_at)s,
                        %(replaced)s, NULL, %(vector)b) RETURNING {COLUMNS}""", {**values, "id": memory_id})
                if replaced is not None:
                    await conn.execute('UPDATE memories SET superseded_by = %s WHERE "user" = %s AND id = %s',
                                       (memory_id, user, replaced))
                stored.append(to_memory(rows[0]))
        return stored

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
                     vector: Vector | None = None, expires_at: float | None = None) -> Memory | None:
        direction = None if vector is None else unit(self.as_matrix(vector, 1))[0]
        async with self.connection(user) as conn:
            now = time.time()
            rows = await self.fetch(conn, f"""UPDATE memories SET text = coalesce(%(text)s, text),
                category = coalesce(%(category)s, category), embedding = coalesce(%(vector)b, embedding),
                expires_at = coalesce(%(expires_at)s, expires_at), updated_at = %(now)s
                WHERE "user" = %(user)s AND id = %(id)s AND (expires_at IS NULL OR expires_at > %(now)s)
                RETURNING {COLUMNS}""", {"text": text, "category": category, "vector": direction,
                                         "expires_at": expires_at, "now": now, "user": user, "id": memory_id})
        return to_memory(rows[0]) if rows else None

    async def forget(self, user: str, memory_id: str) -> bool:
        async with self.connection(user) as conn:
            cursor = await conn.execute('DELETE FROM memories WHERE "user" = %s AND id = %s', (user, memory_id))
            return cursor.rowcount > 0

    async def erase(self, user: str) -> int:
        async with self.connection(user) as conn:
            return (await conn.execute('DELETE FROM memories WHERE "user" = %s', (user,))).rowcount

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

    async def search(self, user: str, vector: Vector, k: int, min_score: float = -1.0) -> builtins.list[Hit]:
        query = unit(self.as_matrix(vector, 1))[0]
        if k <= 0:
            return []
        params = {"query": query, "user": user, "now": time.time(), "limit": k + EXTRA, "offset": k - 1,
                  "min_score": max(min_score, -2.0)}
        async with self.connection() as conn:
            rows = await self.fetch(conn, TOP, params)
            if len(rows) == k + EXTRA and rows[-1][10] >= rows[k - 1][10] - TIE:
                rows = await self.fetch(conn, TIES, params)
        scores = np.array([row[10] for row in rows], dtype=np.float64)
        top = rank(scores, [row[6] for row in rows], [row[0] for row in rows], k, min_score)
        return [Hit(to_memory(rows[index]), score) for index, score in top]
