"""The memory store: one protocol, two engines (SQLite + sqlite-vec by default, PostgreSQL + pgvector to share).

Every method is a coroutine: engines run their blocking work in threads (SQLite: one writer thread that owns
the write connection, reads in a small pool) so the event loop never waits on disk.

Semantics shared by every engine (and proven by one test suite run against each):
- `add` stores each NewMemory for the user; a near-duplicate (cosine >= dedupe_similarity) of an active memory
  of the same user updates that memory (text, category, updated_at, expiry) instead of adding one;
  `replaces` marks the named memory superseded (kept as history, never recalled).
- `search` ranks only that user's active memories, best first. The score is the cosine similarity, plus, when
  the question's text is given, `fusion.lexical_weight` x the share of its rare words the memory holds (BM25 over
  that user's memories alone: proxy/search.py). Among near-equal scores the newest wins. With `profile`, up to
  that many of the user's profile memories (most recently updated first) lead the list whatever their score.
- `known` says whether the user has (or had) memories, in one lookup: recall skips the embedding otherwise.
- Expired memories are never returned by search and are deleted by `purge_expired`.
"""

from __future__ import annotations

import asyncio
import builtins
import inspect
import re
from collections.abc import Awaitable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

from proxy.errors import ConfigError, StoreError
from proxy.models import Hit, Memory, NewMemory, new_id
from proxy.search import DENSE, Fusion

Vector = npt.NDArray[np.float32]
# A search's question: its vector, or the embedding under way (an engine that needs a round trip anyway makes it
# while the model runs: PostgreSQL asks for the user's generation meanwhile).
Query = Vector | Awaitable[Vector]


async def resolved(query: Query) -> Vector:
    """The vector of a Query, awaited if it is still being made."""
    return await query if inspect.isawaitable(query) else query


def vector_meta(found: Mapping[str, str], dimension: int | None, model: str | None = None) -> dict[str, str]:
    """The entries a store's meta table must gain for vectors of `dimension` made by `model` (None: not checked),
    given the entries `found`. StoreError when the store's vectors were made by another model (mixing two models'
    vectors would make recall silently wrong) or a re-embedding is under way. `dimension` None checks nothing."""
    if dimension is None:
        return {}
    if "reembed_model" in found:
        raise StoreError(f"the memories are being re-embedded for model {found['reembed_model']!r}: finish it "
                         "with `memory-proxy reembed` before serving")
    new = {}
    if "dimension" not in found:
        new["dimension"] = str(dimension)
    elif int(found["dimension"]) != dimension:
        raise StoreError(f"this database holds {found['dimension']}-dimensional vectors, but the embedding model "
                         f"makes {dimension}: use the model it was made with ({found.get('model', 'unrecorded')}), "
                         "or re-embed it for this one with `memory-proxy reembed`")
    if model:
        if "model" not in found:
            new["model"] = model
        elif found["model"] != model:
            raise StoreError(f"this database's vectors were made by model {found['model']!r}, not {model!r}: use "
                             "that model, or re-embed the memories for this one with `memory-proxy reembed`")
    return new


class Engine:
    """What every engine does alike with what it is given: vectors checked for shape, ids issued in order."""

    dimension: int
    last_id: str = ""

    def as_matrix(self, vectors: Vector, rows: int) -> Vector:
        matrix = np.ascontiguousarray(vectors, dtype=np.float32).reshape(rows, -1)
        if matrix.shape[1] != self.dimension:
            raise ValueError(f"vectors have {matrix.shape[1]} dimensions, the store {self.dimension}")
        return matrix

    async def problem(self) -> str | None:
        """Why this store cannot take writes now, in one line, or None (SQLite: its file deleted or replaced).
        A fault that the store's users share, like a PostgreSQL server being down, is not reported here: readiness
        takes an instance out of a load balancer, and all instances would go together."""
        return None

    def next_id(self) -> str:
        """new_id(), kept increasing within this store so that a batch written in one millisecond lists in order."""
        candidate = new_id()
        if candidate <= self.last_id:
            candidate = f"{int(self.last_id, 16) + 1:020x}"
        self.last_id = candidate
        return candidate


class Store(Protocol):
    dimension: int

    async def add(self, user: str, items: Sequence[NewMemory], vectors: Vector) -> list[Memory]:
        """Write memories (rows of `vectors` match `items`); returns each stored or updated memory."""

    async def search(self, user: str, vector: Query, k: int, min_score: float = -1.0, *, text: str = "",
                     fusion: Fusion = DENSE, profile: int = 0) -> list[Hit]:
        """Up to `profile` profile memories, then the user's top-k other active memories by score (cosine, plus
        the keyword share of `text` weighted by `fusion`), at least `min_score`. `vector` may still be under way
        (an awaitable): the engine awaits it."""

    async def known(self, user: str) -> bool:
        """Whether the user has or had memories (False: a search would find nothing)."""

    async def get(self, user: str, memory_id: str) -> Memory | None: ...

    async def list(self, user: str, limit: int = 100, before: str | None = None,
                   include_history: bool = False) -> list[Memory]:
        """Newest first; `before` is a memory id (the cursor); superseded memories only with include_history."""

    async def update(self, user: str, memory_id: str, *, text: str | None = None, category: str | None = None,
                     vector: Vector | None = None, expires_at: float | None = None,
                     happened_at: str | None = None) -> Memory | None:
        """Change what is given (None: unchanged) of a live memory; None when there is no such memory."""

    async def forget(self, user: str, memory_id: str) -> bool: ...

    async def erase(self, user: str) -> int:
        """Delete every memory of the user, history included; returns how many."""

    async def users(self, prefix: str = "", limit: int = 100, after: str | None = None) -> builtins.list[str]:
        """The store ids of the users it holds anything about (live memories or history, sessions, conversation
        chunks), in the engine's text order, after the id `after` (the cursor): those starting with `prefix`,
        and, unless `prefix` holds the tenant separator, only ids without one (a plain listing never shows
        another tenant's users)."""
    async def tenants_of(self, user: str) -> builtins.list[str]:
        """The tenants (proxy/auth.py) under which this user id has memories, sorted."""

    async def purge_expired(self) -> int: ...

    async def count(self, user: str | None = None) -> int: ...

    async def problem(self) -> str | None: ...

    async def close(self) -> None: ...


def successor(prefix: str) -> str | None:
    """The least string greater than every string that starts with `prefix` in code point order (which is
    UTF-8 byte order, SQLite's), or None when there is none (an empty prefix): `prefix <= s < successor`."""
    chars = list(prefix)
    while chars:
        last = ord(chars.pop()) + 1
        if last == 0xD800:  # surrogates cannot be stored as text: step over them
            last = 0xE000
        if last <= 0x10FFFF:
            return "".join(chars) + chr(last)
    return None


SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def locate(url: str) -> tuple[str, str]:
    """Which engine a store location names, and what that engine opens: ("postgresql", url) for `postgresql://`
    and `postgres://` URLs, ("sqlite", path) for `sqlite:///path` (`sqlite://relative.db`), a plain path or
    `:memory:`. Raises ConfigError for any other scheme (`mysql://host/db`): a URL is never taken for a file name."""
    found = SCHEME.match(url)
    scheme = found.group(1).lower() if found else ""
    if scheme in ("postgresql", "postgres"):
        return "postgresql", url
    if scheme == "sqlite":
        return "sqlite", url[len("sqlite://"):]
    if scheme:
        raise ConfigError(f"unknown memory store {redact(url)!r}: give a SQLite path (or sqlite:///path) or a "
                          "postgresql:// URL")
    return "sqlite", url


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


async def stored_vectors(url: str) -> tuple[int, str | None]:
    """The vector dimension of the store at `url`, and the model that made its vectors (None when unrecorded);
    the store must exist already: StoreError naming the location when there is none. Never creates anything:
    for commands that only read."""
    kind, target = locate(url)
    if kind == "postgresql":
        from proxy.store.postgres_db import stored_vectors as postgres_vectors

        return await postgres_vectors(target)
    from proxy.store.sqlite_db import stored_vectors as sqlite_vectors

    return await asyncio.to_thread(sqlite_vectors, target)


async def stored_dimension(url: str) -> int:
    """The vector dimension of the store at `url` (see `stored_vectors`)."""
    return (await stored_vectors(url))[0]


def check_creatable(url: str) -> None:
    """Refuse a SQLite path whose directory does not exist (a typo would otherwise make a tree of directories
    and an empty store); PostgreSQL databases are created by their server, not here."""
    kind, path = locate(url)
    if kind == "sqlite" and path not in ("", ":memory:"):
        parent = Path(path).expanduser().parent
        if not parent.is_dir():
            raise ConfigError(f"cannot create the memory store {path!r}: its directory {str(parent)!r} does not "
                              "exist")


async def open_store(url: str, *, dimension: int, dedupe_similarity: float = 0.9, model: str | None = None) -> Store:
    """Open (creating it if need be) the store `url` names (see `locate`). With `model`, a store whose vectors
    another model made is refused (see `vector_meta`)."""
    kind, target = locate(url)
    if kind == "postgresql":
        from proxy.store.postgres import PostgresStore

        return await PostgresStore.open(target, dimension=dimension, dedupe_similarity=dedupe_similarity, model=model)
    from proxy.store.sqlite import SqliteStore

    return await SqliteStore.open(target, dimension=dimension, dedupe_similarity=dedupe_similarity, model=model)
