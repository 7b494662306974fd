"""The session store suite: every engine's SessionStore must pass it unchanged (see `location`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from proxy.models import NewMemory
from proxy.store import Store, open_store
from proxy.store.sessions import NewChunk, NewMessage, SessionStore, open_session_store
from proxy.store.sqlite import MIGRATIONS, db
from tests.pgserver import postgres_databases, postgres_location, postgres_server  # noqa: F401

DIM = 16
BASIS = np.eye(DIM, dtype=np.float32)
Vec = npt.NDArray[np.float32]
MANY = 1000


@pytest.fixture(params=["sqlite", "postgres"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a fresh store of the engine lives. Another engine adds its name to params and a `<name>_location`
    fixture."""
    if request.param == "sqlite":
        return str(tmp_path / "memory.db")
    return str(request.getfixturevalue(f"{request.param}_location"))


@pytest.fixture
async def memory_store(location: str) -> AsyncIterator[Store]:
    store = await open_store(location, dimension=DIM)
    yield store
    await store.close()


@pytest.fixture
async def sessions(memory_store: Store) -> SessionStore:
    store = await open_session_store(memory_store)
    assert store is not None
    return store


def said(*texts: str) -> list[NewMessage]:
    return [NewMessage({"role": "user" if i % 2 == 0 else "assistant", "content": text}, len(text))
            for i, text in enumerate(texts)]


def toward(direction: int, similarity: float) -> Vec:
    """A unit vector with exactly `similarity` cosine to BASIS[0]."""
    vector: Vec = (similarity * BASIS[0] + np.sqrt(1 - similarity**2) * BASIS[direction]).astype(np.float32)
    return vector


async def test_append_numbers_messages_and_history_reads_them_in_order(sessions: SessionStore) -> None:
    before = time.time()
    first = await sessions.append("ann", "s1", said("hi", "hello"), max_messages=MANY, ttl_seconds=None)
    assert (first.user, first.id, first.first_seq, first.last_seq, first.messages) == ("ann", "s1", 1, 2, 2)
    assert before <= first.created_at == first.updated_at and first.expires_at is None
    second = await sessions.append("ann", "s1", said("how are you?", "fine"), max_messages=MANY, ttl_seconds=60)
    assert second.last_seq == 4 and second.created_at == first.created_at and second.updated_at >= first.updated_at
    assert second.expires_at is not None and second.expires_at == pytest.approx(time.time() + 60, abs=5)
    session, messages = await sessions.history("ann", "s1")
    assert session == second
    assert [(m.seq, m.message["content"], m.tokens) for m in messages] == [
        (1, "hi", 2), (2, "hello", 5), (3, "how are you?", 12), (4, "fine", 4)]
    assert [m.seq for m in (await sessions.history("ann", "s1", after_seq=2))[1]] == [3, 4]
    assert [m.seq for m in (await sessions.history("ann", "s1", limit=3))[1]] == [2, 3, 4]
    assert await sessions.get("ann", "s1") == second
    assert await sessions.get("ann", "s2") is None and await sessions.get("bob", "s1") is None
    assert await sessions.history("bob", "s1") == (None, [])


async def test_history_after_none_starts_after_the_summary(sessions: SessionStore) -> None:
    await sessions.append("ann", "s1", said("a", "b", "c", "d"), max_messages=MANY, ttl_seconds=None)
    assert await sessions.set_summary("ann", "s1", "a and b", through_seq=2, tokens=7)
    session, messages = await sessions.history("ann", "s1", after_seq=None)
    assert session is not None and (session.summary, session.summarized_through, session.summary_tokens) == (
        "a and b", 2, 7)
    assert [m.seq for m in messages] == [3, 4]


async def test_max_messages_drops_the_oldest(sessions: SessionStore) -> None:
    await sessions.append("ann", "s1", said("1", "2", "3"), max_messages=4, ttl_seconds=None)
    session = await sessions.append("ann", "s1", said("4", "5", "6"), max_messages=4, ttl_seconds=None)
    assert (session.first_seq, session.last_seq, session.messages) == (3, 6, 4)
    assert [m.message["content"] for m in (await sessions.history("ann", "s1"))[1]] == ["3", "4", "5", "6"]


async def test_an_expired_session_is_invisible_purged_and_starts_afresh(sessions: SessionStore) -> None:
    await sessions.append("ann", "old", said("a", "b"), max_messages=MANY, ttl_seconds=0.05)
    await sessions.append("ann", "kept", said("c"), max_messages=MANY, ttl_seconds=None)
    await sessions.set_summary("ann", "old", "a then b", 2, 3)
    await sessions.add_chunks("ann", "old", [NewChunk(1, 2, "user: a")], np.stack([BASIS[1]]), 2)
    await asyncio.sleep(0.1)
    assert await sessions.get("ann", "old") is None and await sessions.history("ann", "old") == (None, [])
    assert [s.id for s in await sessions.list("ann")] == ["kept"]
    again = await sessions.append("ann", "old", said("new"), max_messages=MANY, ttl_seconds=None)
    assert (again.first_seq, again.last_seq, again.summary, again.summarized_through) == (3, 3, "", 2)
    assert [m.message["content"] for m in (await sessions.history("ann", "old"))[1]] == ["new"]
    assert not await sessions.set_summary("ann", "old", "stale summary of a and b", 2, 3)  # it no longer fits
    await sessions.append("ann", "gone", said("x"), max_messages=MANY, ttl_seconds=0.05)
    await asyncio.sleep(0.1)
    assert await sessions.purge_expired() == 1
    assert await sessions.purge_expired() == 0
    assert await sessions.count_chunks("ann") == 1  # chunks outlive their session: they are the long-term recall


async def test_the_summary_only_moves_forward_and_never_revives_a_session(sessions: SessionStore) -> None:
    await sessions.append("ann", "s1", said(*"abcdef"), max_messages=MANY, ttl_seconds=None)
    assert await sessions.set_summary("ann", "s1", "up to 4", 4, 3)
    assert not await sessions.set_summary("ann", "s1", "up to 2", 2, 3)
    assert (await sessions.get("ann", "s1")).summary == "up to 4"  # type: ignore[union-attr]
    assert not await sessions.set_summary("ann", "nope", "x", 1, 1)
    assert await sessions.get("ann", "nope") is None


async def test_chunks_are_searched_per_user_by_cosine(sessions: SessionStore) -> None:
    await sessions.append("ann", "s1", said(*"abcd"), max_messages=MANY, ttl_seconds=None)
    await sessions.append("ann", "s2", said(*"ab"), max_messages=MANY, ttl_seconds=None)
    await sessions.append("bob", "s1", said(*"ab"), max_messages=MANY, ttl_seconds=None)
    stored = await sessions.add_chunks("ann", "s1", [NewChunk(1, 2, "close"), NewChunk(1, 4, "far")],
                                       np.stack([toward(1, 0.8), toward(2, 0.3)]) * 3, 4)  # any length
    assert stored == 2
    await sessions.add_chunks("ann", "s2", [NewChunk(1, 2, "closest")], np.stack([toward(3, 0.9)]), 2)
    await sessions.add_chunks("bob", "s1", [NewChunk(1, 2, "bob's")], np.stack([BASIS[0]]), 2)
    hits = await sessions.search_chunks("ann", BASIS[0], k=5)
    assert [(h.chunk.text, h.chunk.session) for h in hits] == [("closest", "s2"), ("close", "s1"), ("far", "s1")]
    assert [round(h.score, 4) for h in hits] == [0.9, 0.8, 0.3]
    assert (hits[1].chunk.user, hits[1].chunk.first_seq, hits[1].chunk.last_seq) == ("ann", 1, 2)
    assert [h.chunk.text for h in await sessions.search_chunks("ann", BASIS[0], k=1)] == ["closest"]
    assert [h.chunk.text for h in await sessions.search_chunks("ann", BASIS[0], k=5, min_score=0.5)] == [
        "closest", "close"]
    assert [h.chunk.text for h in await sessions.search_chunks("ann", BASIS[0], k=5, exclude_session="s2")] == [
        "close", "far"]
    assert await sessions.search_chunks("ann", np.zeros(DIM, dtype=np.float32), k=5) == []
    assert await sessions.search_chunks("cat", BASIS[0], k=5) == []
    assert (await sessions.get("ann", "s1")).chunked_through == 4  # type: ignore[union-attr]
    assert await sessions.add_chunks("ann", "nope", [NewChunk(1, 2, "x")], np.stack([BASIS[0]]), 2) == 0
    assert await sessions.count_chunks("ann") == 3


async def test_list_is_most_recent_first_with_a_cursor(sessions: SessionStore) -> None:
    for name in ("a", "b", "c", "d"):
        await sessions.append("ann", name, said("x"), max_messages=MANY, ttl_seconds=None)
    await sessions.append("ann", "b", said("y"), max_messages=MANY, ttl_seconds=None)
    assert [s.id for s in await sessions.list("ann")] == ["b", "d", "c", "a"]
    assert [s.id for s in await sessions.list("ann", limit=2)] == ["b", "d"]
    assert [s.id for s in await sessions.list("ann", limit=2, before="d")] == ["c", "a"]
    assert await sessions.list("bob") == []


async def test_delete_and_erase_remove_sessions_messages_and_chunks(sessions: SessionStore) -> None:
    for user in ("ann", "bob"):
        for name in ("s1", "s2"):
            await sessions.append(user, name, said("a", "b"), max_messages=MANY, ttl_seconds=None)
            await sessions.add_chunks(user, name, [NewChunk(1, 2, "a b")], np.stack([BASIS[0]]), 2)
    assert await sessions.delete("ann", "s1")
    assert not await sessions.delete("ann", "s1")
    assert await sessions.history("ann", "s1") == (None, [])
    assert [h.chunk.session for h in await sessions.search_chunks("ann", BASIS[0], 5)] == ["s2"]
    assert await sessions.erase("ann") == 1
    assert await sessions.list("ann") == [] and await sessions.count_chunks("ann") == 0
    assert len(await sessions.list("bob")) == 2 and await sessions.count_chunks("bob") == 2


async def test_sessions_share_the_memory_store_and_its_file(memory_store: Store, sessions: SessionStore) -> None:
    await memory_store.add("ann", [NewMemory("likes tea")], np.stack([BASIS[0]]))
    await sessions.append("ann", "s1", said("a"), max_messages=MANY, ttl_seconds=None)
    assert await memory_store.erase("ann") == 1
    assert await sessions.get("ann", "s1") is not None  # each erase is its own: the API calls both


async def test_an_existing_database_gains_the_session_tables(tmp_path: Path) -> None:
    path = str(tmp_path / "old.db")
    store = await open_store(path, dimension=DIM)
    await store.add("ann", [NewMemory("likes tea")], np.stack([BASIS[0]]))
    await store.close()
    conn = db.connect(path)
    for table in ("session_messages", "conversation_chunks", "sessions"):
        conn.execute(f"DROP TABLE {table}")
    conn.execute("PRAGMA user_version = 1")  # as the release before sessions left it
    conn.commit()
    conn.close()
    store = await open_store(path, dimension=DIM)
    try:
        sessions = await open_session_store(store)
        assert sessions is not None
        await sessions.append("ann", "s1", said("a"), max_messages=MANY, ttl_seconds=None)
        assert await store.count("ann") == 1 and (await sessions.get("ann", "s1")) is not None
    finally:
        await store.close()
    conn = db.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) == 2
    conn.close()


async def test_chunks_are_stored_once(sessions: SessionStore) -> None:
    await sessions.append("ann", "s1", said(*"abcd"), max_messages=MANY, ttl_seconds=None)
    assert await sessions.add_chunks("ann", "s1", [NewChunk(1, 2, "a b")], np.stack([BASIS[0]]), 2) == 1
    assert await sessions.add_chunks("ann", "s1", [NewChunk(1, 2, "a b")], np.stack([BASIS[0]]), 2) == 0
    assert await sessions.count_chunks("ann") == 1


async def test_opening_again_keeps_the_sessions(location: str) -> None:
    for turn in range(2):  # the second open finds the tables made and applies nothing
        store = await open_store(location, dimension=DIM)
        try:
            sessions = await open_session_store(store)
            assert sessions is not None
            session = await sessions.append("ann", "s1", said("a"), max_messages=MANY, ttl_seconds=None)
            assert session.last_seq == turn + 1
        finally:
            await store.close()


async def test_users_with_only_sessions_or_chunks_are_listed(memory_store: Store, sessions: SessionStore) -> None:
    await memory_store.add("cid", [NewMemory("likes tea")], np.stack([BASIS[0]]))
    await sessions.append("bea", "s1", said("a"), max_messages=MANY, ttl_seconds=None)
    await sessions.append("ann", "s1", said("a", "b"), max_messages=MANY, ttl_seconds=0.2)
    await sessions.add_chunks("ann", "s1", [NewChunk(1, 2, "a b")], np.stack([BASIS[1]]), 2)
    await sessions.append("dan", "s1", said("a"), max_messages=MANY, ttl_seconds=0.05)
    await asyncio.sleep(0.25)  # ann's session expired, her chunk stays; dan had nothing else
    assert await memory_store.users() == ["ann", "bea", "cid"]
    assert await memory_store.users(limit=1, after="ann") == ["bea"]
    await sessions.erase("ann")
    assert await memory_store.users() == ["bea", "cid"]
