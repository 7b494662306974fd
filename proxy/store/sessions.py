"""The session store: the turns of each conversation the proxy keeps, its rolling summary, and the conversation
chunks (a few messages each, with a vector) that make past conversations searchable.

A separate protocol from the memory `Store`, but never a separate database: each engine's implementation runs on
the memory store it is given (SQLite: its single writer thread and reader pool, in the same file; PostgreSQL:
its pool), so one `db` setting holds everything a user has and erasing a user is one place to look.

Semantics shared by every engine (and proven by one test suite run against each):
- A session is (user, session id). `append` numbers messages 1, 2, 3... (`seq`, never reused within the session),
  keeps at most `max_messages` (the oldest go) and sets the expiry to now + ttl (None: never).
- An expired session is invisible (get, history, list) and is deleted by `purge_expired`; appending to it starts
  it afresh (no messages, no summary; seq keeps counting). Conversation chunks outlive session expiry: they are
  the long-term recall; deleting the session or erasing the user removes them.
- The summary covers messages up to `summarized_through`; `set_summary` never moves that backwards, and writes
  nothing for a session that no longer exists (a summary finishing after an erase must not bring it back).
  `add_chunks` likewise stores nothing for a session that is gone.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol

from proxy.models import TENANT_SEPARATOR
from proxy.store import Vector

if TYPE_CHECKING:
    from proxy.store import Store


@dataclass(frozen=True, slots=True)
class Message:
    """A stored message: the OpenAI message object as it will be replayed, and its token count."""

    seq: int
    message: dict[str, Any]
    tokens: int
    created_at: float


@dataclass(frozen=True, slots=True)
class NewMessage:
    message: dict[str, Any]
    tokens: int


@dataclass(frozen=True, slots=True)
class Session:
    user: str
    id: str
    created_at: float
    updated_at: float
    expires_at: float | None
    first_seq: int  # the oldest message still stored (last_seq + 1 when none is)
    last_seq: int
    summary: str
    summarized_through: int
    summary_tokens: int
    chunked_through: int

    @property
    def messages(self) -> int:
        return self.last_seq - self.first_seq + 1

    def to_dict(self) -> dict[str, Any]:
        """As the API shows it (the user without its tenant namespace)."""
        return {"object": "session", "id": self.id, "user": self.user.rpartition(TENANT_SEPARATOR)[2],
                "created_at": self.created_at, "updated_at": self.updated_at, "expires_at": self.expires_at,
                "messages": self.messages, "first_seq": self.first_seq, "last_seq": self.last_seq,
                "summary": self.summary, "summarized_through": self.summarized_through}


@dataclass(frozen=True, slots=True)
class NewChunk:
    first_seq: int
    last_seq: int
    text: str


@dataclass(frozen=True, slots=True)
class Chunk:
    id: str
    user: str
    session: str
    first_seq: int
    last_seq: int
    text: str
    created_at: float


@dataclass(frozen=True, slots=True)
class ChunkHit:
    chunk: Chunk
    score: float

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self.chunk)
        data["user"] = self.chunk.user.rpartition(TENANT_SEPARATOR)[2]
        return {"object": "conversation.chunk", **data, "score": round(self.score, 6)}


class SessionStore(Protocol):
    async def append(self, user: str, session: str, messages: Sequence[NewMessage], *, max_messages: int,
                     ttl_seconds: float | None) -> Session:
        """Add messages at the end (creating the session); returns the session as it now is."""

    async def get(self, user: str, session: str) -> Session | None: ...

    async def history(self, user: str, session: str, after_seq: int | None = None,
                      limit: int | None = None) -> tuple[Session | None, list[Message]]:
        """The session and its stored messages after `after_seq` (None: after those its summary covers), oldest
        first, read in one snapshot; with a `limit`, the newest `limit` of them."""

    async def list(self, user: str, limit: int = 100, before: str | None = None) -> builtins.list[Session]:
        """The user's live sessions, most recently updated first; `before` is a session id (the cursor)."""

    async def set_summary(self, user: str, session: str, summary: str, through_seq: int, tokens: int) -> bool:
        """Store the rolling summary of messages up to `through_seq`; False when the session is gone or already
        has a summary that reaches further."""

    async def add_chunks(self, user: str, session: str, chunks: Sequence[NewChunk], vectors: Vector,
                         through_seq: int) -> int:
        """Store conversation chunks (rows of `vectors` match) and mark the session chunked up to
        `through_seq`; returns how many were stored (0, storing nothing, when the session is gone or already
        chunked that far)."""

    async def search_chunks(self, user: str, vector: Vector, k: int, min_score: float = -1.0,
                            exclude_session: str | None = None) -> builtins.list[ChunkHit]:
        """The user's top-k chunks by cosine similarity, at least `min_score`."""

    async def delete(self, user: str, session: str) -> bool:
        """Remove the session, its messages and its chunks; False when there was nothing."""

    async def erase(self, user: str) -> int:
        """Remove every session, message and chunk of the user; returns how many sessions."""

    async def purge_expired(self) -> int:
        """Delete expired sessions and their messages (chunks stay); returns how many sessions."""

    async def count_chunks(self, user: str) -> int: ...


async def open_session_store(store: Store) -> SessionStore | None:
    """The session store that runs on this memory store's engine (its tables made if need be), or None for an
    engine without one."""
    from proxy.store.sqlite import SqliteStore

    if isinstance(store, SqliteStore):
        from proxy.store.sqlite_sessions import SqliteSessionStore

        return SqliteSessionStore(store)  # its tables come with the memory store's own migrations
    from proxy.store.postgres import PostgresStore

    if isinstance(store, PostgresStore):
        from proxy.store.postgres_sessions import PostgresSessionStore

        return await PostgresSessionStore.open(store)
    return None
