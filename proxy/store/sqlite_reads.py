"""The SQLite engine's read side: the pool of reader connections, the per-user vector cache and search
(proxy/store/sqlite.py opens the file, owns the writer thread and writes; its docstring gives the layout).

Reads run in a small thread pool, each on its own connection in WAL mode, so they never wait on the writer and
never hold up the event loop. A search reads the user's generation, ranks the user's cached vectors and words
(proxy/store/vectors.py, proxy/search.py) and fetches the winners' rows, all in one read transaction begun under
the writer's `published` lock: a write of this process is in both the snapshot and the cache, or in neither.
"""

from __future__ import annotations

import asyncio
import builtins
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from queue import Queue
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from proxy.errors import StoreError
from proxy.models import PROFILE, TENANT_SEPARATOR, Hit, Memory
from proxy.search import DENSE, Fusion, Lexicon
from proxy.store import Engine, Query, resolved, successor
from proxy.store.sqlite_db import COLUMNS, LIVE, Writer, db, describe, to_memory
from proxy.store.vectors import Ids, UserVectors, VectorCache, choose, newest_first, unit

T = TypeVar("T")
# Where a user's data lives, and whether the table has an expiry (what has expired is no longer shown).
USER_TABLES = (("memories", True), ("sessions", True), ("conversation_chunks", False))


class SqliteReads(Engine):
    """The reader pool, the vector cache and the reads of the SQLite engine (proxy/store/sqlite.py: SqliteStore,
    which opens the file and writes). Reads raise StoreError once the store is closed, and a described
    StoreError (proxy/store/sqlite_db.py: describe) when SQLite fails."""

    path: str
    dimension: int
    busy_timeout: float
    writer: Writer
    reader_conns: builtins.list[sqlite3.Connection]
    idle: Queue[sqlite3.Connection]
    read_pool: ThreadPoolExecutor
    cache: VectorCache
    max_cached_rows: int
    closed: bool

    def start_reading(self, readers: builtins.list[sqlite3.Connection], cache_bytes: int) -> None:
        """Take the reader connections and size the cache (bytes)."""
        self.reader_conns = readers
        self.idle = Queue()
        for conn in readers:
            self.idle.put(conn)
        self.read_pool = ThreadPoolExecutor(len(readers), thread_name_prefix="memory-store-read")
        self.cache = VectorCache(cache_bytes)
        # A user whose matrix would take over a quarter of the cache is scored in SQL instead.
        self.max_cached_rows = cache_bytes // 4 // (4 * self.dimension)

    async def read(self, job: Callable[[sqlite3.Connection], T]) -> T:
        if self.closed:
            raise StoreError("the memory store is closed")
        return await asyncio.get_running_loop().run_in_executor(self.read_pool, self.with_reader, job)

    def with_reader(self, job: Callable[[sqlite3.Connection], T]) -> T:
        conn = self.idle.get()
        try:
            return job(conn)
        except db.Error as exc:
            raise describe(self.path, exc, self.busy_timeout) from exc
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self.idle.put(conn)

    async def get(self, user: str, memory_id: str) -> Memory | None:
        def job(conn: sqlite3.Connection) -> Memory | None:
            row = conn.execute(f"SELECT {COLUMNS} FROM memories WHERE user = ? AND id = ? "
                               "AND (expires_at IS NULL OR expires_at > ?)", (user, memory_id, time.time())).fetchone()
            return None if row is None else to_memory(row)

        return await self.read(job)

    async def list(self, user: str, limit: int = 100, before: str | None = None,
                   include_history: bool = False) -> list[Memory]:
        sql = f"SELECT {COLUMNS} FROM memories WHERE user = ? AND (expires_at IS NULL OR expires_at > ?)"
        sql += "" if before is None else " AND id < ?"
        sql += "" if include_history else " AND superseded_by IS NULL"
        args = (user, time.time(), *(() if before is None else (before,)), max(0, limit))
        return await self.read(lambda conn: [to_memory(row) for row in
                                             conn.execute(sql + " ORDER BY id DESC LIMIT ?", args)])

    async def users(self, prefix: str = "", limit: int = 100, after: str | None = None) -> builtins.list[str]:
        # Each table's first `limit` users come off its primary key (user, ...) in order, reading every row of
        # the users listed; the union of those few is sorted. Binary text order lets the prefix bound the scan on
        # both sides. One lower bound, chosen here: given two, SQLite may seek on the looser one.
        upper = successor(prefix)
        lower = "user > :after" if after is not None and after >= prefix else "user >= :prefix"
        where = lower + ("" if upper is None else " AND user < :upper")
        where += " AND instr(user, char(31)) = 0" if TENANT_SEPARATOR not in prefix else ""
        parts = [f"SELECT * FROM (SELECT DISTINCT user FROM {table} WHERE {where}"
                 + (" AND (expires_at IS NULL OR expires_at > :now)" if expiry else "") + " ORDER BY user LIMIT :limit)"
                 for table, expiry in USER_TABLES]
        sql = " UNION ".join(parts) + " ORDER BY 1 LIMIT :limit"
        args = {"prefix": prefix, "after": after, "upper": upper, "now": time.time(), "limit": max(0, limit)}
        return await self.read(lambda conn: [row[0] for row in conn.execute(sql, args)])

    async def count(self, user: str | None = None) -> int:
        """Active memories (what search can return) of the user, or of everyone."""
        sql = f"SELECT count(*) FROM memories WHERE {LIVE}" + ("" if user is None else " AND user = ?")
        args = (time.time(), *(() if user is None else (user,)))
        return await self.read(lambda conn: int(conn.execute(sql, args).fetchone()[0]))

    async def tenants_of(self, user: str) -> builtins.list[str]:
        """The tenants under which `user` has memories (a scan of the table: for the CLI's hints, not requests)."""
        sql = ("SELECT DISTINCT substr(user, 1, length(user) - length(?1) - 1) FROM memories "
               "WHERE length(user) > length(?1) + 1 AND substr(user, -length(?1) - 1) = char(31) || ?1 ORDER BY 1")
        return await self.read(lambda conn: [row[0] for row in conn.execute(sql, (user,))])

    async def search(self, user: str, vector: Query, k: int, min_score: float = -1.0, *, text: str = "",
                     fusion: Fusion = DENSE, profile: int = 0) -> builtins.list[Hit]:
        query = unit(self.as_matrix(await resolved(vector), 1)[0])
        if k <= 0 and profile <= 0:
            return []
        return await self.read(lambda conn: self.search_in(conn, user, query, k, min_score, text, fusion, profile))

    async def known(self, user: str) -> bool:
        """Whether the user has (or had) memories: a user who never had any needs no embedding of the question.
        A user whose vectors this process holds is known without asking the file."""
        if user in self.cache.entries:
            return True
        return await self.read(lambda conn: conn.execute("SELECT 1 FROM users WHERE user = ?", (user,)).fetchone()
                               is not None)

    def search_in(self, conn: sqlite3.Connection, user: str, query: npt.NDArray[np.float32], k: int,
                  min_score: float, text: str, fusion: Fusion, profile: int) -> builtins.list[Hit]:
        now = time.time()
        # One snapshot: the generation, the vectors and the rows agree. Begun holding `published`, so that a
        # write of this process is in both the snapshot and the cache, or in neither.
        with self.writer.published:
            conn.execute("BEGIN")
            row = conn.execute("SELECT generation FROM users WHERE user = ?", (user,)).fetchone()
            held = None if row is None else self.cache.get(user, row[0])
        if row is None:
            self.cache.discard(user)  # erased by another process: `known` asks the file again
            return []
        vectors = held or self.load(conn, user, row[0], now)
        if vectors.matrix is None:  # too many to cache: every live row scored in SQL, its words indexed now
            scored = conn.execute("SELECT id, updated_at, 1.0 - vec_distance_cosine(embedding, ?), text, category "
                                  f"FROM memories WHERE user = ? AND {LIVE} ORDER BY id",
                                  (query.tobytes(), user, now)).fetchall()
            ids: Ids = [r[0] for r in scored]
            updated = [r[1] for r in scored]
            dense = np.array([-np.inf if r[2] is None else r[2] for r in scored], dtype=np.float64)
            lexicon = Lexicon.build(r[3] for r in scored) if fusion.lexical else None
            pinned = newest_first([n for n, r in enumerate(scored) if r[4] == PROFILE], updated, ids)
            top = choose(dense, updated, ids, k, min_score, text=text, lexicon=lexicon, fusion=fusion,
                         profile=pinned[:profile])
        else:
            ids = vectors.ids
            top = choose(vectors.scores(query, now), vectors.updated, vectors.ids, k, min_score, text=text,
                         lexicon=vectors.lexicon, fusion=fusion, profile=vectors.profile(now, profile))
        if not top:
            return []
        wanted = [str(ids[index]) for index, _ in top]
        rows = conn.execute(f"SELECT {COLUMNS} FROM memories WHERE user = ? AND id IN "
                            f"({', '.join('?' * len(wanted))})", (user, *wanted)).fetchall()
        memories = {memory.id: memory for memory in map(to_memory, rows)}
        return [Hit(memories[str(ids[index])], score) for index, score in top if str(ids[index]) in memories]

    def load(self, conn: sqlite3.Connection, user: str, generation: int, now: float) -> UserVectors:
        """Read the user's active vectors and words into a cache entry (or a marker that they are too many)."""
        rows = conn.execute("SELECT id, updated_at, expires_at, embedding, text, category FROM memories "
                            f"WHERE user = ? AND {LIVE} ORDER BY id LIMIT ?",
                            (user, now, self.max_cached_rows + 1)).fetchall()
        if len(rows) > self.max_cached_rows:
            entry = UserVectors(generation)
        else:
            matrix = np.frombuffer(b"".join(r[3] for r in rows), dtype=np.float32).reshape(len(rows), self.dimension)
            expires = np.array([np.inf if r[2] is None else r[2] for r in rows], dtype=np.float64)
            pinned = np.array([r[5] == PROFILE for r in rows], dtype=bool)
            entry = UserVectors(generation, np.array([r[0] for r in rows], dtype=str),
                                np.array([r[1] for r in rows], dtype=np.float64), expires,
                                unit(matrix), float(expires.min(initial=np.inf)),
                                lexicon=Lexicon.build(r[4] for r in rows), pinned=pinned if pinned.any() else None)
        self.cache.put(user, entry)
        return entry
