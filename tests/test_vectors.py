"""The in-memory vector upkeep of the SQLite store: drafts must equal a rebuild from scratch, and views that
readers already hold must never change under them."""

from __future__ import annotations

import threading
import tracemalloc

import numpy as np
import numpy.typing as npt

from proxy.models import Memory
from proxy.store import vectors
from proxy.store.draft import Draft
from proxy.store.vectors import FOLLOWED, SPLIT_ROWS, UserVectors, VectorCache, held_bytes, row_dots

DIM = 8


def units(count: int, seed: int) -> npt.NDArray[np.float32]:
    matrix = np.random.default_rng(seed).standard_normal((count, DIM)).astype(np.float32)
    result: npt.NDArray[np.float32] = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
    return result


def entry(count: int) -> UserVectors:
    return UserVectors(1, np.array([f"{i:020x}" for i in range(count)]), np.arange(count, dtype=np.float64),
                       np.full(count, np.inf), units(count, 1))


def test_appends_grow_in_place_without_touching_older_views() -> None:
    base = entry(5)
    fresh = units(3, 2)
    first = Draft(base)
    first.put("a", 10.0, None, fresh[0])
    one = first.build(2)
    snapshot = one.matrix.copy() if one.matrix is not None else None
    second = Draft(one)
    second.put("b", 11.0, None, fresh[1])
    two = second.build(3)
    assert two.rows is one.rows  # appended in place, no copy
    assert one.matrix is not None and two.matrix is not None and snapshot is not None
    assert np.array_equal(one.matrix, snapshot) and len(one.matrix) == 6 and len(two.matrix) == 7
    assert list(two.ids[-2:]) == ["a", "b"] and list(two.updated[-2:]) == [10.0, 11.0]
    # A second draft from an entry someone already grew past (a write whose commit failed) must copy,
    # or it would overwrite rows that the other entry shows.
    stale = Draft(one)
    stale.put("c", 12.0, None, fresh[2])
    three = stale.build(4)
    assert three.rows is not one.rows and three.matrix is not None
    assert np.array_equal(two.matrix[-1], fresh[1]) and np.array_equal(three.matrix[-1], fresh[2])


def test_rewrites_and_removals_equal_a_fresh_build() -> None:
    base = entry(6)
    fresh = units(2, 3)
    draft = Draft(base)
    draft.put(str(base.ids[2]), 20.0, 99.0, fresh[0])  # a dedupe update: the row moves to the end
    draft.remove(str(base.ids[4]))  # superseded
    draft.put("new", 21.0, None, fresh[1])
    built = draft.build(2)
    expected_ids = [str(base.ids[i]) for i in (0, 1, 3, 5)] + [str(base.ids[2]), "new"]
    assert list(built.ids) == expected_ids
    assert built.matrix is not None and base.matrix is not None
    assert np.array_equal(built.matrix, np.vstack([base.matrix[[0, 1, 3, 5]], fresh]))
    assert list(built.expires[-2:]) == [99.0, np.inf] and built.earliest_expiry == 99.0
    assert len(base.ids) == 6 and base.matrix.shape == (6, DIM)  # the base is untouched


def test_a_restatement_shares_the_matrix_and_words_and_changes_only_times_and_pin() -> None:
    from proxy.search import Lexicon

    base = Draft(entry(300)).build(2)
    base = UserVectors(2, base.ids, base.updated, base.expires, base.matrix, rows=base.rows,
                       lexicon=Lexicon.build(f"fact number {i}" for i in range(300)))
    assert base.matrix is not None
    draft = Draft(base)
    assert draft.touch(str(base.ids[4]), 50.0, 60.0, base.matrix[4], pinned=True)
    assert not draft.touch(str(base.ids[5]), 50.0, None, units(1, 7)[0])  # another vector: it must be put
    assert not draft.touch("unknown", 50.0, None, base.matrix[5])
    draft.remove(str(base.ids[6]))
    assert not draft.touch(str(base.ids[6]), 50.0, None, base.matrix[6])  # removed in this write
    built = draft.build(3)
    assert built.rows is base.rows and built.matrix is not None and np.shares_memory(built.matrix, base.matrix)
    assert len(built.matrix) == 300 and built.lexicon is base.lexicon and built.ids is base.ids  # nothing copied
    assert (built.updated[4], built.expires[4], built.earliest_expiry) == (50.0, 60.0, 60.0)
    assert built.pinned is not None and np.flatnonzero(built.pinned).tolist() == [4]
    assert base.updated[4] == 4.0 and base.pinned is None  # a reader's entry is untouched
    expected = live(base)
    expected[str(base.ids[4])] = (expected[str(base.ids[4])][0], 50.0, 60.0)
    del expected[str(base.ids[6])]
    assert live(built) == expected
    # Once the row was rewritten in the same write, it is not the base row any more.
    again = Draft(built)
    again.put(str(base.ids[7]), 70.0, None, units(1, 8)[0])
    assert not again.touch(str(base.ids[7]), 71.0, None, units(1, 8)[0])


def test_twin_matches_a_brute_force_search() -> None:
    base = entry(50)
    draft = Draft(base)
    assert base.matrix is not None
    probe = base.matrix[7] * 0.99 + units(1, 9)[0] * 0.01
    probe /= np.linalg.norm(probe)
    assert draft.twin(probe, 0.0, None, 0.9) == str(base.ids[7])
    assert draft.twin(probe, 0.0, str(base.ids[7]), 0.9) is None  # the one being replaced does not count
    draft.remove(str(base.ids[7]))
    assert draft.twin(probe, 0.0, None, 0.9) is None
    draft.put("again", 1.0, None, base.matrix[7])
    assert draft.twin(probe, 0.0, None, 0.9) == "again"
    draft.put("brief", 1.0, 5.0, probe)
    assert draft.twin(probe, 10.0, "again", 0.9) is None  # expired by then


def live(vectors: UserVectors) -> dict[str, tuple[list[float], float, float]]:
    """What a search can see: each live row's id, vector, updated and expiry."""
    assert vectors.matrix is not None
    dead = set(vectors.dead.tolist())
    return {str(vectors.ids[i]): (vectors.matrix[i].tolist(), float(vectors.updated[i]), float(vectors.expires[i]))
            for i in range(len(vectors.ids)) if i not in dead}


def test_a_rewrite_appends_in_place_and_marks_the_old_row_dead() -> None:
    base = Draft(entry(200)).build(2)  # a matrix with room to grow, as the store holds it
    assert base.rows is not None and base.matrix is not None
    before = base.matrix.copy()
    fresh = units(2, 5)
    draft = Draft(base)
    draft.put(str(base.ids[3]), 30.0, None, fresh[0])  # a dedupe update of an existing memory
    draft.remove(str(base.ids[9]))
    built = draft.build(3)
    assert built.rows is base.rows  # nothing copied
    assert np.array_equal(base.matrix, before)  # a reader's view is untouched
    expected = {**live(base), str(base.ids[3]): (fresh[0].tolist(), 30.0, np.inf)}
    del expected[str(base.ids[9])]
    assert live(built) == expected
    scores = built.scores(fresh[0], 0.0)
    assert scores[3] == -np.inf and scores[9] == -np.inf and int(np.argmax(scores)) == len(built.ids) - 1
    assert Draft(built).twin(fresh[0], 0.0, None, 0.9) == str(base.ids[3])  # the live row, not the dead one


def test_dead_rows_are_compacted_away_once_they_pass_a_quarter() -> None:
    current = Draft(entry(400)).build(2)
    expected = live(current)
    for n in range(120):  # 120 rewrites of 400 memories: past the quarter once
        assert current.matrix is not None
        draft = Draft(current)
        memory_id = str(current.ids[int(np.flatnonzero(current.scores(current.matrix[0], 0.0) > -np.inf)[n])])
        vector = units(1, 100 + n)[0]
        draft.put(memory_id, 100.0 + n, None, vector)
        expected[memory_id] = (vector.tolist(), 100.0 + n, np.inf)
        current = draft.build(3 + n)
        assert live(current) == expected
        assert len(current.dead) <= max(64, (len(current.ids) - len(current.dead)) // 4)
    assert len(current.ids) < 400 + 120  # compacted at least once


def test_the_cache_answers_one_generation_and_keeps_the_writers_newer_entry() -> None:
    cache = VectorCache(1 << 20)
    newer = UserVectors(50, matrix=units(1, 1), followed=(40, 30))  # the writer's entry: 30, then 40, then 50
    cache.put("u", newer)
    assert cache.get("u", 50) is newer
    # A reader whose snapshot is older must not rank with it (a memory replaced since is dead in it, and its
    # replacement invisible to the snapshot): it reads again, as `follows` tells it; another generation loads.
    assert cache.get("u", 40) is None and newer.follows(40) and newer.follows(30)
    assert cache.get("u", 60) is None and not newer.follows(60) and not newer.follows(20)
    cache.put("u", UserVectors(40, matrix=units(1, 2)))  # a reader's late load of an older snapshot
    assert cache.get("u", 50) is newer
    cache.discard("u")  # a failed write drops what it stored
    assert cache.get("u", 50) is None
    current = UserVectors(7, matrix=units(1, 3), ids=np.array(["a"]), updated=np.zeros(1), expires=np.full(1, np.inf))
    for generation in range(8, 8 + FOLLOWED + 2):  # a chain of writes in this process
        draft = Draft(current)
        draft.put("a", float(generation), None, units(1, generation)[0])
        current = draft.build(generation)
    assert current.followed == tuple(range(current.generation - 1, current.generation - 1 - FOLLOWED, -1))
    assert current.follows(current.generation - FOLLOWED) and not current.follows(current.generation - FOLLOWED - 1)


def test_held_rows_are_counted_as_python_stores_them() -> None:
    """The cache's bound counts held rows (PostgreSQL) by what they cost: a 500-character text of emoji takes
    four bytes a character where ASCII takes one, and a long user id is held once per row (tracemalloc)."""
    counted, measured = {}, {}
    for name, char in (("ascii", "a"), ("cjk", "\u4e2d"), ("emoji", "\U0001f600")):
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            rows = [Memory(f"{n:020x}", f"user-{n % 10}-" + "u" * 250, f"{n}" + char * 499, "fact", "chat",
                           1e9 + n, 1e9 + n, None if n % 2 else 2e9 + n, happened_at="2024-05" if n % 3 else None)
                    for n in range(2000)]
            measured[name] = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        counted[name] = held_bytes(rows)
        assert 0.85 < counted[name] / measured[name] < 1.15, (name, counted[name], measured[name])
    assert counted["emoji"] - counted["ascii"] >= 2000 * 499 * 3  # four bytes a character against one


def test_a_large_scan_is_split_with_the_helper_and_taken_back_when_it_is_busy() -> None:
    """Past SPLIT_ROWS rows the scan's second half goes to a helper thread; with the helper busy (another scan),
    the caller scores that half itself instead of waiting: same numbers either way, odd row counts included."""
    rng = np.random.default_rng(9)
    query = rng.standard_normal(DIM).astype(np.float32)
    for count in (0, 1, SPLIT_ROWS - 1, SPLIT_ROWS, 2 * SPLIT_ROWS + 3):
        matrix = rng.standard_normal((count, DIM)).astype(np.float32)
        np.testing.assert_allclose(row_dots(matrix, query), matrix @ query, rtol=1e-5, atol=1e-5)
    matrix = rng.standard_normal((SPLIT_ROWS + 1, DIM)).astype(np.float32)
    release, started = threading.Event(), threading.Event()

    def busy() -> None:
        started.set()
        release.wait(10)

    blocker = vectors._helper.submit(busy)
    try:
        assert started.wait(5)
        dots = row_dots(matrix, query)  # would hang until `release` if it waited for the helper
        assert not blocker.done()
        np.testing.assert_allclose(dots, matrix @ query, rtol=1e-5, atol=1e-5)
    finally:
        release.set()
        blocker.result()


def test_a_forked_child_scans_with_a_helper_of_its_own() -> None:
    """A forked child has none of its parent's threads; an executor that believed otherwise would queue every
    second half forever (each holding its matrix) while the caller did the work: the child starts a new helper."""
    import os

    rng = np.random.default_rng(10)
    matrix = rng.standard_normal((SPLIT_ROWS + 7, DIM)).astype(np.float32)
    query = rng.standard_normal(DIM).astype(np.float32)
    row_dots(matrix, query)  # the parent's helper thread exists
    parent = vectors._helper
    reading, writing = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (the child reports through the pipe)
        ok = True
        try:
            for _ in range(20):
                ok &= bool(np.allclose(row_dots(matrix, query), matrix @ query, rtol=1e-5, atol=1e-5))
            # The helper runs: a job behind the scans' halves finishes (FIFO), so nothing is left queued.
            ok &= vectors._helper is not parent and vectors._helper.submit(lambda: True).result(timeout=30)
            ok &= not vectors._helper._work_queue.qsize()
        finally:
            os.write(writing, b"1" if ok else b"0")
            os._exit(0)
    os.close(writing)
    assert os.read(reading, 1) == b"1"
    os.waitpid(child, 0)
    os.close(reading)
