"""Sessions on PostgreSQL: the same database and connection pool as the memory store (proxy/store/postgres.py).

The tables mirror the SQLite ones (proxy/store/sqlite_sessions.py). Their schema steps are numbered in
`session_schema_version`, applied when the session store opens, under an advisory lock of their own, so instances
starting together apply them once and the memory store's own steps stay independent. Every write is one
transaction holding the user's advisory lock (the memory store's), so the checks that keep an erased session from
coming back (set_summary, add_chunks) cannot race an erase on another instance. Chunk vectors are stored unit
length and scored with a plain inner product over the user's rows only, as memories are.
"""

from __future__ import annotations

import builtins
import time
from collections.abc import Sequence
from typing import Any, Self

import numpy as np
import orjson

from proxy.store import Vector
from proxy.store.postgres import Conn, PostgresStore
from proxy.store.sessions import Chunk, ChunkHit, Message, NewChunk, NewMessage, Session
from proxy.store.vectors import unit

MIGRATION_LOCK = (0x6D656D70, 2)  # 'memp', 2: beside the memory store's (…, 1)
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE sessions (
            "user" text NOT NULL, session text NOT NULL, created_at double precision NOT NULL,
            updated_at double precision NOT NULL, expires_at double precision, first_seq bigint NOT NULL,
            last_seq bigint NOT NULL, summary text NOT NULL, summarized_through bigint NOT NULL,
            summary_tokens integer NOT NULL, chunked_through bigint NOT NULL, PRIMARY KEY ("user", session))""",
        'CREATE INDEX sessions_recent ON sessions ("user", updated_at)',
        "CREATE INDEX sessions_expiry ON sessions (expires_at) WHERE expires_at IS NOT NULL",
        """CREATE TABLE session_messages (
            "user" text NOT NULL, session text NOT NULL, seq bigint NOT NULL, message text NOT NULL,
            tokens integer NOT NULL, created_at double precision NOT NULL, PRIMARY KEY ("user", session, seq))""",
        """CREATE TABLE conversation_chunks (
            "user" text NOT NULL, id text NOT NULL, session text NOT NULL, first_seq bigint NOT NULL,
            last_seq bigint NOT NULL, text text NOT NULL, created_at double precision NOT NULL,
            embedding vector NOT NULL, PRIMARY KEY ("user", id))""",
        'CREATE INDEX conversation_chunks_session ON conversation_chunks ("user", session)',
    ),
)
SESSION_COLUMNS = ('"user", session, created_at, updated_at, expires_at, first_seq, last_seq, summary, '
                   "summarized_through, summary_tokens, chunked_through")
CHUNK_COLUMNS = 'id, "user", session, first_seq, last_seq, text, created_at'
LIVE = "(expires_at IS NULL OR expires_at > %(now)s)"
KEY = '"user" = %(user)s AND session = %(session)s'


def to_session(row: Sequence[Any]) -> Session:
    return Session(*row)


async def migrate(conn: Conn) -> None:
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", MIGRATION_LOCK)
        await conn.execute("CREATE TABLE IF NOT EXISTS session_schema_version ("
                           "version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())")
        row = await (await conn.execute("SELECT coalesce(max(version), 0) FROM session_schema_version")).fetchone()
        version = int(row[0]) if row else 0
        for number, steps in enumerate(MIGRATIONS[version:], start=version + 1):
            for statement in steps:
                await conn.execute(statement)
            await conn.execute("INSERT INTO session_schema_version (version) VALUES (%s)", (number,))


class PostgresSessionStore:
    def __init__(self, store: PostgresStore) -> None:
        self.store = store

    @classmethod
    async def open(cls, store: PostgresStore) -> Self:
        async with store.connection() as conn:
            await migrate(conn)
        return cls(store)

    async def fetch(self, sql: str, params: dict[str, Any], user: str | None = None) -> list[tuple[Any, ...]]:
        """Rows of one statement: a read, or with a `user` a write under that user's lock."""
        async with self.store.connection(user) as conn:
            return await self.store.fetch(conn, sql, params)

    # --- writes (each one transaction under the user's lock) --------------------------------------------------

    async def append(self, user: str, session: str, messages: Sequence[NewMessage], *, max_messages: int,
                     ttl_seconds: float | None) -> Session:
        now = time.time()
        key = {"user": user, "session": session, "now": now}
        async with self.store.connection(user) as conn:
            rows = await self.store.fetch(conn, f"SELECT last_seq, expires_at FROM sessions WHERE {KEY}", key)
            if not rows:
                last = 0
                await conn.execute(f"INSERT INTO sessions ({SESSION_COLUMNS}) VALUES (%(user)s, %(session)s, "
                                   "%(now)s, %(now)s, NULL, 1, 0, '', 0, 0, 0)", key)
            else:
                last = int(rows[0][0])
                if rows[0][1] is not None and rows[0][1] <= now:  # expired, not yet purged: it starts afresh
                    await conn.execute(f"DELETE FROM session_messages WHERE {KEY}", key)
                    await conn.execute("UPDATE sessions SET created_at = %(now)s, first_seq = %(last)s + 1, "
                                       "summary = '', summarized_through = %(last)s, summary_tokens = 0, "
                                       f"chunked_through = %(last)s WHERE {KEY}", {**key, "last": last})
            async with conn.cursor() as cursor:
                await cursor.executemany(
                    'INSERT INTO session_messages ("user", session, seq, message, tokens, created_at) '
                    "VALUES (%s, %s, %s, %s, %s, %s)",
                    [(user, session, last + n, orjson.dumps(m.message).decode(), m.tokens, now)
                     for n, m in enumerate(messages, start=1)])
            last += len(messages)
            await conn.execute(f"DELETE FROM session_messages WHERE {KEY} AND seq <= %(cut)s",
                               {**key, "cut": last - max_messages})
            rows = await self.store.fetch(conn, f"""UPDATE sessions SET updated_at = %(now)s,
                expires_at = %(expires_at)s, last_seq = %(last)s, first_seq = greatest(first_seq, %(first)s)
                WHERE {KEY} RETURNING {SESSION_COLUMNS}""", {
                **key, "expires_at": None if ttl_seconds is None else now + ttl_seconds, "last": last,
                "first": last - max_messages + 1})
        return to_session(rows[0])

    async def set_summary(self, user: str, session: str, summary: str, through_seq: int, tokens: int) -> bool:
        rows = await self.fetch(f"""UPDATE sessions SET summary = %(summary)s, summarized_through = %(through)s,
            summary_tokens = %(tokens)s WHERE {KEY} AND summarized_through < %(through)s RETURNING 1""", {
            "user": user, "session": session, "summary": summary, "through": through_seq, "tokens": tokens}, user)
        return bool(rows)

    async def add_chunks(self, user: str, session: str, chunks: Sequence[NewChunk], vectors: Vector,
                         through_seq: int) -> int:
        matrix = unit(self.store.as_matrix(vectors, len(chunks)))
        key = {"user": user, "session": session, "through": through_seq}
        async with self.store.connection(user) as conn:
            changed = await self.store.fetch(conn, "UPDATE sessions SET chunked_through = %(through)s "
                                                   f"WHERE {KEY} AND chunked_through < %(through)s RETURNING 1", key)
            if not changed:
                return 0
            now = time.time()
            async with conn.cursor() as cursor:
                await cursor.executemany(
                    f"INSERT INTO conversation_chunks ({CHUNK_COLUMNS}, embedding) VALUES (%s, %s, %s, %s, %s, %s, "
                    "%s, %b)", [(self.store.next_id(), user, session, chunk.first_seq, chunk.last_seq, chunk.text, now,
                                 vector) for chunk, vector in zip(chunks, matrix, strict=True)])
        return len(chunks)

    async def delete(self, user: str, session: str) -> bool:
        key = {"user": user, "session": session}
        async with self.store.connection(user) as conn:
            deleted = 0
            for table in ("sessions", "session_messages", "conversation_chunks"):
                deleted += (await conn.execute(f"DELETE FROM {table} WHERE {KEY}", key)).rowcount
        return deleted > 0

    async def erase(self, user: str) -> int:
        async with self.store.connection(user) as conn:
            await conn.execute('DELETE FROM session_messages WHERE "user" = %s', (user,))
            await conn.execute('DELETE FROM conversation_chunks WHERE "user" = %s', (user,))
            return (await conn.execute('DELETE FROM sessions WHERE "user" = %s', (user,))).rowcount

    async def purge_expired(self) -> int:
        async with self.store.connection() as conn, conn.transaction():
            now = {"now": time.time()}
            await conn.execute('DELETE FROM session_messages m USING sessions s WHERE m."user" = s."user" '
                               "AND m.session = s.session AND s.expires_at <= %(now)s", now)
            return (await conn.execute("DELETE FROM sessions WHERE expires_at <= %(now)s", now)).rowcount

    # --- reads -------------------------------------------------------------------------------------------------

    async def get(self, user: str, session: str) -> Session | None:
        rows = await self.fetch(f"SELECT {SESSION_COLUMNS} FROM sessions WHERE {KEY} AND {LIVE}",
                                {"user": user, "session": session, "now": time.time()})
        return to_session(rows[0]) if rows else None

    async def history(self, user: str, session: str, after_seq: int | None = None,
                      limit: int | None = None) -> tuple[Session | None, builtins.list[Message]]:
        key = {"user": user, "session": session, "now": time.time()}
        async with self.store.connection() as conn, conn.transaction():
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")  # the row and messages agree
            rows = await self.store.fetch(conn, f"SELECT {SESSION_COLUMNS} FROM sessions WHERE {KEY} AND {LIVE}", key)
            if not rows:
                return None, []
            found = to_session(rows[0])
            messages = await self.store.fetch(conn, f"""SELECT seq, message, tokens, created_at FROM session_messages
                WHERE {KEY} AND seq > %(after)s ORDER BY seq DESC LIMIT %(limit)s""", {
                **key, "after": found.summarized_through if after_seq is None else after_seq, "limit": limit})
        return found, [Message(r[0], orjson.loads(r[1]), r[2], r[3]) for r in reversed(messages)]

    async def list(self, user: str, limit: int = 100, before: str | None = None) -> builtins.list[Session]:
        sql = f'SELECT {SESSION_COLUMNS} FROM sessions WHERE "user" = %(user)s AND {LIVE}'
        if before is not None:
            sql += (" AND (updated_at, session) < (SELECT updated_at, session FROM sessions "
                    'WHERE "user" = %(user)s AND session = %(before)s)')
        rows = await self.fetch(sql + " ORDER BY updated_at DESC, session DESC LIMIT %(limit)s", {
            "user": user, "now": time.time(), "before": before, "limit": max(0, limit)})
        return [to_session(row) for row in rows]

    async def search_chunks(self, user: str, vector: Vector, k: int, min_score: float = -1.0,
                            exclude_session: str | None = None) -> builtins.list[ChunkHit]:
        query = self.store.as_matrix(vector, 1)[0]
        if k <= 0 or not np.any(query):
            return []
        rows = await self.fetch(f"""SELECT {CHUNK_COLUMNS}, score FROM (
            SELECT {CHUNK_COLUMNS}, -(embedding <#> %(query)b) AS score FROM conversation_chunks
            WHERE "user" = %(user)s AND session IS DISTINCT FROM %(exclude)s) scored
            WHERE score >= %(min_score)s ORDER BY score DESC, id DESC LIMIT %(k)s""", {
            "query": unit(query), "user": user, "exclude": exclude_session, "min_score": min_score, "k": k})
        return [ChunkHit(Chunk(*row[:7]), float(row[7])) for row in rows]

    async def count_chunks(self, user: str) -> int:
        rows = await self.fetch('SELECT count(*) FROM conversation_chunks WHERE "user" = %(user)s', {"user": user})
        return int(rows[0][0])
