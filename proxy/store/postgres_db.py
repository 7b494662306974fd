"""The PostgreSQL database: schema (numbered migrations), pgvector's binary format, and errors said plainly.

proxy/store/postgres.py builds the store on these.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import psycopg
from psycopg.adapt import Buffer, Dumper, Loader, Transformer
from psycopg.pq import Format
from psycopg_pool import PoolTimeout

from proxy import metrics
from proxy.errors import StoreError, StoreUnavailable
from proxy.models import Memory
from proxy.store import redact, vector_meta

Floats = npt.NDArray[np.float32]
Conn = psycopg.AsyncConnection[tuple[Any, ...]]
Cursor = psycopg.AsyncCursor[tuple[Any, ...]]
# psycopg turns a result's values into Python objects when the rows are fetched, on the caller's thread: ~1.4 us a
# row of a cache load (a 10k-memory user's, ~14 ms: bench/stalls.py). Past this many rows a load's are decoded in a
# thread: its vector column's loader is Python code, between whose calls the loop gets the GIL back (every switch
# interval, 5 ms). Results of psycopg's C loaders alone gain nothing from a thread, which holds the GIL throughout.
OFF_LOOP_DECODE_ROWS = 500
COLUMNS = ('id, "user", text, category, source, created_at, updated_at, expires_at, supersedes, superseded_by, '
           "happened_at, valid_until")
PREFIXED = ", ".join("m." + column.strip() for column in COLUMNS.split(","))  # of the table aliased m
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
    (  # every write bumps its user's generation: each instance's vector cache knows when it is stale
        'CREATE TABLE memory_users ("user" text PRIMARY KEY, generation bigint NOT NULL)',
        'INSERT INTO memory_users ("user", generation) SELECT DISTINCT "user", 1 FROM memories',
        # time: when it happened (as the user said it) and when a replaced memory stopped being current
        "ALTER TABLE memories ADD COLUMN happened_at text, ADD COLUMN valid_until double precision",
        """UPDATE memories SET valid_until = newer.created_at FROM memories AS newer
           WHERE newer."user" = memories."user" AND newer.id = memories.superseded_by""",
    ),
)


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


class RawVectorLoader(Loader):
    """pgvector's binary form as it comes: a search's cache load joins a user's rows into one matrix at once."""

    format = Format.BINARY

    def load(self, data: Buffer) -> bytes:
        return bytes(data)


async def rows_of(cursor: Cursor) -> list[tuple[Any, ...]]:
    """Every row of the result `cursor` just received, as tuples decoded by the cursor's loaders; decoded in a
    thread when there are more than OFF_LOOP_DECODE_ROWS (the result is already in memory: nothing is read from
    the server there). Worth it only where a loader is Python code (see OFF_LOOP_DECODE_ROWS): the cache load."""
    result = cursor.pgresult
    if result is None or result.ntuples <= OFF_LOOP_DECODE_ROWS:
        return await cursor.fetchall()

    def decoded() -> list[tuple[Any, ...]]:
        transformer = Transformer.from_context(cursor)  # the cursor's loaders, RawVectorLoader included
        transformer.set_pgresult(result)
        return transformer.load_rows(0, result.ntuples, tuple)

    return await asyncio.to_thread(decoded)


def matrix_of(raw: Sequence[bytes], dimension: int) -> Floats:
    """Rows of pgvector's binary form (a 4-byte header, then big-endian float4s) as one float32 matrix."""
    if not raw:
        return np.zeros((0, dimension), dtype=np.float32)
    joined = np.frombuffer(b"".join(raw), dtype=">f4").reshape(len(raw), dimension + 1)
    return joined[:, 1:].astype(np.float32)


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


async def stored_vectors(url: str) -> tuple[int, str | None]:
    """The vector dimension of the memory-proxy store in this database and the model that made its vectors
    (None when unrecorded); StoreError if it holds none (nothing is created)."""
    try:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True, connect_timeout=10) as conn:
            cursor = await conn.execute("SELECT to_regclass('memory_meta') IS NOT NULL")
            found = await cursor.fetchone()
            meta: dict[str, str] = {}
            if found and found[0]:
                meta = dict(await (await conn.execute("SELECT key, value FROM memory_meta")).fetchall())
    except psycopg.Error as exc:
        raise describe(url, exc) from exc
    if "dimension" not in meta:
        raise StoreError(f"the PostgreSQL database {redact(url)} holds no memory-proxy store (no memory_meta table)")
    return int(meta["dimension"]), meta.get("model")


async def migrate(conn: Conn, dimension: int | None, model: str | None = None) -> int:
    """Apply the pending numbered steps and record (or check: proxy/store `vector_meta`) the vectors' dimension
    and model, in one transaction under a lock that other starting instances wait for; returns the oid of the
    vector type. `dimension` None checks nothing (re-embedding)."""
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
        meta: dict[str, str] = dict(await (await conn.execute("SELECT key, value FROM memory_meta")).fetchall())
        for key, value in vector_meta(meta, dimension, model).items():
            await conn.execute("INSERT INTO memory_meta (key, value) VALUES (%s, %s)", (key, value))
        row = await (await conn.execute("SELECT 'vector'::regtype::oid")).fetchone()
        assert row is not None
        return int(row[0])


def to_memory(row: Sequence[Any]) -> Memory:
    return Memory(*row[:12])
