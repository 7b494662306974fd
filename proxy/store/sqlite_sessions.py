"""Sessions on SQLite: the same file, the same single writer thread and reader pool as the memory store.

Three tables (migration step 2 in proxy/store/sqlite.py), each clustered by user so one user's rows sit together:
`sessions` (one row per conversation: bounds, rolling summary, how far it is summarised and chunked),
`session_messages` (user, session, seq) → the message as JSON and its token count, and `conversation_chunks`
(user, id) → text and float32 vector. Chunks are scored in SQL with sqlite-vec's `vec_distance_cosine` over the
user's own rows only: a search is an explicit API call or an opt-in recall, so the vector cache of the memories
(proxy/store/vectors.py) is not worth its upkeep here. Every write runs in the writer thread in one transaction,
so the checks that keep an erased session from coming back (set_summary, add_chunks) cannot race the erase.
"""

from __future__ import annotations

import builtins
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson

from proxy.store import Vector
from proxy.store.sessions import Chunk, ChunkHit, Message, NewChunk, NewMessage, Session
from proxy.store.sqlite import SqliteStore

SESSION_COLUMNS = ("user, session, created_at, updated_at, expires_at, first_seq, last_seq, summary, "
                   "summarized_through, summary_tokens, chunked_through")
CHUNK_COLUMNS = "id, user, session, first_seq, last_seq, text, created_at"
LIVE = "(expires_at IS NULL OR expires_at > ?)"


def to_session(row: tuple[Any, ...]) -> Session:
    return Session(*row)


class SqliteSessionStore:
    def __init__(self, store: SqliteStore) -> None:
        self.store = store

    # --- writes (in the memory store's writer thread) -----------------------------------------------------------

    async def append(self, user: str, session: str, messages: Sequence[NewMessage], *, max_messages: int,
                     ttl_seconds: float | None) -> Session:
        rows = [(orjson.dumps(m.message).decode(), m.tokens) for m in messages]
        return await self.store.write(None, lambda conn: self.append_in(conn, user, session, rows, max_messages,
                                                                         ttl_seconds))

    @staticmethod
    def append_in(conn: sqlite3.Connection, user: str, session: str, rows: list[tuple[str, int]],
                  max_messages: int, ttl_seconds: float | None) -> Session:
        now = time.time()
        expires_at = None if ttl_seconds is None else now + ttl_seconds
        key = (user, session)
        row = conn.execute("SELECT last_seq, expires_at FROM sessions WHERE user = ? AND session = ?", key).fetchone()
        if row is None:
            last = 0
            conn.execute(f"INSERT INTO sessions ({SESSION_COLUMNS}) VALUES (?, ?, ?, ?, ?, 1, 0, '', 0, 0, 0)",
                         (*key, now, now, expires_at))
        else:
            last = int(row[0])
            if row[1] is not None and row[1] <= now:  # expired, not yet purged: it starts afresh
                conn.execute("DELETE FROM session_messages WHERE user = ? AND session = ?", key)
                conn.execute("UPDATE sessions SET created_at = ?, first_seq = ?, summary = '', summarized_through = ?,"
                             " summary_tokens = 0, chunked_through = ? WHERE user = ? AND session = ?",
                             (now, last + 1, last, last, *key))
        conn.executemany("INSERT INTO session_messages (user, session, seq, message, tokens, created_at) "
                         "VALUES (?, ?, ?, ?, ?, ?)",
                         [(*key, last + n, text, tokens, now) for n, (text, tokens) in enumerate(rows, start=1)])
        last += len(rows)
        conn.execute("DELETE FROM session_messages WHERE user = ? AND session = ? AND seq <= ?",
                     (*key, last - max_messages))
        conn.execute("UPDATE sessions SET updated_at = ?, expires_at = ?, last_seq = ?, "
                     "first_seq = max(first_seq, ?) WHERE user = ? AND session = ?",
                     (now, expires_at, last, last - max_messages + 1, *key))
        return to_session(conn.execute(f"SELECT {SESSION_COLUMNS} FROM sessions WHERE user = ? AND session = ?",
                                       key).fetchone())

    async def set_summary(self, user: str, session: str, summary: str, through_seq: int, tokens: int) -> bool:
        def job(conn: sqlite3.Connection) -> bool:
            return bool(conn.execute(
                "UPDATE sessions SET summary = ?, summarized_through = ?, summary_tokens = ? "
                "WHERE user = ? AND session = ? AND summarized_through < ?",
                (summary, through_seq, tokens, user, session, through_seq)).rowcount)

        return await self.store.write(None, job)

    async def add_chunks(self, user: str, session: str, chunks: Sequence[NewChunk], vectors: Vector,
                         through_seq: int) -> int:
        matrix = self.store.as_matrix(vectors, len(chunks))

        def job(conn: sqlite3.Connection) -> int:
            changed = conn.execute("UPDATE sessions SET chunked_through = ? WHERE user = ? AND session = ? "
                                   "AND chunked_through < ?", (through_seq, user, session, through_seq)).rowcount
            if not changed:
                return 0
            now = time.time()
            conn.executemany(f"INSERT INTO conversation_chunks ({CHUNK_COLUMNS}, embedding) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             [(self.store.next_id(), user, session, chunk.first_seq, chunk.last_seq, chunk.text, now,
                               vector.tobytes()) for chunk, vector in zip(chunks, matrix, strict=True)])
            return len(chunks)

        return await self.store.write(None, job)

    async def delete(self, user: str, session: str) -> bool:
        def job(conn: sqlite3.Connection) -> bool:
            key = (user, session)
            deleted = conn.execute("DELETE FROM sessions WHERE user = ? AND session = ?", key).rowcount
            deleted += conn.execute("DELETE FROM session_messages WHERE user = ? AND session = ?", key).rowcount
            deleted += conn.execute("DELETE FROM conversation_chunks WHERE user = ? AND session = ?", key).rowcount
            return bool(deleted)

        return await self.store.write(None, job)

    async def erase(self, user: str) -> int:
        def job(conn: sqlite3.Connection) -> int:
            conn.execute("DELETE FROM session_messages WHERE user = ?", (user,))
            conn.execute("DELETE FROM conversation_chunks WHERE user = ?", (user,))
            return int(conn.execute("DELETE FROM sessions WHERE user = ?", (user,)).rowcount)

        return await self.store.write(None, job)

    async def purge_expired(self) -> int:
        def job(conn: sqlite3.Connection) -> int:
            now = time.time()
            conn.execute("DELETE FROM session_messages WHERE (user, session) IN "
                         "(SELECT user, session FROM sessions WHERE expires_at <= ?)", (now,))
            return int(conn.execute("DELETE FROM sessions WHERE expires_at <= ?", (now,)).rowcount)

        return await self.store.write(None, job)

    # --- reads (in the memory store's reader pool) ----------------------------------------------------------------

    async def get(self, user: str, session: str) -> Session | None:
        def job(conn: sqlite3.Connection) -> Session | None:
            row = conn.execute(f"SELECT {SESSION_COLUMNS} FROM sessions WHERE user = ? AND session = ? AND {LIVE}",
                               (user, session, time.time())).fetchone()
            return None if row is None else to_session(row)

        return await self.store.read(job)

    async def history(self, user: str, session: str, after_seq: int | None = None,
                      limit: int | None = None) -> tuple[Session | None, builtins.list[Message]]:
        def job(conn: sqlite3.Connection) -> tuple[Session | None, builtins.list[Message]]:
            conn.execute("BEGIN")  # one snapshot: the session row and its messages agree
            row = conn.execute(f"SELECT {SESSION_COLUMNS} FROM sessions WHERE user = ? AND session = ? AND {LIVE}",
                               (user, session, time.time())).fetchone()
            if row is None:
                return None, []
            found = to_session(row)
            after = found.summarized_through if after_seq is None else after_seq
            rows = conn.execute("SELECT seq, message, tokens, created_at FROM session_messages WHERE user = ? AND "
                                "session = ? AND seq > ? ORDER BY seq DESC LIMIT ?",
                                (user, session, after, -1 if limit is None else limit)).fetchall()
            return found, [Message(r[0], orjson.loads(r[1]), r[2], r[3]) for r in reversed(rows)]

        return await self.store.read(job)

    async def list(self, user: str, limit: int = 100, before: str | None = None) -> builtins.list[Session]:
        sql = f"SELECT {SESSION_COLUMNS} FROM sessions WHERE user = ? AND {LIVE}"
        args: tuple[Any, ...] = (user, time.time())
        if before is not None:
            sql += (" AND (updated_at, session) < "
                    "(SELECT updated_at, session FROM sessions WHERE user = ? AND session = ?)")
            args += (user, before)
        sql += " ORDER BY updated_at DESC, session DESC LIMIT ?"
        return await self.store.read(lambda conn: [to_session(r) for r in conn.execute(sql, (*args, max(0, limit)))])

    async def search_chunks(self, user: str, vector: Vector, k: int, min_score: float = -1.0,
                            exclude_session: str | None = None) -> builtins.list[ChunkHit]:
        query = self.store.as_matrix(vector, 1)[0]
        norm = float(np.linalg.norm(query))
        if k <= 0 or norm == 0.0:
            return []
        sql = (f"SELECT {CHUNK_COLUMNS}, score FROM (SELECT {CHUNK_COLUMNS}, "
               "1.0 - vec_distance_cosine(embedding, ?) AS score FROM conversation_chunks "
               "WHERE user = ? AND session IS NOT ?) WHERE score >= ? ORDER BY score DESC, id DESC LIMIT ?")
        args = ((query / norm).astype(np.float32).tobytes(), user, exclude_session, min_score, k)
        return await self.store.read(lambda conn: [ChunkHit(Chunk(*r[:7]), float(r[7]))
                                                   for r in conn.execute(sql, args)])

    async def count_chunks(self, user: str) -> int:
        return await self.store.read(lambda conn: int(conn.execute(
            "SELECT count(*) FROM conversation_chunks WHERE user = ?", (user,)).fetchone()[0]))
