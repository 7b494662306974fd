"""The SQLite engine: one file, WAL, one writer thread, a small pool of readers, a per-user vector cache.

Layout (chosen by measuring, `python -m bench.store`; 384-d float32, 2-core machine, 1M memories in the file):

    layout                                         search p50 @1k / @10k   bytes per memory (100k users x 10)
    plain table, rowid + index (user, id), SQL      1.7 ms / 26 ms           ~1,870 (16 KiB pages)
    clustered WITHOUT ROWID (user, id), SQL         0.9 ms / 9.5 ms          ~2,120
    clustered + int8 side table, SQL + re-rank      1.0 ms / 9.3 ms          ~2,650
    vec0, partition key = user                      1.1 ms / 8.6 ms          ~158,000 (1.5 MiB chunk per user)
    vec0, user as a metadata filter                 ~340 ms / ~340 ms        ~1,600 (scans every user's chunks)
    clustered table + per-user numpy cache (this)   0.10 ms / 0.45 ms warm;  ~2,120
                                                    first search 1.5 ms / 25 ms (loads the user's vectors)

So memories live in ONE table clustered by (user, id) — WITHOUT ROWID, 16 KiB pages so a ~1.7 KB row stays on
its leaf page — which keeps one user's rows contiguous and costs ~1.4x the vector's own 1,536 bytes, with no
per-user reservation. SQL cannot score 10k rows in 1 ms (just visiting them costs ~3 ms), int8 does not help
(per-row overhead dominates) and vec0's partition chunks cost ~1.5 MB per user, so search runs in numpy over a
per-user matrix of that user's active vectors, cached in LRU order up to `cache_bytes`. Every write bumps a
random `users.generation` in the same transaction; a search reads it in its own read transaction and reloads
on a mismatch, so writes by other processes invalidate the cache too. Writes of this process instead edit the
cached vectors in place (proxy/store/vectors.py: dedupe in numpy, appends without a copy), so the recall after
a write stays warm: with a write per request, a user with 10k memories would otherwise reload (25 ms) each
time. Users too big for the cache are scored in SQL with sqlite-vec's `vec_distance_cosine` over their own
rows only; dedupe on write does the same inside the write transaction, so it sees the batch's earlier items and
is serialised by the single writer.

The reader pool, the cache's reads and the search: proxy/store/sqlite_reads.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from proxy.errors import StoreError, StoreUnavailable
from proxy.models import PROFILE, Memory, NewMemory
from proxy.store import Vector
from proxy.store.draft import Draft
from proxy.store.fileid import FileIdentity
from proxy.store.sqlite_db import (
    COLUMNS,
    LIVE,
    MIGRATIONS,
    Writer,
    connect,
    db,
    describe,
    migrate,
    random_generation,
    to_memory,
)
from proxy.store.sqlite_reads import SqliteReads
from proxy.store.vectors import UserVectors, unit

__all__ = ["COLUMNS", "MIGRATIONS", "SqliteStore", "db"]
T = TypeVar("T")


class SqliteStore(SqliteReads):
    """One SQLite file as the memory store: opened (and migrated) by `open`, written by one writer thread, read
    by the pool of proxy/store/sqlite_reads.py. Writes raise StoreError once closed, StoreUnavailable when the
    file was deleted or replaced under the process, and a described StoreError when SQLite fails."""

    def __init__(self, path: str, dimension: int, dedupe_similarity: float, writer: Writer,
                 readers: list[sqlite3.Connection], cache_bytes: int, busy_timeout: float,
                 temp_dir: str | None) -> None:
        self.path = path
        self.dimension = dimension
        self.dedupe_similarity = dedupe_similarity
        self.busy_timeout = busy_timeout
        self.writer = writer
        self.start_reading(readers, cache_bytes)
        self.temp_dir = temp_dir
        self.closed = False
        self.identity = FileIdentity.of(path)

    @classmethod
    async def open(cls, path: str, *, dimension: int, dedupe_similarity: float, busy_timeout: float = 5.0,
                   readers: int = 2, cache_bytes: int = 128 << 20, model: str | None = None) -> SqliteStore:
        """Open (creating it and its parent directories) the database at `path`; ":memory:" or "" is a
        temporary file removed at close, so that several connections can share it. With `model`, a file whose
        vectors another model made is refused."""
        return await asyncio.to_thread(cls.open_sync, path, dimension, dedupe_similarity, busy_timeout,
                                       readers, cache_bytes, model)

    @classmethod
    def open_sync(cls, path: str, dimension: int, dedupe_similarity: float, busy_timeout: float, readers: int,
                  cache_bytes: int, model: str | None = None) -> SqliteStore:
        temp_dir = tempfile.mkdtemp(prefix="memory-proxy-") if path in ("", ":memory:") else None
        file = str(Path(temp_dir) / "memory.db") if temp_dir else path
        conns: list[sqlite3.Connection] = []
        try:
            Path(file).parent.mkdir(parents=True, exist_ok=True)
            conns.append(connect(file, busy_timeout, writer=True))
            migrate(conns[0], dimension, model)
            conns += [connect(file, busy_timeout, writer=False) for _ in range(max(1, readers))]
        except (db.Error, OSError, StoreError) as exc:
            for conn in conns:
                conn.close()
            if temp_dir:
                shutil.rmtree(temp_dir, ignore_errors=True)
            if isinstance(exc, StoreError):
                raise
            raise describe(file, exc, busy_timeout) from exc
        writer = Writer(conns[0], lambda exc: describe(file, exc, busy_timeout))
        writer.start()
        return cls(file, dimension, dedupe_similarity, writer, conns[1:], cache_bytes, busy_timeout, temp_dir)

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            await asyncio.to_thread(self.shutdown)

    def shutdown(self) -> None:
        self.writer.stop()  # after the writes already queued
        self.read_pool.shutdown(wait=True)
        with contextlib.suppress(db.Error):
            self.writer.conn.execute("PRAGMA optimize")
        for conn in [self.writer.conn, *self.reader_conns]:
            conn.close()
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    async def write(self, user: str | None, job: Callable[[sqlite3.Connection], T], *, keeps_cache: bool = False) -> T:
        """Run `job` in the writer thread. The user's cache entry is dropped afterwards (other processes notice
        through the generation) unless the job `keeps_cache`: it stored the entry of the new state itself."""
        if self.closed:
            raise StoreError("the memory store is closed")

        def checked(conn: sqlite3.Connection) -> T:
            gone = self.identity.problem()  # in the writer thread: a stat() never holds up the event loop
            if gone:
                raise StoreUnavailable(f"SQLite memory store {self.path!r}: {gone}")
            return job(conn)

        try:
            result = await asyncio.wrap_future(self.writer.submit(checked))
        except BaseException:
            if user is not None:
                self.cache.discard(user)
            raise
        if user is not None and not keeps_cache:
            self.cache.discard(user)
        return result

    async def problem(self) -> str | None:
        """Why the store cannot take writes now (its file deleted or replaced), or None: for /readyz."""
        return None if self.closed else await asyncio.to_thread(self.identity.problem)

    @staticmethod
    def bump(conn: sqlite3.Connection, user: str) -> int:
        generation = random_generation()
        conn.execute("INSERT INTO users (user, generation) VALUES (?, ?) "
                     "ON CONFLICT (user) DO UPDATE SET generation = excluded.generation", (user, generation))
        return generation

    @staticmethod
    def row(conn: sqlite3.Connection, user: str, memory_id: str) -> Memory:
        return to_memory(conn.execute(f"SELECT {COLUMNS} FROM memories WHERE user = ? AND id = ?",
                                      (user, memory_id)).fetchone())

    # --- writes (each runs in the writer thread, in one transaction) -----------------------------------------

    async def add(self, user: str, items: Sequence[NewMemory], vectors: Vector) -> list[Memory]:
        matrix = self.as_matrix(vectors, len(items))
        if not items:
            return []
        return await self.write(user, lambda conn: self.add_in(conn, user, items, matrix), keeps_cache=True)

    def add_in(self, conn: sqlite3.Connection, user: str, items: Sequence[NewMemory],
               matrix: npt.NDArray[np.float32]) -> list[Memory]:
        now = time.time()
        draft = self.draft(conn, user, now)
        stored = []
        for item, vector in zip(items, matrix, strict=True):
            blob = vector.tobytes()
            expires_at = None if item.ttl_seconds is None else now + item.ttl_seconds
            replaced = self.replaceable(conn, user, item.replaces)
            direction = unit(vector)
            if draft is None:
                memory_id = self.twin(conn, user, blob, now, replaced)
            else:
                memory_id = draft.twin(direction, now, replaced, self.dedupe_similarity)
            stated = None  # the text the near-duplicate held
            if memory_id is not None:
                stated = conn.execute("SELECT text FROM memories WHERE user = ? AND id = ?",
                                      (user, memory_id)).fetchone()[0]
                conn.execute("UPDATE memories SET text = ?, category = iif(?, category, ?), updated_at = ?, "
                             "expires_at = ?, embedding = ?, supersedes = coalesce(supersedes, ?), "
                             "happened_at = coalesce(?, happened_at) WHERE user = ? AND id = ?",
                             (item.text, item.keep_category, item.category, now, expires_at, blob, replaced,
                              item.happened_at, user, memory_id))
            else:
                memory_id = self.next_id()
                conn.execute(f"INSERT INTO memories ({COLUMNS}, embedding) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?, NULL, ?)",
                             (memory_id, user, item.text, item.category, item.source, now, now, expires_at, replaced,
                              item.happened_at, blob))
            if replaced is not None:
                conn.execute("UPDATE memories SET superseded_by = ?, valid_until = ? WHERE user = ? AND id = ?",
                             (memory_id, now, user, replaced))
            row = self.row(conn, user, memory_id)
            if draft is not None:
                pinned = row.category == PROFILE
                if stated != item.text or not draft.touch(memory_id, now, expires_at, direction, pinned):
                    draft.put(memory_id, now, expires_at, direction, item.text, pinned)
                if replaced is not None:
                    draft.remove(replaced)
            stored.append(row)
        generation = self.bump(conn, user)
        if draft is None:
            self.cache.discard(user)
        else:
            # Stored with the COMMIT (Writer.published), before the next write drafts from it: a reader never
            # ranks with rows its snapshot does not hold, and a failed commit stores nothing.
            entry = draft.build(generation)
            self.writer.after_commit.append(lambda: self.cache.put(
                user, entry if len(entry.ids) <= self.max_cached_rows else UserVectors(generation)))
        return stored

    def draft(self, conn: sqlite3.Connection, user: str, now: float) -> Draft | None:
        """The user's cached vectors to edit along this write (loaded now if need be: the writer is off the
        request path, and the next recall finds them warm); None when the user is too big to cache."""
        row = conn.execute("SELECT generation FROM users WHERE user = ?", (user,)).fetchone()
        if row is None:
            entry = self.load(conn, user, 0, now)
        else:
            entry = self.cache.get(user, row[0]) or self.load(conn, user, row[0], now)
        return None if entry.matrix is None else Draft(entry)

    @staticmethod
    def replaceable(conn: sqlite3.Connection, user: str, memory_id: str | None) -> str | None:
        """The id to supersede: the user's own memory, not already superseded; anything else is ignored."""
        if memory_id is None:
            return None
        row = conn.execute("SELECT id FROM memories WHERE user = ? AND id = ? AND superseded_by IS NULL",
                           (user, memory_id)).fetchone()
        return None if row is None else str(row[0])

    def twin(self, conn: sqlite3.Connection, user: str, blob: bytes, now: float, exclude: str | None) -> str | None:
        """The user's closest active memory if it is a near-duplicate (the one being replaced does not count)."""
        row = conn.execute(
            "SELECT id, distance FROM (SELECT id, vec_distance_cosine(embedding, ?) AS distance FROM memories "
            f"WHERE user = ? AND {LIVE} AND id IS NOT ?) WHERE distance IS NOT NULL ORDER BY distance LIMIT 1",
            (blob, user, now, exclude)).fetchone()
        return str(row[0]) if row is not None and 1.0 - row[1] >= self.dedupe_similarity else None

    async def update(self, user: str, memory_id: str, *, text: str | None = None, category: str | None = None,
                     vector: Vector | None = None, expires_at: float | None = None,
                     happened_at: str | None = None) -> Memory | None:
        blob = None if vector is None else self.as_matrix(vector, 1).tobytes()

        def job(conn: sqlite3.Connection) -> Memory | None:
            now = time.time()
            changed = conn.execute(
                "UPDATE memories SET text = coalesce(?, text), category = coalesce(?, category), "
                "embedding = coalesce(?, embedding), expires_at = coalesce(?, expires_at), "
                "happened_at = coalesce(?, happened_at), updated_at = ? "
                "WHERE user = ? AND id = ? AND (expires_at IS NULL OR expires_at > ?)",
                (text, category, blob, expires_at, happened_at, now, user, memory_id, now)).rowcount
            if not changed:
                return None
            self.bump(conn, user)
            return self.row(conn, user, memory_id)

        return await self.write(user, job)

    async def forget(self, user: str, memory_id: str) -> bool:
        def job(conn: sqlite3.Connection) -> bool:
            deleted = conn.execute("DELETE FROM memories WHERE user = ? AND id = ?", (user, memory_id)).rowcount
            if deleted:
                self.bump(conn, user)
            return bool(deleted)

        return await self.write(user, job)

    async def erase(self, user: str) -> int:
        def job(conn: sqlite3.Connection) -> int:
            deleted = conn.execute("DELETE FROM memories WHERE user = ?", (user,)).rowcount
            conn.execute("DELETE FROM users WHERE user = ?", (user,))
            return int(deleted)

        return await self.write(user, job)

    async def purge_expired(self) -> int:
        def job(conn: sqlite3.Connection) -> int:
            now = time.time()
            users = conn.execute("SELECT DISTINCT user FROM memories WHERE expires_at <= ?", (now,)).fetchall()
            for (user,) in users:
                self.bump(conn, user)
            return int(conn.execute("DELETE FROM memories WHERE expires_at <= ?", (now,)).rowcount)

        return await self.write(None, job)
