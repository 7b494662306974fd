"""Users' vectors held in memory for exact per-user search, and their upkeep as writes land.

A search scores one user's matrix in numpy (0.3 ms for 10k x 384), far faster than any SQL over the rows. The
cache is keyed by the user's generation (a random number every write changes in the same transaction), so an
entry can never answer for a state it did not see. A write in this process does not throw the user's entry away:
it edits a `Draft` of it (which also answers the dedupe question without SQL) and stores the result under the
new generation, so recall right after a write stays warm. Writes by other processes still just invalidate.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from proxy.models import Memory
from proxy.search import Fusion, Lexicon, hybrid

TIE = 1e-4  # scores this close count as equal: the most recently updated memory (then the newest id) wins
# How many of this process's own writes an entry remembers following. Under steady writes a search's snapshot is
# often a few writes behind the entry the writer just made (measured: 240 writes/s to a 10k-memory user on
# PostgreSQL); such a search reads again (a new snapshot, which sees those writes) instead of reloading every row
# of the user (~65 MB transient, ~100 ms each), and never ranks with rows its snapshot does not hold.
FOLLOWED = 16
MEMORY_BYTES = 500  # what one held Memory costs, about (sys.getsizeof of its fields, a 100-character text)


Floats = Sequence[float] | npt.NDArray[np.float64]
Ids = Sequence[str] | npt.NDArray[np.str_]


def rank(scores: npt.NDArray[np.floating[Any]], updated: Floats, ids: Ids, k: int,
         min_score: float) -> list[tuple[int, float]]:
    """(row, score) of the top k rows at or above min_score (-inf: not eligible), best first, near-equal scores
    newest first."""
    floor = max(min_score, -2.0)  # cosine >= -1; -inf marks expired rows
    if scores.size > k:  # only rows within TIE of the k-th best can still make the top k
        floor = max(floor, float(np.partition(scores, scores.size - k)[scores.size - k]) - TIE)
    ordered = sorted(np.flatnonzero(scores >= floor).tolist(), key=lambda row: -scores[row])
    ranked: list[int] = []
    while ordered and len(ranked) < k:
        head = scores[ordered[0]]
        size = next((n for n, row in enumerate(ordered) if head - scores[row] > TIE), len(ordered))
        ranked += sorted(ordered[:size], key=lambda row: (updated[row], ids[row]), reverse=True)
        ordered = ordered[size:]
    return [(row, float(scores[row])) for row in ranked[:k]]


def newest_first(rows: Sequence[int], updated: Floats, ids: Ids) -> list[int]:
    """Rows ordered as profile memories are shown: most recently updated first, then the newest id."""
    return sorted((int(row) for row in rows), key=lambda row: (updated[row], ids[row]), reverse=True)


def choose(dense: npt.NDArray[np.floating[Any]], updated: Floats, ids: Ids, k: int, min_score: float, *,
           text: str = "", lexicon: Lexicon | None = None, fusion: Fusion, profile: Sequence[int] = ()
           ) -> list[tuple[int, float]]:
    """(row, score) of what a search returns: the `profile` rows first (always, whatever their score), then the
    top k other rows by fused score (proxy/search.py) at or above min_score, near-equal scores newest first.
    `dense` is each row's cosine, -inf where the row is not eligible (expired, replaced)."""
    fused = hybrid(dense.astype(np.float64, copy=False), text, lexicon, fusion)
    pinned = [(row, float(fused[row]) if np.isfinite(fused[row]) else float(dense[row])) for row in profile]
    if pinned:
        fused = fused.copy()
        fused[list(profile)] = -np.inf
    return pinned + (rank(fused, updated, ids, k, min_score) if k > 0 else [])


@dataclass(eq=False, slots=True)
class Rows:
    """A matrix with room to grow. Entries share it as views of its first rows; the writer appends past the last
    row any entry can see, so readers scoring an older view are never disturbed and an append copies nothing."""

    array: npt.NDArray[np.float32]
    filled: int

    def append(self, seen: int, fresh: npt.NDArray[np.float32]) -> npt.NDArray[np.float32] | None:
        """The view of `seen` + fresh rows, or None when someone else already wrote past `seen` or it is full."""
        if seen != self.filled or seen + len(fresh) > len(self.array):
            return None
        self.array[seen:seen + len(fresh)] = fresh
        self.filled = seen + len(fresh)
        return self.array[:self.filled]

    @classmethod
    def holding(cls, *parts: npt.NDArray[np.float32]) -> Rows:
        total, width = sum(len(p) for p in parts), parts[0].shape[1]
        array = np.empty((total + max(4, total // 2), width), dtype=np.float32)  # 50% headroom, a little for few
        np.concatenate(parts, out=array[:total])
        return cls(array, total)


@dataclass(frozen=True, slots=True)
class UserVectors:
    """One user's active vectors as of `generation`; matrix None: too many to cache, so scored in SQL."""

    generation: int
    ids: npt.NDArray[np.str_] = field(default_factory=lambda: np.zeros(0, dtype="U20"))
    updated: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    expires: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    matrix: npt.NDArray[np.float32] | None = None
    earliest_expiry: float = np.inf
    rows: Rows | None = None  # what `matrix` is a view of, when it may grow in place
    # Rows whose memory was rewritten or removed since the last copy: never eligible. A rewrite appends the new
    # vector instead of copying the whole matrix (a dedupe update of a 10k-memory user: 15 MB per write).
    dead: npt.NDArray[np.intp] = field(default_factory=lambda: np.zeros(0, dtype=np.intp))
    followed: tuple[int, ...] = ()  # generations of this process's writes this entry follows, newest first
    lexicon: Lexicon | None = None  # the rows' words (proxy/search.py), aligned with `ids`
    pinned: npt.NDArray[np.bool_] | None = None  # rows whose category is profile (always injected); None: none
    # The rows themselves, aligned with `ids` (PostgreSQL: a search then needs no round trip for its winners);
    # None: not held (SQLite reads them in the search's own snapshot, without a round trip).
    memories: Sequence[Memory] | None = None

    def follows(self, generation: int) -> bool:
        """Whether this entry was made by writes of this process after `generation` (at most FOLLOWED back): a
        reader whose snapshot is at `generation` should read again rather than load it. It must not rank with
        this entry: a memory replaced since is dead in it, and its replacement invisible to that snapshot."""
        return generation in self.followed

    def scores(self, query: npt.NDArray[np.float32], now: float) -> npt.NDArray[np.float32]:
        assert self.matrix is not None
        scores = row_dots(self.matrix, query)
        if self.earliest_expiry <= now:
            scores[self.expires <= now] = -np.inf
        if len(self.dead):
            scores[self.dead] = -np.inf
        return scores

    @property
    def nbytes(self) -> int:
        if self.matrix is None:
            return 128
        held = self.rows.array.nbytes if self.rows is not None else self.matrix.nbytes
        words = 0 if self.lexicon is None else self.lexicon.nbytes
        rows = 0 if self.memories is None else len(self.memories) * MEMORY_BYTES  # about: measured, ~440 a row
        return 128 + held + self.expires.nbytes + self.updated.nbytes + self.ids.nbytes + words + rows

    def profile(self, now: float, limit: int) -> list[int]:
        """The rows of live profile memories, newest_first, at most `limit`."""
        if self.pinned is None or limit <= 0 or not self.pinned.any():
            return []
        rows = np.flatnonzero(self.pinned & (self.expires > now))
        rows = rows[~np.isin(rows, self.dead)]
        return newest_first(rows.tolist(), self.updated, self.ids)[:limit]


class VectorCache:
    """Users' vectors in LRU order, at most max_bytes in all; shared by the reader threads."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, UserVectors] = OrderedDict()
        self.size = 0
        self.lock = threading.Lock()

    def get(self, user: str, generation: int) -> UserVectors | None:
        """The user's vectors as of `generation` exactly, or None."""
        with self.lock:
            entry = self.entries.get(user)
            if entry is None or entry.generation != generation:
                return None
            self.entries.move_to_end(user)
            return entry

    def peek(self, user: str) -> UserVectors | None:
        """The user's entry whatever its generation (the caller checks it against the store's afterwards)."""
        with self.lock:
            return self.entries.get(user)

    def put(self, user: str, entry: UserVectors) -> None:
        with self.lock:
            held = self.entries.get(user)
            if held is not None and entry.generation in held.followed:
                return  # a reader's late load of a snapshot that the writer's entry already follows
            self.discard_locked(user)
            if entry.nbytes > self.max_bytes:
                return
            self.entries[user] = entry
            self.size += entry.nbytes
            while self.size > self.max_bytes:
                self.size -= self.entries.popitem(last=False)[1].nbytes

    def discard(self, user: str) -> None:
        with self.lock:
            self.discard_locked(user)

    def discard_locked(self, user: str) -> None:
        old = self.entries.pop(user, None)
        if old is not None:
            self.size -= old.nbytes


def row_dots(matrix: npt.NDArray[np.float32], query: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """matrix @ query, on this thread. np.vecdot (numpy >= 2) runs one BLAS dot per row: 0.3 ms for 10k x 384,
    p95 0.4 ms. matmul would hand the work to OpenBLAS's thread pool, which on a 2-core box fights the event loop
    and the embedder for the cores: 0.12 ms p50 but 8 ms p95 (measured). einsum (no BLAS) is the fallback."""
    if hasattr(np, "vecdot"):
        dots: npt.NDArray[np.float32] = np.vecdot(matrix, query)
    else:
        dots = np.einsum("ij,j->i", matrix, query)
    return dots


def unit(matrix: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    norms = np.linalg.norm(matrix, axis=-1, keepdims=True)
    return (matrix / np.where(norms == 0, 1, norms)).astype(np.float32, copy=False)


class Draft:
    """A cached user's vectors as one write transaction changes them (used in the writer thread only).
    Vectorised throughout: a write to a user with 10k memories must not hold the GIL for milliseconds."""

    def __init__(self, base: UserVectors) -> None:
        assert base.matrix is not None
        self.base = base
        self.gone: set[str] = set()  # ids whose base rows were removed or rewritten by this write
        self.added: dict[str, tuple[float, float, npt.NDArray[np.float32]]] = {}  # id -> (updated, expires, unit)
        self.texts: dict[str, tuple[str, bool]] = {}  # id -> (text, pinned) of the added rows
        self.touched: dict[int, tuple[float, float, bool]] = {}  # base row -> (updated, expires, pinned)
        # The rows as stored, when the base holds them (see UserVectors.memories); None once one is missing.
        self.memories: dict[int | str, Memory] | None = {} if base.memories is not None else None

    def kept(self) -> npt.NDArray[np.bool_]:
        """The base rows still live after this write."""
        keep = np.ones(len(self.base.ids), dtype=bool)
        keep[self.base.dead] = False
        if self.gone:
            keep &= ~np.isin(self.base.ids, np.array(sorted(self.gone)))
        return keep

    def twin(self, vector: npt.NDArray[np.float32], now: float, exclude: str | None, threshold: float) -> str | None:
        """The closest active memory at or above `threshold` cosine, as the SQL dedupe would find it."""
        best_id, best = None, -2.0
        if len(self.base.ids):
            scores = self.base.scores(vector, now)
            mask = self.kept() if exclude is None else self.kept() & (self.base.ids != exclude)
            scores[~mask] = -np.inf
            row = int(np.argmax(scores))
            best_id, best = str(self.base.ids[row]), float(scores[row])
        for memory_id, (_, expires, added) in self.added.items():
            score = float(added @ vector)
            if memory_id != exclude and expires > now and score > best:
                best_id, best = memory_id, score
        return best_id if best >= threshold else None

    def put(self, memory_id: str, updated: float, expires: float | None, vector: npt.NDArray[np.float32],
            text: str = "", pinned: bool = False, memory: Memory | None = None) -> None:
        self.drop_from_base(memory_id)
        self.added[memory_id] = (updated, np.inf if expires is None else expires, vector)
        self.texts[memory_id] = (text, pinned)
        self.held(memory_id, memory)

    def touch(self, memory_id: str, updated: float, expires: float | None, vector: npt.NDArray[np.float32],
              pinned: bool = False, memory: Memory | None = None) -> bool:
        """Record a rewrite that kept the memory's text and vector (a fact stated again): only its times and
        whether it is pinned change, so its row stays where it is and the matrix and the words are shared with
        the entry before, not appended to (at 10k memories a restatement otherwise re-indexes every posting).
        False, recording nothing, unless `memory_id` is a live row of the base holding exactly `vector`: then
        `put` it. The caller checks that the text is the one stored."""
        if memory_id in self.gone or memory_id in self.added:
            return False
        assert self.base.matrix is not None
        rows = np.flatnonzero(self.base.ids == memory_id)
        rows = rows[~np.isin(rows, self.base.dead)]
        if len(rows) != 1 or not np.array_equal(self.base.matrix[rows[0]], vector):
            return False
        self.touched[int(rows[0])] = (updated, np.inf if expires is None else expires, pinned)
        self.held(int(rows[0]), memory)
        return True

    def held(self, key: int | str, memory: Memory | None) -> None:
        """Keep the row as stored under `key` (a base row, or an added id); without one, the entry holds none."""
        if self.memories is not None:
            if memory is None:
                self.memories = None
            else:
                self.memories[key] = memory

    def remove(self, memory_id: str) -> None:
        self.drop_from_base(memory_id)
        self.added.pop(memory_id, None)
        self.texts.pop(memory_id, None)

    def drop_from_base(self, memory_id: str) -> None:
        if memory_id not in self.gone and bool(np.any(self.base.ids == memory_id)):
            self.gone.add(memory_id)

    def build(self, generation: int) -> UserVectors:
        """The user's vectors after this write. New and rewritten memories are appended past every row a reader
        can see, and the rows they replace marked dead, so nothing is copied; once dead rows would pass a quarter
        of the live ones, or it has no room left, everything live is copied once into a new, roomier matrix."""
        assert self.base.matrix is not None
        keep = self.kept()
        added = list(self.added.values())
        new_ids = np.array(list(self.added), dtype=str)
        new_updated = np.array([u for u, _, _ in added], dtype=np.float64)
        new_expires = np.array([e for _, e, _ in added], dtype=np.float64)
        fresh = np.array([v for _, _, v in added], dtype=np.float32).reshape(len(added), self.base.matrix.shape[1])
        dead = np.flatnonzero(~keep)
        new_texts = [self.texts[memory_id][0] for memory_id in self.added]
        new_pinned = np.array([self.texts[memory_id][1] for memory_id in self.added], dtype=bool)
        base_pinned = np.zeros(len(keep), dtype=bool) if self.base.pinned is None else self.base.pinned.copy()
        base_updated, base_expires = self.base.updated.copy(), self.base.expires.copy()  # readers hold the old
        for row, (when, until, pin) in self.touched.items():
            base_updated[row], base_expires[row], base_pinned[row] = when, until, pin
        lexicon = self.base.lexicon
        rows, matrix = self.base.rows, None
        if rows is not None and len(dead) <= max(64, (len(keep) - len(dead)) // 4):
            matrix = rows.append(len(self.base.ids), fresh)
        compacted = matrix is None
        if matrix is not None:
            ids = np.concatenate([self.base.ids, new_ids]) if len(new_ids) else self.base.ids  # ~1 MB at 10k
            updated = np.concatenate([base_updated, new_updated])
            expires = np.concatenate([base_expires, new_expires])
            pinned = np.concatenate([base_pinned, new_pinned])
        else:
            rows = Rows.holding(self.base.matrix[keep], fresh)
            matrix, dead = rows.array[:rows.filled], np.zeros(0, dtype=np.intp)
            ids = np.concatenate([self.base.ids[keep], new_ids])
            updated = np.concatenate([base_updated[keep], new_updated])
            expires = np.concatenate([base_expires[keep], new_expires])
            pinned = np.concatenate([base_pinned[keep], new_pinned])
            lexicon = None if lexicon is None else lexicon.keep(keep)
        lexicon = None if lexicon is None else lexicon.extend(new_texts)
        memories = self.rows_held(keep if compacted else None)
        earliest = float(np.delete(expires, dead).min(initial=np.inf))
        followed = (self.base.generation, *self.base.followed)[:FOLLOWED]
        return UserVectors(generation, ids, updated, expires, matrix, earliest, rows, dead, followed,
                           lexicon, pinned if pinned.any() else None, memories)

    def rows_held(self, keep: npt.NDArray[np.bool_] | None) -> list[Memory] | None:
        """The rows as stored after this write, aligned with the new entry's ids (`keep`: the base rows kept when
        the matrix was compacted, None when it was appended to); None when any is missing."""
        if self.memories is None or self.base.memories is None:
            return None
        held = list(self.base.memories)
        for row in self.touched:
            held[row] = self.memories[row]
        if keep is not None:
            held = [memory for memory, kept in zip(held, keep.tolist(), strict=True) if kept]
        return held + [self.memories[memory_id] for memory_id in self.added]
