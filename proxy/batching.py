"""The embedding model's thread, shared by every local model: micro-batching and the query cache.

The model runs in one dedicated thread, one batch at a time, so the event loop never waits on it. Calls that
arrive while a batch runs queue up and run together as the next batch (micro-batching): under load, N
concurrent queries cost a few model runs instead of N. Recent texts are answered from an LRU cache.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import ctypes.util
import hashlib
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from proxy import metrics
from proxy.errors import ModelError

Vector = npt.NDArray[np.float32]
CACHE_KEY_CHARS = 256  # longer texts are cached under a digest, so the cache never holds big strings



def cache_key(text: str) -> str | bytes:
    """The text itself, or a digest of a long one: a cache keyed by it never holds big strings."""
    if len(text) <= CACHE_KEY_CHARS:
        return text
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class BatchingEmbedder:
    """The thread, the queue and the cache around a model's blocking `encode` (subclasses give `encode`, `name`,
    `dimension` and `batch_size`, and call `start` once the model is loaded)."""

    name: str
    dimension: int
    batch_size: int

    def encode(self, texts: Sequence[str]) -> Vector:
        raise NotImplementedError

    def start(self, cache_size: int) -> None:
        """Start the model thread (the model is loaded and has run once)."""
        keep_large_blocks_mapped()  # a process that loads a model serves: its big arrays must not pin the heap
        self.cache = _LruCache(cache_size)
        self._trimmed_at = time.monotonic()
        self._requests: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._state_lock = threading.Lock()
        self._closed = False
        self._worker = threading.Thread(target=self._serve, name=f"embed-{self.name}", daemon=True)
        self._worker.start()

    async def embed(self, texts: Sequence[str]) -> Vector:
        texts = as_list(texts)
        cached = self.cache.get(texts)
        missing = list(dict.fromkeys(text for text, row in zip(texts, cached, strict=True) if row is None))
        found: dict[str, Vector] = {}
        if missing:
            computed: Vector = await asyncio.wrap_future(self._submit(missing))
            found = dict(zip(missing, computed, strict=True))
        if not texts:
            return np.empty((0, self.dimension), dtype=np.float32)
        rows = [found[text] if row is None else row for text, row in zip(texts, cached, strict=True)]
        return np.stack(rows)  # a copy: callers may change it without touching the cache

    async def embed_one(self, text: str) -> Vector:
        vectors = await self.embed([text])
        row: Vector = vectors[0]
        return row

    async def close(self) -> None:
        """Finish the queued batches, then stop the model thread. Later calls to `embed` raise ModelError."""
        with self._state_lock:
            if not self._closed:
                self._closed = True
                self._requests.put(None)
        await asyncio.to_thread(self._worker.join)

    def _submit(self, texts: list[str]) -> concurrent.futures.Future[Vector]:
        future: concurrent.futures.Future[Vector] = concurrent.futures.Future()
        with self._state_lock:
            if self._closed:
                raise ModelError("the embedder is closed")
            self._requests.put(_Request(texts, future))
        return future

    def _serve(self) -> None:
        """The model thread: take a request, add whatever else is already waiting (up to batch_size texts), run."""
        held: _Request | None = None
        stopping = False
        while not stopping:
            first = held if held is not None else self._requests.get()
            held = None
            if first is None:
                return
            batch, size = [first], len(first.texts)
            while size < self.batch_size:
                try:
                    waiting = self._requests.get_nowait()
                except queue.Empty:
                    break
                if waiting is None:
                    stopping = True
                    break
                if size + len(waiting.texts) > self.batch_size:
                    held = waiting  # it leads the next batch
                    break
                batch.append(waiting)
                size += len(waiting.texts)
            self._answer(batch)
            if size >= self.batch_size and self._requests.empty() and time.monotonic() - self._trimmed_at > 1:
                self._trimmed_at = time.monotonic()
                release_memory()  # bulk work is over for now: hand its peak back to the system

    def _answer(self, batch: list[_Request]) -> None:
        live = [request for request in batch if request.future.set_running_or_notify_cancel()]
        if not live:
            return
        texts = list(dict.fromkeys(text for request in live for text in request.texts))
        started = time.perf_counter()
        try:
            vectors = self.encode(texts)
        except Exception as exc:
            for request in live:
                request.future.set_exception(exc)
            return
        metrics.embedded(time.perf_counter() - started, len(texts))
        self.cache.put(texts, vectors)
        row_of = {text: row for row, text in enumerate(texts)}
        for request in live:
            request.future.set_result(vectors[[row_of[text] for text in request.texts]])


@dataclass(slots=True)
class _Request:
    texts: list[str]
    future: concurrent.futures.Future[Vector]


class _LruCache:
    """Recent text → vector. Looked up on the event loop, filled by the model thread, hence the lock."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[str | bytes, Vector] = OrderedDict()
        self._lock = threading.Lock()


    def get(self, texts: list[str]) -> list[Vector | None]:
        if not self.size:
            return [None] * len(texts)
        found: list[Vector | None] = []
        with self._lock:
            for text in texts:
                key = cache_key(text)
                vector = self._items.get(key)
                if vector is not None:
                    self._items.move_to_end(key)
                found.append(vector)
        hits = sum(vector is not None for vector in found)
        self.hits += hits
        self.misses += len(texts) - hits
        return found

    def put(self, texts: list[str], vectors: Vector) -> None:
        if not self.size:
            return
        with self._lock:
            for text, vector in zip(texts, vectors, strict=True):
                row = vector.copy()
                row.flags.writeable = False
                self._items[cache_key(text)] = row
                self._items.move_to_end(cache_key(text))
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


def release_memory() -> None:
    """Return freed heap to the system (glibc's malloc_trim). glibc keeps what onnxruntime frees, so without it
    RSS stays at the peak of the largest batch ever run: measured 249 -> 170 MB after 500 long texts."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 256 * 1024


def keep_large_blocks_mapped() -> None:
    """Fix glibc's mmap threshold at 256 KiB. By default glibc raises it to the size of every large block freed
    (up to 32 MiB), after which the users' vector matrices and word indexes that each write replaces come from
    the heap, whose freed space stays resident: measured, RSS grew 260 -> 411 MiB over 1,200 memory-path
    requests of a 10k-memory user, and stays flat with the threshold fixed. Setting it turns that off."""
    if _LIBC is not None and hasattr(_LIBC, "mallopt"):
        _LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def _glibc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (musl, macOS): nothing to trim
        return None


_LIBC = _glibc()


def normalised(rows: npt.NDArray[np.floating[Any]]) -> Vector:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    unit: Vector = (rows / np.maximum(norms, 1e-12)).astype(np.float32)
    return unit


def as_list(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):  # iterating a str would embed each character
        raise TypeError("texts must be a sequence of strings, not a string")
    return list(texts)
