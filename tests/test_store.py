"""The shared store suite: every engine must pass it unchanged (see `location` for the one engine-specific part).

Vectors are built, not embedded: an orthonormal basis makes every cosine exact (toward(i, s) has cosine s with
the query basis[0] and s*s' with toward(j, s')), so the tests do not depend on the embedding model.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from proxy.errors import StoreError
from proxy.models import TENANT_SEPARATOR, NewMemory
from proxy.search import Fusion, Lexicon, terms
from proxy.store import Store, open_store, successor
from proxy.store.sqlite import MIGRATIONS, SqliteStore, db
from proxy.store.vectors import held_bytes
from tests.pgserver import postgres_databases, postgres_location, postgres_server  # noqa: F401

DIM = 64
DEDUPE = 0.9
BASIS = np.linalg.qr(np.random.default_rng(7).standard_normal((DIM, DIM)))[0].T.astype(np.float32)
QUERY = BASIS[0]
Vec = npt.NDArray[np.float32]


def toward(direction: int, similarity: float) -> Vec:
    """A unit vector with exactly `similarity` cosine to QUERY, leaning on basis vector `direction` (>= 1)."""
    vector: Vec = (similarity * BASIS[0] + math.sqrt(1 - similarity**2) * BASIS[direction]).astype(np.float32)
    return vector


def near(vector: Vec, similarity: float, direction: int) -> Vec:
    """A unit vector with cosine `similarity` to the unit `vector` (which must be orthogonal to BASIS[direction])."""
    result: Vec = (similarity * vector + math.sqrt(1 - similarity**2) * BASIS[direction]).astype(np.float32)
    return result


def random_units(count: int, seed: int) -> Vec:
    vectors = np.random.default_rng(seed).standard_normal((count, DIM)).astype(np.float32)
    units: Vec = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return units


def stack(*vectors: Vec) -> Vec:
    return np.stack(vectors).astype(np.float32)


@pytest.fixture(params=["sqlite", "postgres"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a fresh store of the engine lives; opening it again gives the same data. Another engine adds its name
    to params and a `<name>_location` fixture."""
    if request.param == "sqlite":
        return str(tmp_path / "nested" / "dir" / "memory.db")
    return str(request.getfixturevalue(f"{request.param}_location"))


async def open_at(location: str, dimension: int = DIM) -> Store:
    return await open_store(location, dimension=dimension, dedupe_similarity=DEDUPE)


@pytest.fixture
async def store(location: str) -> AsyncIterator[Store]:
    opened = await open_at(location)
    yield opened
    await opened.close()


def counted_loads(store: Store) -> list[int]:
    """A one-item list that counts the store's loads of a user's vectors from then on (both engines have `load`)."""
    loads = [0]
    original_load = store.load  # type: ignore[attr-defined]

    def counting_load(*args: Any) -> Any:
        loads[0] += 1
        return original_load(*args)

    store.load = counting_load  # type: ignore[attr-defined]
    return loads


async def add_one(store: Store, user: str, text: str, vector: Vec, **fields: Any) -> str:
    [memory] = await store.add(user, [NewMemory(text, **fields)], stack(vector))
    return memory.id


async def test_add_get_and_fields(store: Store) -> None:
    before = time.time()
    [memory] = await store.add("alice", [NewMemory("likes tea", category="preference", source="chat")],
                               stack(BASIS[1]))
    assert (memory.user, memory.text, memory.category, memory.source) == ("alice", "likes tea", "preference", "chat")
    assert before <= memory.created_at == memory.updated_at <= time.time()
    assert memory.expires_at is None and memory.supersedes is None and memory.superseded_by is None
    assert await store.get("alice", memory.id) == memory
    assert await store.get("bob", memory.id) is None
    assert await store.get("alice", "0" * 20) is None


async def test_list_newest_first_with_cursor(store: Store) -> None:
    ids = [await add_one(store, "alice", f"fact {n}", BASIS[n + 1]) for n in range(3)]
    batch = await store.add("alice", [NewMemory(f"fact {n}") for n in range(3, 6)], BASIS[4:7])
    ids += [memory.id for memory in batch]
    newest_first = ids[::-1]
    assert [m.id for m in await store.list("alice")] == newest_first
    assert [m.id for m in await store.list("alice", limit=2)] == newest_first[:2]
    assert [m.id for m in await store.list("alice", limit=2, before=newest_first[1])] == newest_first[2:4]
    pages, cursor = [], None
    while page := await store.list("alice", limit=4, before=cursor):
        pages += [m.id for m in page]
        cursor = page[-1].id
    assert pages == newest_first
    assert await store.list("bob") == []


async def test_near_duplicate_updates_the_memory(store: Store) -> None:
    first = await add_one(store, "alice", "lives in Lisbon", BASIS[1], category="fact", ttl_seconds=3600)
    duplicate = near(BASIS[1], 0.97, 2)
    [updated] = await store.add("alice", [NewMemory("lives in Lisbon, Portugal", category="place")],
                                stack(duplicate))
    assert updated.id == first
    assert (updated.text, updated.category, updated.expires_at) == ("lives in Lisbon, Portugal", "place", None)
    assert updated.updated_at > updated.created_at
    assert await store.count("alice") == 1
    [hit] = await store.search("alice", duplicate, k=5)
    assert hit.memory == updated and hit.score == pytest.approx(1.0, abs=1e-5)  # the vector was updated too
    [other] = await store.add("alice", [NewMemory("lives near Lisbon")], stack(near(BASIS[1], 0.85, 3)))
    assert other.id != first and await store.count("alice") == 2


async def test_a_fact_stated_again_is_dated_pinned_and_expired_anew_warm_as_cold(location: str) -> None:
    """A restatement (same text, same vector: the model repeating what it knows) changes only the memory's times
    and category; the engine keeps the cached matrix for it, and what a search answers must still equal a cold
    load from the database: the newest of equal scores first, profile memories leading, expired ones gone."""
    store, cold = await open_at(location), await open_at(location)
    loads = counted_loads(store)
    try:
        tea = await add_one(store, "alice", "likes tea", toward(1, 0.60004))  # within 1e-4: counts as equal
        coffee = await add_one(store, "alice", "likes coffee", toward(2, 0.6))
        await add_one(store, "alice", "likes tea", toward(1, 0.60004))  # the first restatement appends its row
        loads_before = loads[0]

        async def both(**options: Any) -> list[str]:
            warm = [(h.memory, round(h.score, 5)) for h in await store.search("alice", QUERY, **options)]
            assert warm == [(h.memory, round(h.score, 5)) for h in await cold.search("alice", QUERY, **options)]
            return [memory.id for memory, _ in warm]

        assert await both(k=1) == [tea]
        assert await add_one(store, "alice", "likes coffee", toward(2, 0.6)) == coffee
        assert await add_one(store, "alice", "likes coffee", toward(2, 0.6)) == coffee
        assert await both(k=1) == [coffee]  # stated again: now the most recently updated of the two
        [pinned] = await store.add("alice", [NewMemory("likes tea", category="profile")], stack(toward(1, 0.60004)))
        assert pinned.id == tea and pinned.category == "profile"
        assert await both(k=1, profile=1) == [tea, coffee]
        assert await store.count("alice") == 2  # restated, never duplicated
        await add_one(store, "alice", "likes coffee", toward(2, 0.6), ttl_seconds=0.05)
        await asyncio.sleep(0.1)
        assert await both(k=5) == [tea]
        assert loads[0] == loads_before  # every restatement kept the cache warm
        entry = store.cache.peek("alice")  # and counted the rows it holds (PostgreSQL) as a recount does
        assert entry is not None and entry.memories_bytes == held_bytes(entry.memories or [])
    finally:
        await store.close()
        await cold.close()


async def test_a_near_duplicate_without_a_category_keeps_the_stored_one(store: Store) -> None:
    first = await add_one(store, "alice", "User's name is Ana", BASIS[2], category="profile")
    [updated] = await store.add("alice", [NewMemory("User's name is Ana.", keep_category=True)],
                                stack(near(BASIS[2], 0.97, 2)))
    assert (updated.id, updated.text, updated.category) == (first, "User's name is Ana.", "profile")
    [hit] = await store.search("alice", BASIS[2], k=0, profile=5)  # still pinned as a profile memory
    assert hit.memory.id == first
    [changed] = await store.add("alice", [NewMemory("User's name is Ana!", category="fact")],
                                stack(near(BASIS[2], 0.97, 3)))
    assert changed.category == "fact"


async def test_dedupe_within_one_batch(store: Store) -> None:
    items = [NewMemory("has a cat"), NewMemory("has a cat named Tom"), NewMemory("plays chess")]
    stored = await store.add("alice", items, stack(BASIS[1], near(BASIS[1], 0.95, 2), BASIS[3]))
    assert stored[0].id == stored[1].id != stored[2].id
    assert stored[1].text == "has a cat named Tom"
    assert sorted(m.text for m in await store.list("alice")) == ["has a cat named Tom", "plays chess"]


async def test_dedupe_across_concurrent_writers(store: Store) -> None:
    await asyncio.gather(*(add_one(store, "alice", f"has a dog ({n})", near(BASIS[1], 0.99, n + 2))
                           for n in range(10)))
    assert await store.count("alice") == 1


async def test_concurrent_distinct_writes_all_land(store: Store) -> None:
    vectors = random_units(20, seed=1)
    ids = await asyncio.gather(*(add_one(store, "alice", f"fact {n}", vectors[n]) for n in range(20)))
    assert len(set(ids)) == 20
    assert await store.count("alice") == 20
    assert {m.text for m in await store.list("alice")} == {f"fact {n}" for n in range(20)}


async def test_replaces_keeps_history_out_of_recall(store: Store) -> None:
    old = await add_one(store, "alice", "lives in Paris", BASIS[1])
    new = await add_one(store, "alice", "lives in Berlin", BASIS[2], replaces=old)
    history = await store.get("alice", old)
    assert history is not None and history.superseded_by == new and not history.active
    current = await store.get("alice", new)
    assert current is not None and current.supersedes == old
    assert [h.memory.id for h in await store.search("alice", BASIS[1], k=5)] == [new]
    assert [m.id for m in await store.list("alice")] == [new]
    assert [m.id for m in await store.list("alice", include_history=True)] == [new, old]
    assert await store.count("alice") == 1


async def test_replacing_with_a_near_duplicate_still_supersedes(store: Store) -> None:
    old = await add_one(store, "alice", "works at Acme", BASIS[1])
    new = await add_one(store, "alice", "works at Acme Corp", near(BASIS[1], 0.99, 2), replaces=old)
    assert new != old
    assert [m.id for m in await store.list("alice")] == [new]


async def test_replaces_ignores_unknown_and_foreign_ids(store: Store) -> None:
    bobs = await add_one(store, "bob", "likes jazz", BASIS[1])
    theirs = await add_one(store, "alice", "likes rock", BASIS[2], replaces=bobs)
    unknown = await add_one(store, "alice", "likes folk", BASIS[3], replaces="0" * 20)
    for user, memory_id in (("bob", bobs), ("alice", theirs), ("alice", unknown)):
        memory = await store.get(user, memory_id)
        assert memory is not None and memory.supersedes is None and memory.superseded_by is None


async def test_forget_removes_only_that_users_memory(store: Store) -> None:
    kept = await add_one(store, "alice", "likes tea", BASIS[1])
    gone = await add_one(store, "alice", "likes coffee", BASIS[2])
    assert not await store.forget("bob", gone)
    assert await store.forget("alice", gone)
    assert not await store.forget("alice", gone)
    assert await store.get("alice", gone) is None
    assert [h.memory.id for h in await store.search("alice", BASIS[2], k=5)] == [kept]


async def test_erase_removes_all_of_a_user_history_included(store: Store) -> None:
    old = await add_one(store, "alice", "lives in Paris", BASIS[1])
    await add_one(store, "alice", "lives in Rome", BASIS[2], replaces=old)
    await add_one(store, "alice", "likes tea", BASIS[3])
    bobs = await add_one(store, "bob", "likes tea", BASIS[3])
    assert await store.erase("alice") == 3
    assert await store.list("alice", include_history=True) == []
    assert await store.search("alice", BASIS[3], k=5) == []
    assert await store.erase("alice") == 0
    assert [m.id for m in await store.list("bob")] == [bobs]
    again = await add_one(store, "alice", "likes tea", BASIS[3])  # a user can start over
    assert [h.memory.id for h in await store.search("alice", BASIS[3], k=5)] == [again]


async def test_expired_memories_are_never_returned_and_are_purged(store: Store) -> None:
    lasting = await add_one(store, "alice", "likes tea", BASIS[1], ttl_seconds=3600)
    brief = await add_one(store, "alice", "is in a meeting", BASIS[2], ttl_seconds=0.3)
    assert {h.memory.id for h in await store.search("alice", QUERY, k=5)} == {lasting, brief}
    await asyncio.sleep(0.5)
    assert [h.memory.id for h in await store.search("alice", QUERY, k=5)] == [lasting]
    assert [m.id for m in await store.list("alice", include_history=True)] == [lasting]
    assert await store.get("alice", brief) is None
    assert await store.count("alice") == 1
    assert await store.update("alice", brief, text="still in a meeting") is None
    assert await store.purge_expired() == 1
    assert await store.purge_expired() == 0
    assert await store.erase("alice") == 1  # the expired one is gone for good


async def test_expiry_set_by_update(store: Store) -> None:
    memory_id = await add_one(store, "alice", "is on holiday", BASIS[1])
    await store.search("alice", QUERY, k=5)
    updated = await store.update("alice", memory_id, expires_at=time.time() - 1)
    assert updated is not None and not updated.active
    assert await store.search("alice", QUERY, k=5) == []
    assert await store.count() == 0
    assert await store.purge_expired() == 1


async def test_isolation_between_users(store: Store) -> None:
    alices = {await add_one(store, "alice", f"fact {n}", toward(n + 1, 0.5)) for n in range(3)}
    before = [(h.memory.id, h.score) for h in await store.search("alice", QUERY, k=10)]
    assert {memory_id for memory_id, _ in before} == alices
    await store.add("bob", [NewMemory(f"bob fact {n}") for n in range(300)], random_units(300, seed=2))
    await add_one(store, "bob", "exactly the query", QUERY)
    after = [(h.memory.id, h.score) for h in await store.search("alice", QUERY, k=10)]
    assert [i for i, _ in after] == [i for i, _ in before]
    assert [s for _, s in after] == pytest.approx([s for _, s in before], abs=1e-6)
    assert all(h.memory.user == "bob" for h in await store.search("bob", QUERY, k=400))
    assert await store.search("carol", QUERY, k=10) == []


async def test_search_order_scores_and_min_score(store: Store) -> None:
    similarities = [0.1, 0.85, -0.2, 0.5, 0.7, 0.3]
    ids = {s: await add_one(store, "alice", f"similarity {s}", toward(n + 1, s)) for n, s in enumerate(similarities)}
    hits = await store.search("alice", QUERY, k=10)
    assert [h.memory.id for h in hits] == [ids[s] for s in sorted(similarities, reverse=True)]
    assert [h.score for h in hits] == pytest.approx(sorted(similarities, reverse=True), abs=1e-5)
    assert [h.memory.id for h in await store.search("alice", QUERY, k=2)] == [ids[0.85], ids[0.7]]
    assert [h.memory.id for h in await store.search("alice", QUERY, k=10, min_score=0.6)] == [ids[0.85], ids[0.7]]
    assert await store.search("alice", QUERY, k=10, min_score=0.9) == []
    assert await store.search("alice", QUERY, k=0) == []
    scaled = await store.search("alice", QUERY * 3, k=1)  # cosine: the query's length does not matter
    assert scaled[0].memory.id == ids[0.85] and scaled[0].score == pytest.approx(0.85, abs=1e-5)


async def test_newest_wins_among_equal_scores(store: Store) -> None:
    older = await add_one(store, "alice", "older", toward(1, 0.60004))  # within 1e-4: counts as equal
    newer = await add_one(store, "alice", "newer", toward(2, 0.6))
    await add_one(store, "alice", "weaker", toward(3, 0.59))
    assert [h.memory.id for h in await store.search("alice", QUERY, k=3)][:2] == [newer, older]
    assert [h.memory.id for h in await store.search("alice", QUERY, k=1)] == [newer]
    await store.update("alice", older, text="older, restated")  # now the most recently updated
    assert [h.memory.id for h in await store.search("alice", QUERY, k=1)] == [older]


async def test_update_text_category_vector(store: Store) -> None:
    memory_id = await add_one(store, "alice", "likes tea", BASIS[1], category="preference")
    original = await store.get("alice", memory_id)
    assert original is not None
    updated = await store.update("alice", memory_id, text="likes green tea")
    assert updated is not None and (updated.text, updated.category) == ("likes green tea", "preference")
    assert updated.updated_at > original.updated_at and updated.created_at == original.created_at
    updated = await store.update("alice", memory_id, category="drink", vector=BASIS[2])
    assert updated is not None and updated.category == "drink" and updated.text == "likes green tea"
    [hit] = await store.search("alice", BASIS[2], k=1)
    assert hit.memory.id == memory_id and hit.score == pytest.approx(1.0, abs=1e-5)
    assert (await store.search("alice", BASIS[1], k=1))[0].score == pytest.approx(0.0, abs=1e-5)
    assert await store.update("bob", memory_id, text="hijacked") is None
    assert await store.update("alice", "0" * 20, text="nothing") is None
    assert (await store.get("alice", memory_id)) == updated


async def test_count(store: Store) -> None:
    assert await store.count() == 0
    old = await add_one(store, "alice", "a", BASIS[1])
    await add_one(store, "alice", "b", BASIS[2], replaces=old)
    await add_one(store, "alice", "c", BASIS[3])
    await add_one(store, "bob", "d", BASIS[1])
    assert (await store.count("alice"), await store.count("bob"), await store.count("carol")) == (2, 1, 0)
    assert await store.count() == 3


async def test_unicode_round_trips(store: Store) -> None:
    text = "Zoë lives in Zürich 🏔️ — 東京が好き, שלום, e\u0301, \u200d, 'quotes' \"and\" %_ wildcards"
    user = "用户-ß-🙂"
    memory_id = await add_one(store, user, text, BASIS[1])
    memory = await store.get(user, memory_id)
    assert memory is not None and (memory.text, memory.user) == (text, user)
    assert (await store.search(user, BASIS[1], k=1))[0].memory.text == text
    assert await store.list("用户-ß") == []


async def test_reopen_keeps_everything(location: str) -> None:
    store = await open_at(location)
    old = await add_one(store, "alice", "lives in Paris", BASIS[1], category="place", source="chat")
    await add_one(store, "alice", "lives in Rome", BASIS[2], replaces=old, ttl_seconds=3600)
    await add_one(store, "bob", "likes tea", BASIS[3])
    saved = {user: await store.list(user, include_history=True) for user in ("alice", "bob")}
    await store.close()
    reopened = await open_at(location)
    try:
        assert {user: await reopened.list(user, include_history=True) for user in ("alice", "bob")} == saved
        [hit] = await reopened.search("alice", BASIS[2], k=5)
        assert hit.memory == saved["alice"][0]
        assert await reopened.count() == 2
    finally:
        await reopened.close()


async def test_a_database_made_for_another_dimension_is_refused(location: str) -> None:
    store = await open_at(location)
    await add_one(store, "alice", "likes tea", BASIS[1])
    await store.close()
    with pytest.raises(StoreError, match="dimension"):
        await open_at(location, dimension=DIM * 2)
    store = await open_at(location)  # still fine for the right model
    assert await store.count() == 1
    await store.close()


async def test_hybrid_search_lifts_keyword_matches_alike_on_every_engine(store: Store) -> None:
    """The fused score is the cosine plus lexical_weight x the share of the question's rare words a memory holds,
    with the user's own statistics: the same number on every engine, and min_score applies to it."""
    texts = ["likes green tea", "my sister lives in Oslo", *(f"note number {n} about bread" for n in range(20))]
    cosines = [0.5, 0.45, *(0.1 for _ in range(20))]
    ids = [await add_one(store, "alice", text, toward(n + 1, cosine))
           for n, (text, cosine) in enumerate(zip(texts, cosines, strict=True))]
    fusion = Fusion(lexical_weight=0.5)
    question = "Where does my sister live, Oslo?"
    share = Lexicon.build(texts).scores(terms(question), np.ones(len(texts), dtype=bool), fusion)
    assert 0.45 + 0.5 * share[1] > 0.5 and share[0] == 0
    hits = await store.search("alice", QUERY, k=2, text=question, fusion=fusion)
    assert [h.memory.id for h in hits] == [ids[1], ids[0]]
    assert [h.score for h in hits] == pytest.approx([0.45 + 0.5 * share[1], 0.5], abs=1e-5)
    assert [h.memory.id for h in await store.search("alice", QUERY, k=2, text=question)] == [ids[0], ids[1]]
    lifted = await store.search("alice", QUERY, k=5, min_score=0.48, text=question, fusion=fusion)
    assert [h.memory.id for h in lifted] == [ids[1], ids[0]]  # 0.45 in cosine, over 0.48 with its words
    words_only = await store.search("alice", QUERY, k=5, text=question, fusion=Fusion(1.0, dense_weight=0.0))
    assert [h.memory.id for h in words_only] == [ids[1]]


async def test_keyword_statistics_are_the_users_own(store: Store) -> None:
    """Another user's memories never move this user's keyword scores (FTS5's bm25() would: its statistics span
    the whole table)."""
    await add_one(store, "alice", "my sister lives in Oslo", toward(1, 0.3))
    await add_one(store, "alice", "likes tea", toward(2, 0.3))
    fusion = Fusion(lexical_weight=0.5)
    before = [(h.memory.id, h.score) for h in await store.search("alice", QUERY, k=5, text="Oslo", fusion=fusion)]
    await store.add("bob", [NewMemory(f"trip {n} to Oslo") for n in range(50)], random_units(50, seed=6))
    after = [(h.memory.id, h.score) for h in await store.search("alice", QUERY, k=5, text="Oslo", fusion=fusion)]
    assert [i for i, _ in after] == [i for i, _ in before]
    assert [s for _, s in after] == pytest.approx([s for _, s in before], abs=1e-9)
    assert before[0][1] > 0.3


async def test_replaced_and_expired_memories_never_match_words(store: Store) -> None:
    old = await add_one(store, "alice", "lives in Paris", toward(1, 0.5))
    new = await add_one(store, "alice", "moved to Berlin", toward(2, 0.2), replaces=old)
    brief = await add_one(store, "alice", "in Paris this week", toward(3, 0.2), ttl_seconds=0.2)
    await asyncio.sleep(0.3)
    hits = await store.search("alice", QUERY, k=5, text="Paris", fusion=Fusion(lexical_weight=0.5))
    assert [h.memory.id for h in hits] == [new] and brief not in [h.memory.id for h in hits]


async def test_profile_memories_lead_whatever_the_question(store: Store) -> None:
    name = await add_one(store, "alice", "Her name is Alice", toward(1, -0.3), category="profile")
    old = await add_one(store, "alice", "Answers in German", toward(2, 0.0), category="profile")
    language = await add_one(store, "alice", "Answers in French", toward(3, 0.0), category="profile", replaces=old)
    await add_one(store, "alice", "Is on call", toward(4, 0.0), category="profile", ttl_seconds=0.2)
    tea = await add_one(store, "alice", "likes tea", toward(5, 0.9))
    coffee = await add_one(store, "alice", "likes coffee", toward(6, 0.8))
    await asyncio.sleep(0.3)
    hits = await store.search("alice", QUERY, k=1, min_score=0.5, profile=5)
    assert [h.memory.id for h in hits] == [language, name, tea]  # newest profile first, then the best other
    assert hits[1].score == pytest.approx(-0.3, abs=1e-5)
    assert [h.memory.id for h in await store.search("alice", QUERY, k=2, min_score=0.5, profile=1)] == [
        language, tea, coffee]
    assert [h.memory.id for h in await store.search("alice", QUERY, k=5, min_score=0.5)] == [tea, coffee]
    assert [h.memory.id for h in await store.search("alice", QUERY, k=0, profile=5)] == [language, name]
    assert await store.search("bob", QUERY, k=5, profile=5) == []


async def test_known_users(store: Store) -> None:
    assert not await store.known("alice")
    await add_one(store, "alice", "likes tea", BASIS[1])
    assert await store.known("alice") and not await store.known("bob")
    await store.erase("alice")
    assert not await store.known("alice")


async def test_time_fields(store: Store) -> None:
    [event] = await store.add("alice", [NewMemory("ran the Lisbon half marathon", category="event",
                                                  happened_at="2024-03-10")], stack(BASIS[1]))
    assert event.happened_at == "2024-03-10" and event.valid_until is None
    [again] = await store.add("alice", [NewMemory("ran the Lisbon half marathon!", category="event")],
                              stack(near(BASIS[1], 0.97, 2)))
    assert again.id == event.id and again.happened_at == "2024-03-10"  # a restatement without a date keeps it
    old = await add_one(store, "alice", "lives in Paris", BASIS[3])
    before = time.time()
    new = await add_one(store, "alice", "lives in Berlin", BASIS[4], replaces=old)
    history = await store.get("alice", old)
    current = await store.get("alice", new)
    assert history is not None and current is not None
    assert history.valid_until is not None and before <= history.valid_until <= time.time()
    assert history.valid_until == pytest.approx(current.created_at) and current.valid_until is None
    assert history.to_dict()["valid_until"] == history.valid_until


# --- SQLite only ------------------------------------------------------------------------------------------------

async def open_sqlite(path: Path, **options: Any) -> SqliteStore:
    return await SqliteStore.open(str(path), dimension=DIM, dedupe_similarity=DEDUPE, **options)


async def assert_cache_and_sql_agree(cached: Any, uncached: Any) -> None:
    """Users too big for the vector cache are scored in SQL: both paths rank alike (words, profile, ties, expiry,
    history). `uncached` is the same store opened with cache_bytes=0."""
    await cached.add("alice", [NewMemory(f"fact {n} about tea") for n in range(40)], random_units(40, seed=3))
    old = await add_one(cached, "alice", "tie, older", toward(1, 0.6))
    await add_one(cached, "alice", "tie, newer", toward(2, 0.6))
    await add_one(cached, "alice", "replaces the tie", toward(3, 0.2), replaces=old)
    expiring = await add_one(cached, "alice", "expires", toward(4, 0.65))
    await cached.update("alice", expiring, expires_at=time.time() - 1)
    await add_one(cached, "alice", "her name is Alice, fact 3", toward(5, 0.1), category="profile")
    fusion = Fusion(lexical_weight=0.5)
    for query in [QUERY, *random_units(4, seed=4)]:
        for k, min_score, text, profile in ((3, -1.0, "", 0), (10, 0.1, "", 0), (100, -1.0, "", 0),
                                            (5, -1.0, "fact 7 tie", 0), (4, 0.2, "tie older fact 3", 2),
                                            (60, -1.0, "tea", 1)):
            fast = await cached.search("alice", query, k, min_score, text=text, fusion=fusion, profile=profile)
            slow = await uncached.search("alice", query, k, min_score, text=text, fusion=fusion, profile=profile)
            assert [h.memory for h in fast] == [h.memory for h in slow]
            assert [h.score for h in fast] == pytest.approx([h.score for h in slow], abs=1e-5)
    assert cached.cache.entries and not uncached.cache.entries


async def test_sqlite_cache_and_sql_scoring_agree(tmp_path: Path) -> None:
    cached = await open_sqlite(tmp_path / "m.db")
    uncached = await open_sqlite(tmp_path / "m.db", cache_bytes=0)
    try:
        await assert_cache_and_sql_agree(cached, uncached)
    finally:
        await cached.close()
        await uncached.close()


async def test_sqlite_another_connection_writing_invalidates_the_cache(tmp_path: Path) -> None:
    """Two stores on one file behave like two worker processes: one's writes reach the other's cached recall."""
    reader, writer = await open_sqlite(tmp_path / "m.db"), await open_sqlite(tmp_path / "m.db")
    try:
        first = await add_one(writer, "alice", "likes tea", toward(1, 0.5))
        assert [h.memory.id for h in await reader.search("alice", QUERY, k=5)] == [first]
        second = await add_one(writer, "alice", "likes coffee", toward(2, 0.9))
        assert [h.memory.id for h in await reader.search("alice", QUERY, k=5)] == [second, first]
        await writer.forget("alice", second)
        assert [h.memory.id for h in await reader.search("alice", QUERY, k=5)] == [first]
        await writer.erase("alice")
        assert await reader.search("alice", QUERY, k=5) == []
    finally:
        await reader.close()
        await writer.close()


async def test_sqlite_corrupt_file_is_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not a database, " * 400)
    with pytest.raises(StoreError, match="corrupt"):
        await open_sqlite(path)


async def test_sqlite_locked_past_the_busy_timeout(tmp_path: Path) -> None:
    store = await open_sqlite(tmp_path / "m.db", busy_timeout=0.2)
    holder = db.connect(str(tmp_path / "m.db"), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process writing for a long time
    try:
        with pytest.raises(StoreError, match="locked"):
            await add_one(store, "alice", "likes tea", BASIS[1])
        with pytest.raises(StoreError, match="locked"):
            await open_sqlite(tmp_path / "m.db", busy_timeout=0.2)
        assert await store.count() == 0  # reads go on meanwhile (WAL)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    await add_one(store, "alice", "likes tea", BASIS[1])  # and writes resume once the lock is gone
    assert await store.count() == 1
    await store.close()


async def test_sqlite_newer_schema_is_refused(tmp_path: Path) -> None:
    await (await open_sqlite(tmp_path / "m.db")).close()
    conn = db.connect(str(tmp_path / "m.db"))
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        await open_sqlite(tmp_path / "m.db")


async def test_sqlite_open_sets_up_the_file(tmp_path: Path) -> None:
    store = await open_sqlite(tmp_path / "a" / "b" / "m.db")
    await store.close()
    conn = db.connect(str(tmp_path / "a" / "b" / "m.db"))
    pragmas = [conn.execute(f"PRAGMA {name}").fetchone()[0] for name in ("journal_mode", "user_version", "page_size")]
    conn.close()
    assert pragmas == ["wal", len(MIGRATIONS), 16384]


async def test_sqlite_memory_path_is_a_temporary_file(tmp_path: Path) -> None:
    store = await open_store(":memory:", dimension=DIM)
    assert isinstance(store, SqliteStore)
    await add_one(store, "alice", "likes tea", BASIS[1])
    assert [h.memory.text for h in await store.search("alice", BASIS[1], k=1)] == ["likes tea"]
    await store.close()
    assert not await asyncio.to_thread(Path(store.path).exists)


async def test_sqlite_close_stops_the_threads(tmp_path: Path) -> None:
    store = await open_sqlite(tmp_path / "m.db")
    pending = asyncio.gather(*(add_one(store, "alice", f"fact {n}", v) for n, v in enumerate(random_units(5, 5))))
    await asyncio.sleep(0)
    await store.close()
    assert len(await pending) == 5  # writes queued before close are committed, not dropped
    assert not store.writer.is_alive()
    with pytest.raises(StoreError, match="closed"):
        await store.count()
    reopened = await open_sqlite(tmp_path / "m.db")
    assert await reopened.count() == 5
    await reopened.close()


async def test_sqlite_own_writes_keep_the_cache_warm_and_exact(tmp_path: Path) -> None:
    """A write edits the cached vectors instead of dropping them, so the next recall loads nothing; what it
    answers must equal a cold load from disk, through adds, dedupe, replacement and expiry."""
    store = await open_sqlite(tmp_path / "m.db")
    cold = await open_sqlite(tmp_path / "m.db")
    loads = counted_loads(store)
    try:
        first = await add_one(store, "alice", "likes tea", toward(1, 0.5))
        await store.search("alice", QUERY, k=5)
        after_first = loads[0]
        twin = await add_one(store, "alice", "likes tea a lot", near(toward(1, 0.5), 0.95, 3))
        assert twin == first  # deduplicated against the cached vectors
        second = await add_one(store, "alice", "likes coffee", toward(2, 0.9))
        third = await add_one(store, "alice", "drinks coffee now", toward(4, 0.8), replaces=second)
        await add_one(store, "alice", "is in Rome this week", toward(5, 0.7), ttl_seconds=0.05)
        await asyncio.sleep(0.1)
        warm = [(h.memory.id, round(h.score, 5)) for h in await store.search("alice", QUERY, k=10)]
        assert loads[0] == after_first  # no reload after the store's own writes
        assert warm == [(h.memory.id, round(h.score, 5)) for h in await cold.search("alice", QUERY, k=10)]
        assert [memory_id for memory_id, _ in warm] == [third, first]
    finally:
        await store.close()
        await cold.close()


async def test_users_lists_one_namespace_in_order_with_a_cursor(store: Store) -> None:
    acme = "acme" + TENANT_SEPARATOR
    for number, user in enumerate(("carol", "alice", "bob", acme + "zed", acme + "amy", "acmes", "al")):
        await add_one(store, user, f"fact {number}", BASIS[number + 1])
        await add_one(store, user, f"more {number}", BASIS[number + 10])  # a user with two rows is listed once
    assert await store.users() == ["acmes", "al", "alice", "bob", "carol"]  # never another tenant's users
    assert await store.users(acme) == [acme + "amy", acme + "zed"]
    assert await store.users("al") == ["al", "alice"] and await store.users("ali") == ["alice"]
    assert await store.users("acme") == ["acmes"] and await store.users("zz") == []
    assert await store.users(limit=2) == ["acmes", "al"]
    assert await store.users(limit=2, after="al") == ["alice", "bob"]
    assert await store.users(limit=2, after="bob") == ["carol"]
    assert await store.users(acme, after=acme + "amy") == [acme + "zed"]
    await store.erase("bob")
    await add_one(store, "dora", "is in a meeting", BASIS[30], ttl_seconds=0.05)
    await asyncio.sleep(0.1)
    assert await store.users() == ["acmes", "al", "alice", "carol"]  # erased and expired users are gone


def test_successor_bounds_every_string_with_the_prefix() -> None:
    assert successor("") is None
    assert successor("ab") == "ac" and successor("acme\x1f") == "acme "
    assert successor("a\U0010ffff") == "b" and successor("\U0010ffff") is None
    assert successor("\ud7ff") == "\ue000"
    for prefix in ("al", "a\U0010ffff", "\ud7ff"):
        upper = successor(prefix)
        assert upper is not None
        for tail in ("", "\U0010ffff\U0010ffff", "z", "\x00"):
            assert prefix + tail < upper and (prefix + tail).encode() < upper.encode()


async def test_sqlite_upgrade_keeps_memories_and_dates_their_history(tmp_path: Path) -> None:
    """A file made before the time columns: replaced memories get the end of their validity from their successor."""
    conn = db.connect(str(tmp_path / "m.db"), isolation_level=None)
    for statement in (*MIGRATIONS[0], *MIGRATIONS[1]):
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 2")
    conn.execute("INSERT INTO meta (key, value) VALUES ('dimension', ?)", (str(DIM),))
    for memory_id, text, vector, created, superseded_by in (
            ("00000000000100000001", "lives in Paris", toward(1, 0.5), 100.0, "00000000000200000001"),
            ("00000000000200000001", "lives in Rome", toward(2, 0.6), 200.0, None)):
        conn.execute("INSERT INTO memories (user, id, text, category, source, created_at, updated_at, superseded_by, "
                     "embedding) VALUES ('alice', ?, ?, 'fact', 'api', ?, ?, ?, ?)",
                     (memory_id, text, created, created, superseded_by, vector.tobytes()))
    conn.execute("INSERT INTO users (user, generation) VALUES ('alice', 1)")
    conn.close()
    store = await open_sqlite(tmp_path / "m.db")
    try:
        [hit] = await store.search("alice", QUERY, k=5, text="Rome", fusion=Fusion())
        assert hit.memory.text == "lives in Rome"
        [new, old] = await store.list("alice", include_history=True)
        assert old.valid_until == 200.0 and new.valid_until is None and new.happened_at is None
    finally:
        await store.close()


async def test_a_write_whose_commit_fails_leaves_nothing_in_the_cache(tmp_path: Path) -> None:
    """A COMMIT that fails (a full disk; here a deferred foreign key the row breaks), even after its caller was
    cancelled while the writer thread ran the job: no phantom memory in later searches or dedupe."""
    store = await open_sqlite(tmp_path / "m.db")
    cold = await open_sqlite(tmp_path / "m.db", cache_bytes=0)
    try:
        [tea] = await store.add("alice", [NewMemory("likes tea")], stack(toward(1, 0.5)))
        await store.search("alice", QUERY, k=5)  # warm
        for sql in ("CREATE TABLE parent (id INTEGER PRIMARY KEY)",
                    "CREATE TABLE child (ref INTEGER REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED)",
                    "CREATE TRIGGER poison AFTER INSERT ON memories WHEN NEW.text = 'poison' "
                    "BEGIN INSERT INTO child VALUES (999); END"):
            await store.write(None, lambda conn, sql=sql: conn.execute(sql) and None)
        store.writer.conn.execute("PRAGMA foreign_keys = ON")
        started = asyncio.Event()
        original = store.add_in

        def slow_add_in(*args: Any) -> Any:
            asyncio.run_coroutine_threadsafe(set_event(started), loop)
            time.sleep(0.2)  # a big user's job: the caller gives up meanwhile
            return original(*args)

        async def set_event(event: asyncio.Event) -> None:
            event.set()

        loop = asyncio.get_running_loop()
        store.add_in = slow_add_in  # type: ignore[method-assign]
        write = asyncio.create_task(store.add("alice", [NewMemory("poison")], stack(toward(2, 0.9))))
        await started.wait()
        write.cancel()
        with pytest.raises(asyncio.CancelledError):
            await write
        await store.write(None, lambda conn: None)  # the writer thread is done with it (its COMMIT failed)
        store.add_in = original  # type: ignore[method-assign]
        assert await cold.count("alice") == 1
        [hit] = await store.search("alice", QUERY, k=1)
        assert hit.memory.id == tea.id
        [again] = await store.add("alice", [NewMemory("likes coffee a lot")], stack(near(toward(2, 0.9), 0.97, 5)))
        assert again.text == "likes coffee a lot" and again.id != tea.id  # a new memory: no phantom to merge into
        assert [h.memory.id for h in await store.search("alice", QUERY, k=5)] == [
            h.memory.id for h in await cold.search("alice", QUERY, k=5)]
    finally:
        await store.close()
        await cold.close()
