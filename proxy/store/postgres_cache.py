"""The PostgreSQL engine's per-instance cache and its search (proxy/store/postgres.py opens it and writes).

Per-instance cache: scoring in SQL costs ~1.3 us per memory (20 ms for a user with 10k), so each process keeps
users' vectors, words and rows in memory (proxy/store/vectors.py, as the SQLite engine does) and scores them in
numpy. Coherence across instances: every write bumps the user's random `memory_users.generation` under the user's
lock, in its own transaction, and an entry answers for one generation exactly. A search asks for the generation
while the question is still being embedded (a `Query` under way); if this process's entry was made for it, the
search ranks and answers from the entry with no round trip after the embedding. Else it ranks with the entry it
has and fetches the winners together with the generation (one statement), and uses them only if they agree; else
it reads again when a write of this process overtook its snapshot (waiting for that write with no connection
held), and reloads the user's rows when another process wrote. This process's writes to one user queue in the
process (`UserWrites`); each edits the entry instead of dropping it (dedupe answered from it too) and stores it
right after its COMMIT, so recall right after a write, and the next write, find it warm. `purge_expired` bumps
nothing: expired rows are never eligible in an entry anyway. Users too big for the cache are scored in SQL.

The numpy work on a user's rows (scoring, indexing their words, editing the entry) runs in a thread once the user
has more than OFF_LOOP_ROWS of them, as the SQLite engine's reads and writes always do: indexing a 10k-memory
user's words takes ~75 ms, scoring them ~1 ms, and the event loop must not wait on either.
"""

from __future__ import annotations

import asyncio
import builtins
import time
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import numpy as np
import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from proxy.errors import StoreError
from proxy.models import PROFILE, Hit
from proxy.search import DENSE, Fusion, Lexicon
from proxy.store import Engine, Query, resolved
from proxy.store.postgres_db import (
    COLUMNS,
    LIVE,
    PREFIXED,
    Conn,
    Floats,
    RawVectorLoader,
    describe,
    matrix_of,
    rows_of,
    to_memory,
)
from proxy.store.vectors import TIE, UserVectors, VectorCache, choose, held_bytes, newest_first, rank, unit

EXTRA = 5  # rows fetched past the k-th: enough, nearly always, to show that no near-tie was left out
# Narrow rows through the scan and its top-N sort (id and score only); the full columns of the few winners after.
# ORDER BY the output column, not the expression again: PostgreSQL would compute each distance twice (+25%).
TOP = f"""WITH top AS (
    SELECT id, -(embedding <#> %(query)b) AS score FROM memories WHERE "user" = %(user)s AND {LIVE}
    ORDER BY score DESC LIMIT %(limit)s)
SELECT {PREFIXED}, top.score FROM top
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


class UserWrites:
    """This process's writes to one user: one at a time (`lock`), and `ended`, set as the current one ends."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.ended = asyncio.Event()


class CachedEngine(Engine):
    """The connections, this process's write queue per user, the vector cache and the search of the PostgreSQL
    engine (proxy/store/postgres.py: PostgresStore, which opens it and writes)."""

    url: str
    pool: AsyncConnectionPool[Conn]
    closed: bool
    cache: VectorCache
    writers: weakref.WeakValueDictionary[str, UserWrites]
    vector_oid: int
    max_cached_rows: int

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

    @staticmethod
    async def fetch(conn: Conn, sql: str, params: dict[str, Any] | Sequence[Any]) -> list[tuple[Any, ...]]:
        return await (await conn.execute(sql, params)).fetchall()

    async def current_generation(self, user: str) -> int | None:
        """The user's generation now, on a connection of its own (None: no such user)."""
        async with self.connection() as conn:
            return await self.generation(conn, user)

    @staticmethod
    async def generation(conn: Conn, user: str) -> int | None:
        rows = await (await conn.execute('SELECT generation FROM memory_users WHERE "user" = %s', (user,))).fetchall()
        return int(rows[0][0]) if rows else None

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
        # No round trip after the question's embedding when this process holds the entry of the user's generation:
        # the generation is asked for while the model runs, and the entry holds the rows it ranks. The entry is
        # looked up once the generation is known: under steady writes of this process it is often newer than the
        # one held when the search began. (A write of this process whose COMMIT is done but whose entry is not yet
        # stored: no entry has that generation, and the search goes on below.)
        held = self.cache.peek(user)
        if held is not None and held.memories is not None:
            generation, question = await asyncio.gather(self.current_generation(user), resolved(vector))
            if generation is None:
                self.cache.discard(user)  # erased by another instance: `known` asks the database again
                return []
            entry = self.cache.get(user, generation)
            if entry is not None and entry.memories is not None:
                held_rows = entry.memories
                top = await self.ranked(entry, unit(self.as_matrix(question, 1))[0], time.time(), k, min_score, text,
                                        fusion, profile)
                return [Hit(held_rows[row], score) for row, score in top]
            entry = self.cache.peek(user)
        else:
            entry, question = held, await resolved(vector)
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
        rows = await rows_of(cursor)  # decoded in a thread past OFF_LOOP_DECODE_ROWS
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
                           pinned=pinned if pinned.any() else None, memories=memories,
                           memories_bytes=held_bytes(memories))
