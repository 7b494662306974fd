"""`memory-proxy migrate --from URL --to URL`: copy every memory between stores, SQLite and PostgreSQL either way.

Rows go across as they are — ids, timestamps, expiry, history links (superseded memories too) and vectors — so
the copy recalls exactly what the source did; nothing is embedded again and no dedupe runs. It reads the source
in (user, id) order, a batch at a time, and writes each batch in one transaction. A row already at the target
is overwritten only when the source's is newer or has since been superseded, so running it again copies
nothing twice and picks up what changed meanwhile: run it once while the old store still serves, stop the
writers, and run it again.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import psycopg

from proxy.errors import ConfigError, StoreError
from proxy.models import Memory
from proxy.store import postgres
from proxy.store.postgres import PostgresStore, describe
from proxy.store.sqlite import COLUMNS, SqliteStore, db
from proxy.store.vectors import unit

Floats = npt.NDArray[np.float32]
Row = tuple[Memory, Floats]
FIELDS = len(COLUMNS.split(","))  # a memory's own columns, then its embedding


def fields(memory: Memory) -> tuple[Any, ...]:
    """The memory's values in COLUMNS order (both engines list the same columns)."""
    return tuple(getattr(memory, name.strip().strip('"')) for name in COLUMNS.split(","))


class Endpoint(Protocol):
    async def export_rows(self, after: tuple[str, str] | None, limit: int) -> list[Row]: ...

    async def import_rows(self, rows: Sequence[Row]) -> int: ...

    async def close(self) -> None: ...


@dataclass
class Copied:
    read: int = 0
    written: int = 0
    users: set[str] = field(default_factory=set)

    def __str__(self) -> str:
        return (f"{self.read} memories of {len(self.users)} users read, {self.written} written, "
                f"{self.read - self.written} already there")


def is_postgres(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def sqlite_path(url: str) -> str:
    return url[len("sqlite://"):] if url.startswith("sqlite://") else url


def same_store(first: str, second: str) -> bool:
    if is_postgres(first) or is_postgres(second):
        return first == second
    return Path(sqlite_path(first)).resolve() == Path(sqlite_path(second)).resolve()


class SqliteEndpoint:
    """Rows of a SqliteStore, through its own writer thread and readers (so its cache rules hold)."""

    def __init__(self, store: SqliteStore) -> None:
        self.store = store

    async def export_rows(self, after: tuple[str, str] | None, limit: int) -> list[Row]:
        sql = f"SELECT {COLUMNS}, embedding FROM memories"
        sql += "" if after is None else " WHERE (user, id) > (?, ?)"
        args = (*(after or ()), limit)
        rows = await self.store.read(lambda conn: conn.execute(sql + " ORDER BY user, id LIMIT ?", args).fetchall())
        return [(Memory(*row[:FIELDS]), np.frombuffer(row[FIELDS], dtype=np.float32)) for row in rows]

    async def import_rows(self, rows: Sequence[Row]) -> int:
        params = [(*fields(m), np.ascontiguousarray(vector, dtype=np.float32).tobytes()) for m, vector in rows]
        users = sorted({m.user for m, _ in rows})

        def job(conn: sqlite3.Connection) -> int:
            before = conn.total_changes
            conn.executemany(
                f"INSERT INTO memories ({COLUMNS}, embedding) VALUES ({', '.join('?' * (FIELDS + 1))}) "
                "ON CONFLICT (user, id) DO UPDATE SET text = excluded.text, category = excluded.category, "
                "source = excluded.source, updated_at = excluded.updated_at, expires_at = excluded.expires_at, "
                "supersedes = excluded.supersedes, superseded_by = excluded.superseded_by, "
                "happened_at = excluded.happened_at, valid_until = excluded.valid_until, "
                "embedding = excluded.embedding WHERE excluded.updated_at > memories.updated_at "
                "OR (memories.superseded_by IS NULL AND excluded.superseded_by IS NOT NULL)", params)
            written = int(conn.total_changes - before)
            for user in users:  # other processes' caches of these users go stale
                self.store.bump(conn, user)
            return written

        written = await self.store.write(None, job)
        for user in users:
            self.store.cache.discard(user)
        return written

    async def close(self) -> None:
        await self.store.close()


class PostgresEndpoint:
    """Rows of a PostgresStore, through its pool; vectors are stored unit length there, as the store does."""

    def __init__(self, store: PostgresStore) -> None:
        self.store = store

    async def export_rows(self, after: tuple[str, str] | None, limit: int) -> list[Row]:
        sql = f"SELECT {postgres.COLUMNS}, embedding FROM memories"
        sql += "" if after is None else ' WHERE ("user", id) > (%(user)s, %(id)s)'
        params = {"user": after[0] if after else None, "id": after[1] if after else None, "limit": limit}
        async with self.store.connection() as conn:
            cursor = conn.cursor(binary=True)  # vectors come back through the store's binary loader
            await cursor.execute(sql + ' ORDER BY "user", id LIMIT %(limit)s', params)
            rows = await cursor.fetchall()
        return [(Memory(*row[:FIELDS]), row[FIELDS]) for row in rows]

    async def import_rows(self, rows: Sequence[Row]) -> int:
        if not rows:
            return 0
        matrix = unit(self.store.as_matrix(np.stack([vector for _, vector in rows]), len(rows)))
        params = [(*fields(m), vector) for (m, _), vector in zip(rows, matrix, strict=True)]
        async with self.store.connection() as conn, conn.transaction(), conn.cursor() as cursor:
            await cursor.executemany(f"""INSERT INTO memories ({postgres.COLUMNS}, embedding) VALUES
                ({', '.join(['%s'] * FIELDS)}, %b)
                ON CONFLICT ("user", id) DO UPDATE SET text = excluded.text, category = excluded.category,
                    source = excluded.source, updated_at = excluded.updated_at, expires_at = excluded.expires_at,
                    supersedes = excluded.supersedes, superseded_by = excluded.superseded_by,
                    happened_at = excluded.happened_at, valid_until = excluded.valid_until,
                    embedding = excluded.embedding
                WHERE excluded.updated_at > memories.updated_at
                   OR (memories.superseded_by IS NULL AND excluded.superseded_by IS NOT NULL)""", params)
            written = max(0, cursor.rowcount)
            for user in sorted({m.user for m, _ in rows}):  # every instance's cache of these users goes stale
                await self.store.bump(conn, user)
        for user in {m.user for m, _ in rows}:
            self.store.cache.discard(user)
        return written

    async def close(self) -> None:
        await self.store.close()


def sqlite_dimension(path: str) -> tuple[int, str | None]:
    """The vector dimension and model a SQLite store was made for (it must exist: a source is never created)."""
    if not Path(path).is_file():
        raise StoreError(f"no SQLite memory store at {path!r}")
    try:
        conn = db.connect(Path(path).resolve().as_uri() + "?mode=ro", uri=True)
        try:
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        finally:
            conn.close()
    except db.Error as exc:
        raise StoreError(f"{path!r} is not a memory-proxy SQLite store ({exc})") from exc
    if "dimension" not in meta:
        raise StoreError(f"{path!r} holds no memories yet (no vector dimension recorded)")
    return int(meta["dimension"]), meta.get("model")


async def postgres_dimension(url: str) -> tuple[int, str | None]:
    """The vector dimension and model a PostgreSQL store was made for."""
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
        raise StoreError("the PostgreSQL database holds no memory-proxy store (no memory_meta table)")
    return int(meta["dimension"]), meta.get("model")


async def open_endpoint(url: str, dimension: int, model: str | None = None) -> Endpoint:
    """The store at `url` for vectors of `dimension` made by `model` (a new store records it; another's refuses)."""
    if is_postgres(url):
        return PostgresEndpoint(await PostgresStore.open(url, dimension=dimension, dedupe_similarity=1.0, model=model))
    return SqliteEndpoint(await SqliteStore.open(sqlite_path(url), dimension=dimension, dedupe_similarity=1.0,
                                                model=model))


async def copy(source_url: str, target_url: str, *, batch: int = 1000,
               progress: Callable[[Copied], None] = lambda copied: None) -> Copied:
    """Copy every row of the source store into the target store (created if need be); see the module docstring."""
    if await asyncio.to_thread(same_store, source_url, target_url):
        raise ConfigError("--from and --to name the same store")
    if is_postgres(source_url):
        dimension, model = await postgres_dimension(source_url)
    else:
        dimension, model = await asyncio.to_thread(sqlite_dimension, sqlite_path(source_url))
    source = await open_endpoint(source_url, dimension, model)
    try:
        target = await open_endpoint(target_url, dimension, model)  # the vectors come along: so does their model
        try:
            copied, after = Copied(), None
            while rows := await source.export_rows(after, batch):
                copied.written += await target.import_rows(rows)
                copied.read += len(rows)
                copied.users.update(memory.user for memory, _ in rows)
                after = (rows[-1][0].user, rows[-1][0].id)
                progress(copied)
            return copied
        finally:
            await target.close()
    finally:
        await source.close()
