"""A write's edit of a user's cache entry (proxy/store/vectors.py: UserVectors), in the writer's transaction.

Both engines edit the entry a write starts from instead of dropping it: dedupe is answered from it without SQL,
new and rewritten memories are appended past every row a reader can see, and the result is stored under the
write's generation after its COMMIT, so recall right after a write stays warm.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from proxy.models import Memory
from proxy.store.vectors import FOLLOWED, Rows, UserVectors, held_bytes


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
        memories, memories_bytes = self.rows_held(keep if compacted else None)
        earliest = float(np.delete(expires, dead).min(initial=np.inf))
        followed = (self.base.generation, *self.base.followed)[:FOLLOWED]
        return UserVectors(generation, ids, updated, expires, matrix, earliest, rows, dead, followed,
                           lexicon, pinned if pinned.any() else None, memories, memories_bytes)

    def rows_held(self, keep: npt.NDArray[np.bool_] | None) -> tuple[list[Memory] | None, int]:
        """The rows as stored after this write, aligned with the new entry's ids (`keep`: the base rows kept when
        the matrix was compacted, None when it was appended to), and what they cost (held_bytes, counted from
        the base's by difference); None, 0 when any is missing."""
        if self.memories is None or self.base.memories is None:
            return None, 0
        held = list(self.base.memories)
        size = self.base.memories_bytes
        for row in self.touched:
            size += held_bytes([self.memories[row]]) - held_bytes([held[row]])
            held[row] = self.memories[row]
        if keep is not None:
            size -= held_bytes(memory for memory, kept in zip(held, keep.tolist(), strict=True) if not kept)
            held = [memory for memory, kept in zip(held, keep.tolist(), strict=True) if kept]
        added = [self.memories[memory_id] for memory_id in self.added]
        return held + added, size + held_bytes(added)
