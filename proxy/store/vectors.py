"""Users' vectors held in memory for exact per-user search, and their upkeep as writes land.

A search scores one user's matrix in numpy (0.3 ms for 10k x 384), far faster than any SQL over the rows. The
cache is keyed by the user's generation (a random number every write changes in the same transaction), so an
entry can never answer for a state it did not see. A write in this process does not throw the user's entry away:
it edits a `Draft` of it (proxy/store/draft.py; it also answers the dedupe question without SQL) and stores the
result under the new generation, so recall right after a write stays warm. Writes by other processes still just
invalidate.
"""

from __future__ import annotations

import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
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


Floats = Sequence[float] | npt.NDArray[np.float64]
Ids = Sequence[str] | npt.NDArray[np.str_]


def held_bytes(memories: Iterable[Memory]) -> int:
    """What holding these rows costs, in bytes (sys.getsizeof): each object, its slot in the list and every
    field's value, texts counted as Python stores them (a 500-character text of emoji takes ~2 KB, of CJK ~1 KB,
    of ASCII ~550 bytes)."""
    return sum(sys.getsizeof(memory) + 8 + sum(sys.getsizeof(value) for value in (
        memory.id, memory.user, memory.text, memory.category, memory.source, memory.created_at, memory.updated_at,
        memory.expires_at, memory.supersedes, memory.superseded_by, memory.happened_at, memory.valid_until)
        if value is not None) for memory in memories)


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
    memories_bytes: int = 0  # what `memories` costs (held_bytes)

    def follows(self, generation: int) -> bool:
        """Whether this entry was made by writes of this process after `generation` (at most FOLLOWED back): a
        reader whose snapshot is at `generation` should read again rather than load it. It must not rank with
        this entry: a memory replaced since is dead in it, and its replacement invisible to that snapshot."""
        return generation in self.followed

    def scores(self, query: npt.NDArray[np.float32], now: float) -> npt.NDArray[np.float32]:
        """Each row's cosine with `query` (a unit vector), -inf for the rows not eligible at `now` (expired, dead)."""
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
        return 128 + held + self.expires.nbytes + self.updated.nbytes + self.ids.nbytes + words + self.memories_bytes

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


# Past this many rows a scan is split in two and its second half offered to a helper thread: 0.57 vs 0.90 ms warm,
# 1.2 vs 1.6 ms cold for 10k x 512 on 2 cores (measured). The caller takes the half back if the helper has not
# started it (busy with another scan), so a scan is never slower than one thread's by more than a hand-off.
SPLIT_ROWS = 4096
_helper = ThreadPoolExecutor(1, thread_name_prefix="vector-scan")


def _new_helper() -> None:
    """A forked child has none of the parent's threads, but its executor would believe it had: start afresh."""
    global _helper
    _helper = ThreadPoolExecutor(1, thread_name_prefix="vector-scan")


os.register_at_fork(after_in_child=_new_helper)


def row_dots(matrix: npt.NDArray[np.float32], query: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """matrix @ query, one float32 per row, on this thread (and, past SPLIT_ROWS rows, the helper's). np.vecdot
    (numpy >= 2) runs one BLAS dot per row: 0.3 ms for 10k x 384, p95 0.4 ms. matmul would hand the work to
    OpenBLAS's thread pool, which on a 2-core box fights the event loop and the embedder for the cores: 0.12 ms p50
    but 8 ms p95 (measured). einsum (no BLAS) is the fallback."""
    out = np.empty(len(matrix), dtype=np.float32)
    if len(matrix) < SPLIT_ROWS:
        return dots_into(matrix, query, out)
    half = len(matrix) // 2
    try:
        helped = _helper.submit(dots_into, matrix[half:], query, out[half:])
    except RuntimeError:  # the interpreter is shutting down: no new threads, so all of it here
        return dots_into(matrix, query, out)
    dots_into(matrix[:half], query, out[:half])
    if helped.cancel():
        dots_into(matrix[half:], query, out[half:])
    else:
        helped.result()
    return out


def dots_into(matrix: npt.NDArray[np.float32], query: npt.NDArray[np.float32], out: npt.NDArray[np.float32]
              ) -> npt.NDArray[np.float32]:
    """matrix @ query written into `out` (one float32 per row of `matrix`), on this thread; returns `out`."""
    if hasattr(np, "vecdot"):
        np.vecdot(matrix, query, out=out)
    else:
        np.einsum("ij,j->i", matrix, query, out=out)
    return out


def unit(matrix: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    norms = np.linalg.norm(matrix, axis=-1, keepdims=True)
    return (matrix / np.where(norms == 0, 1, norms)).astype(np.float32, copy=False)
