"""`memory-proxy migrate --from URL --to URL`: copy every memory between stores, SQLite and PostgreSQL either way.

Rows go across as they are — ids, timestamps, expiry, history links (superseded memories too) and vectors — so
the copy recalls exactly what the source did; nothing is embedded again and no dedupe runs. Only the cleaning
every write path applies is applied here too: a row whose text or category holds a secret is not copied (counted
as refused), control characters leave the text, and the category becomes one of CATEGORIES. It reads the source
in (user, id) order, a batch at a time, and writes each batch in one transaction. A row already at the target
is overwritten only when the source's is newer or has since been superseded, so running it again copies
nothing twice and picks up what changed meanwhile: run it once while the old store still serves, stop the
writers, and run it again.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

from proxy.errors import ConfigError
from proxy.memories import clean_text
from proxy.models import Memory, category_of
from proxy.sensitive import secret_kind
from proxy.store import Store, locate, postgres, stored_dimension
from proxy.store.postgres import PostgresStore
from proxy.store.sqlite import COLUMNS, SqliteStore
from proxy.store.vectors import unit

Floats = npt.NDArray[np.float32]
Row = tuple[Memory, Floats]


class Endpoint(Protocol):
    async def export_rows(self, after: tuple[str, str] | None, limit: int) -> list[Row]: ...

    async def import_rows(self, rows: Sequence[Row]) -> int: ...

    async def close(self) -> None: ...


@dataclass
class Copied:
    read: int = 0
    written: int = 0
    refused: int = 0
    users: set[str] = field(default_factory=set)

    def __str__(self) -> str:
        return (f"{self.read} memories of {len(self.users)} users read, {self.written} written, "
                f"{self.read - self.written - self.refused} already there"
                + (f", {self.refused} refused as secrets" if self.refused else ""))


def cleaned(rows: Sequence[Row]) -> list[Row]:
    """The rows to copy, cleaned as every write path cleans (proxy/memories.py `Cleaning`, less the length cap and
    contact policy, which are the target proxy's settings): rows holding a secret are left out."""
    kept = []
    for memory, vector in rows:
        if not secret_kind(memory.text) and not secret_kind(memory.category):
            kept.append((replace(memory, text=clean_text(memory.text, len(memory.text)) or memory.text,
                                 category=category_of(memory.category)), vector))
    return kept


def same_store(first: str, second: str) -> bool:
    (kind, a), (other, b) = locate(first), locate(second)
    if kind == "postgresql" or other == "postgresql":
        return first == second
    return Path(a).resolve() == Path(b).resolve()


class SqliteEndpoint:
    """Rows of a SqliteStore, through its own writer thread and readers (so its cache rules hold)."""

    def __init__(self, store: SqliteStore) -> None:
        self.store = store

    async def export_rows(self, after: tuple[str, str] | None, limit: int) -> list[Row]:
        sql = f"SELECT {COLUMNS}, embedding FROM memories"
        sql += "" if after is None else " WHERE (user, id) > (?, ?)"
        args = (*(after or ()), limit)
        rows = await self.store.read(lambda conn: conn.execute(sql + " ORDER BY user, id LIMIT ?", args).fetchall())
        return [(Memory(*row[:10]), np.frombuffer(row[10], dtype=np.float32)) for row in rows]

    async def import_rows(self, rows: Sequence[Row]) -> int:
        params = [(m.id, m.user, m.text, m.category, m.source, m.created_at, m.updated_at, m.expires_at, m.supersedes,
                   m.superseded_by, np.ascontiguousarray(vector, dtype=np.float32).tobytes()) for m, vector in rows]
        users = sorted({m.user for m, _ in rows})

        def job(conn: sqlite3.Connection) -> int:
            before = conn.total_changes
            conn.executemany(
                f"INSERT INTO memories ({COLUMNS}, embedding) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (user, id) DO UPDATE SET text = excluded.text, category = excluded.category, "
                "source = excluded.source, updated_at = excluded.updated_at, expires_at = excluded.expires_at, "
                "supersedes = excluded.supersedes, superseded_by = excluded.superseded_by, "
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
        return [(Memory(*row[:10]), row[10]) for row in rows]

    async def import_rows(self, rows: Sequence[Row]) -> int:
        if not rows:
            return 0
        matrix = unit(self.store.as_matrix(np.stack([vector for _, vector in rows]), len(rows)))
        params = [(m.id, m.user, m.text, m.category, m.source, m.created_at, m.updated_at, m.expires_at, m.supersedes,
                   m.superseded_by, vector) for (m, _), vector in zip(rows, matrix, strict=True)]
        async with self.store.connection() as conn, conn.transaction(), conn.cursor() as cursor:
            await cursor.executemany(f"""INSERT INTO memories ({postgres.COLUMNS}, embedding) VALUES
                (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %b)
                ON CONFLICT ("user", id) DO UPDATE SET text = excluded.text, category = excluded.category,
                    source = excluded.source, updated_at = excluded.updated_at, expires_at = excluded.expires_at,
                    supersedes = excluded.supersedes, superseded_by = excluded.superseded_by,
                    embedding = excluded.embedding
                WHERE excluded.updated_at > memories.updated_at
                   OR (memories.superseded_by IS NULL AND excluded.superseded_by IS NOT NULL)""", params)
            return max(0, cursor.rowcount)

    async def close(self) -> None:
        await self.store.close()


def endpoint_of(store: Store) -> Endpoint:
    """The rows of a store already open (its owner closes it): for imports that keep ids and dates."""
    if isinstance(store, SqliteStore):
        return SqliteEndpoint(store)
    if isinstance(store, PostgresStore):
        return PostgresEndpoint(store)
    raise TypeError(f"no row access for {type(store).__name__}")


async def open_endpoint(url: str, dimension: int) -> Endpoint:
    kind, target = locate(url)
    if kind == "postgresql":
        return PostgresEndpoint(await PostgresStore.open(target, dimension=dimension, dedupe_similarity=1.0))
    return SqliteEndpoint(await SqliteStore.open(target, dimension=dimension, dedupe_similarity=1.0))


async def copy(source_url: str, target_url: str, *, batch: int = 1000,
               progress: Callable[[Copied], None] = lambda copied: None) -> Copied:
    """Copy every row of the source store into the target store (created if need be); see the module docstring."""
    if await asyncio.to_thread(same_store, source_url, target_url):
        raise ConfigError("--from and --to name the same store")
    dimension = await stored_dimension(source_url)
    source = await open_endpoint(source_url, dimension)
    try:
        target = await open_endpoint(target_url, dimension)
        try:
            copied, after = Copied(), None
            while rows := await source.export_rows(after, batch):
                kept = cleaned(rows)
                copied.refused += len(rows) - len(kept)
                copied.written += await target.import_rows(kept) if kept else 0
                copied.read += len(rows)
                copied.users.update(memory.user for memory, _ in rows)
                after = (rows[-1][0].user, rows[-1][0].id)
                progress(copied)
            return copied
        finally:
            await target.close()
    finally:
        await source.close()
