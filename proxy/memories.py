"""Recall and remember for one process: the embedder, the store, and the bounded queue of writes that keeps
remembering off the request path. The chat pipeline, the REST API and the CLI all go through here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from proxy import logs, metrics
from proxy.errors import StoreError
from proxy.models import Forget, Hit, Memory, NewMemory, Operation
from proxy.sensitive import secret_kind

if TYPE_CHECKING:
    from proxy.config import Settings
    from proxy.embed import Embedder, Vector
    from proxy.store import Store

log = logging.getLogger("memory_proxy.memories")
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
WRITE_BATCH = 32  # queued jobs stored together, their texts embedded in one model run


def clean_text(text: str, max_chars: int) -> str:
    """Stored text: no control characters (newlines and tabs folded to spaces), trimmed, capped."""
    text = CONTROL.sub("", text.replace("\n", " ").replace("\t", " ").replace("\r", " "))
    return " ".join(text.split())[:max_chars].strip()


def is_new(memory: Memory) -> bool:
    """Whether a memory the store just wrote is a new one, rather than an update of an older one (a near-duplicate
    updated in place, or a memory that `replaces` another)."""
    return memory.created_at == memory.updated_at and memory.supersedes is None


@dataclass(frozen=True, slots=True)
class Job:
    user: str
    operations: tuple[Operation, ...]
    extraction: str = "inline"  # how the operations were found: inline (the answer's block) or background
    context: logs.RequestContext | None = field(default_factory=logs.current)  # the request, for the log lines


class Memories:
    def __init__(self, store: Store, embedder: Embedder, *, k: int = 5, min_similarity: float = 0.3,
                 max_chars: int = 500, queue_size: int = 1000) -> None:
        self.store = store
        self.embedder = embedder
        self.k = k
        self.min_similarity = min_similarity
        self.max_chars = max_chars
        self.queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=queue_size)
        self.dropped = 0
        self.failed = 0
        self._worker: asyncio.Task[None] | None = None

    async def recall(self, user: str, text: str, k: int | None = None,
                     min_similarity: float | None = None) -> list[Hit]:
        if not text.strip():
            return []
        started = time.perf_counter()
        try:
            vector = await self.embedder.embed_one(text)
            hits = await self.store.search(user, vector, k or self.k,
                                           self.min_similarity if min_similarity is None else min_similarity)
        finally:  # a recall cut off by its budget counts too, with the time it had
            metrics.recalled(time.perf_counter() - started)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("recalled %d memories: %s", len(hits), ", ".join(
                f"{hit.memory.id} ({hit.score:.3f}) {logs.content(hit.memory.text)}" for hit in hits) or "none")
        return hits

    def clean(self, items: Sequence[NewMemory], extraction: str | None = None) -> list[NewMemory]:
        """The items to store: texts cleaned and capped; empty ones and obvious secrets left out (counted as
        refused when they came from a chat, whose `extraction` mode is given)."""
        cleaned = []
        for item in items:
            text = clean_text(item.text, self.max_chars)
            kind = secret_kind(text)
            if kind:
                log.warning("not storing a memory that looks like a %s", kind)  # never log the text itself
                if extraction:
                    metrics.memory_operation("refused", extraction)
            elif text:
                cleaned.append(replace(item, text=text))
            else:
                log.debug("ignoring a memory that is empty once cleaned")
        return cleaned

    async def add(self, user: str, items: Sequence[NewMemory]) -> list[Memory]:
        """Write now (the API and CLI path): texts cleaned and capped, embedded, deduplicated by the store."""
        cleaned = self.clean(items)
        if not cleaned:
            return []
        vectors = await self.embedder.embed([item.text for item in cleaned])
        return await self.store.add(user, cleaned, vectors)

    async def apply_all(self, jobs: Sequence[Job]) -> None:
        """Store the jobs, every new text among them embedded in one model run, each user's jobs in order and the
        users side by side: under load the writer keeps up with the requests, where a model run and an event-loop
        round trip per job would fall behind and fill the queue. A job that fails is logged and counted; the
        others are stored all the same."""
        batches = [self.clean([op for op in job.operations if isinstance(op, NewMemory)], job.extraction)
                   for job in jobs]
        texts = [item.text for batch in batches for item in batch]
        try:
            vectors = await self.embedder.embed(texts) if texts else None
        except Exception:
            self.failed += len(jobs)
            log.exception("could not embed %d memory text(s)", len(texts))
            return
        per_user: dict[str, list[tuple[Job, list[NewMemory], Vector | None]]] = {}
        start = 0
        for job, batch in zip(jobs, batches, strict=True):
            rows = None if vectors is None or not batch else vectors[start:start + len(batch)]
            per_user.setdefault(job.user, []).append((job, batch, rows))
            start += len(batch)
        await asyncio.gather(*(self._store_in_order(work) for work in per_user.values()))

    async def _store_in_order(self, work: list[tuple[Job, list[NewMemory], Vector | None]]) -> None:
        for job, batch, rows in work:
            logs.CURRENT.set(job.context)  # this task's own context: the lines below belong to that request
            try:
                for op in job.operations:
                    if isinstance(op, Forget):
                        forgotten = await self.store.forget(job.user, op.id)
                        metrics.memory_operation("forgotten", job.extraction, int(forgotten))
                        log.debug("forgot %s" if forgotten else "ignoring forget of %s: no such memory", op.id)
                if batch and rows is not None:
                    stored = await self.store.add(job.user, batch, rows)
                    added = [memory for memory in stored if is_new(memory)]
                    metrics.memory_operation("added", job.extraction, len(added))
                    metrics.memory_operation("updated", job.extraction, len(stored) - len(added))
                    for memory in stored:
                        log.debug("%s %s %s", "added" if is_new(memory) else "updated", memory.id,
                                  logs.content(memory.text))
            except StoreError as exc:  # a known store fault (locked, read-only, full) says it all in one line
                self.failed += 1
                log.error("could not store %d memory operation(s): %s", len(job.operations), exc.message)
            except Exception:
                self.failed += 1
                log.exception("could not store %d memory operation(s)", len(job.operations))

    def remember(self, user: str, operations: Sequence[Operation], extraction: str = "inline") -> bool:
        """Queue operations to apply off the request path; False (and logged) when the queue is full.
        `extraction` (inline or background) says how they were found, for the metrics."""
        if not operations:
            return True
        try:
            self.queue.put_nowait(Job(user, tuple(operations), extraction))
        except asyncio.QueueFull:
            self.dropped += 1
            metrics.queue_dropped("memories")
            log.warning("memory write queue is full: dropped %d operation(s) for a user", len(operations))
            return False
        metrics.queue_depth("memories", self.queue.qsize())
        return True

    def start(self) -> None:
        self._worker = asyncio.create_task(self._work(), name="memory-writer")

    async def _work(self) -> None:
        while True:
            jobs = [await self.queue.get()]
            while len(jobs) < WRITE_BATCH and not self.queue.empty():
                jobs.append(self.queue.get_nowait())
            metrics.queue_depth("memories", self.queue.qsize())
            try:
                await self.apply_all(jobs)
            finally:
                for _ in jobs:
                    self.queue.task_done()

    async def drain(self, seconds: float = 10.0) -> None:
        """Wait until every queued write is stored (shutdown, tests)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.queue.join()

    async def stop(self) -> None:
        """Store what is queued, then stop the writer. The store and embedder stay open for their owner."""
        await self.drain()
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker


@asynccontextmanager
async def open_memories(settings: Settings, *, store: Store | None = None, embedder: Embedder | None = None,
                        ready: Callable[[str], None] = lambda part: None) -> AsyncIterator[Memories]:
    """Load the model (in a thread) and open the store as the settings say, unless given; close what was opened.
    `ready(part)` is told as each part comes up. Queued writes are stored before anything closes."""
    from proxy.embed import load_embedder
    from proxy.store import open_store

    async with AsyncExitStack() as stack:
        if embedder is None:
            embedder = await asyncio.to_thread(load_embedder, settings.model_dir, threads=settings.embed_threads,
                                               batch_size=settings.embed_batch, cache_size=settings.embed_cache)
            stack.push_async_callback(embedder.close)
        ready("model")
        if store is None:
            store = await open_store(settings.db, dimension=embedder.dimension,
                                     dedupe_similarity=settings.dedupe_similarity)
            stack.push_async_callback(store.close)
        ready("store")
        memories = Memories(store, embedder, k=settings.recall_k, min_similarity=settings.min_similarity,
                            max_chars=settings.memory_max_chars, queue_size=settings.write_queue)
        memories.start()
        stack.push_async_callback(memories.stop)
        yield memories
