"""Recall and remember for one process: the embedder, the store, and the bounded queue of writes that keeps
remembering off the request path. The chat pipeline, the REST API and the CLI all go through here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from proxy.errors import StoreError
from proxy.models import PROFILE, Forget, Hit, Memory, NewMemory, Operation, happened_at
from proxy.search import DENSE, Fusion, mixed
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


def capped_profile(hits: list[Hit], max_chars: int) -> list[Hit]:
    """The hits without the profile ones that would take the profile texts past `max_chars` in all (earlier,
    more recently updated ones are kept first); recalled hits all stay."""
    kept, size = [], 0
    for hit in hits:
        if hit.memory.category == PROFILE:
            if size + len(hit.memory.text) > max_chars:
                continue
            size += len(hit.memory.text)
        kept.append(hit)
    return kept


@dataclass(frozen=True, slots=True)
class Job:
    user: str
    operations: tuple[Operation, ...]


class Memories:
    def __init__(self, store: Store, embedder: Embedder, *, k: int = 5, min_similarity: float = 0.3,
                 max_chars: int = 500, queue_size: int = 1000, fusion: Fusion = DENSE, profile_max: int = 0,
                 profile_max_chars: int = 600) -> None:
        self.store = store
        self.embedder = embedder
        self.k = k
        self.min_similarity = min_similarity
        self.fusion = fusion
        self.profile_max = profile_max
        self.profile_max_chars = profile_max_chars
        self.max_chars = max_chars
        self.queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=queue_size)
        self.dropped = 0
        self.failed = 0
        self._worker: asyncio.Task[None] | None = None

    async def recall(self, user: str, text: str, k: int | None = None, min_similarity: float | None = None, *,
                     profile: bool = True) -> list[Hit]:
        """What to inject for `text` (a str, or a Question: proxy/search.py): the user's profile memories first
        whatever the question (at most profile_max, within profile_max_chars; not with `profile` False, as a
        search of the API wants), then their memories for it, best first (hybrid ranking).
        A user who never had a memory costs one lookup: the question is not embedded."""
        if not text.strip() or not await self.store.known(user):
            return []
        before = getattr(text, "before", "")  # a Question (proxy/search.py): the user's message before it
        if before.strip():  # usually still in the embedder's cache: it was the last message of the request before
            last, previous = await self.embedder.embed([text, before])
            vector = mixed(last, previous)
        else:
            vector = await self.embedder.embed_one(text)
        hits = await self.store.search(user, vector, k or self.k,
                                       self.min_similarity if min_similarity is None else min_similarity,
                                       text=text, fusion=self.fusion, profile=self.profile_max if profile else 0)
        return capped_profile(hits, self.profile_max_chars) if profile else hits

    def clean(self, items: Sequence[NewMemory]) -> list[NewMemory]:
        """The items to store: texts cleaned and capped; empty ones and obvious secrets left out."""
        cleaned = []
        for item in items:
            text = clean_text(item.text, self.max_chars)
            kind = secret_kind(text)
            if kind:
                log.warning("not storing a memory that looks like a %s", kind)  # never log the text itself
            elif text:
                cleaned.append(replace(item, text=text, happened_at=happened_at(item.happened_at)))
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
        batches = [self.clean([op for op in job.operations if isinstance(op, NewMemory)]) for job in jobs]
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
            try:
                for op in job.operations:
                    if isinstance(op, Forget):
                        await self.store.forget(job.user, op.id)
                if batch and rows is not None:
                    await self.store.add(job.user, batch, rows)
            except StoreError as exc:  # a known store fault (locked, read-only, full) says it all in one line
                self.failed += 1
                log.error("could not store %d memory operation(s): %s", len(job.operations), exc.message)
            except Exception:
                self.failed += 1
                log.exception("could not store %d memory operation(s)", len(job.operations))

    def remember(self, user: str, operations: Sequence[Operation]) -> bool:
        """Queue operations to apply off the request path; False (and logged) when the queue is full."""
        if not operations:
            return True
        try:
            self.queue.put_nowait(Job(user, tuple(operations)))
            return True
        except asyncio.QueueFull:
            self.dropped += 1
            log.warning("memory write queue is full: dropped %d operation(s) for a user", len(operations))
            return False

    def start(self) -> None:
        self._worker = asyncio.create_task(self._work(), name="memory-writer")

    async def _work(self) -> None:
        while True:
            jobs = [await self.queue.get()]
            while len(jobs) < WRITE_BATCH and not self.queue.empty():
                jobs.append(self.queue.get_nowait())
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
    from proxy.embed import load_configured
    from proxy.store import open_store

    async with AsyncExitStack() as stack:
        if embedder is None:
            embedder = await asyncio.to_thread(load_configured, settings)
            stack.push_async_callback(embedder.close)
        ready("model")
        if store is None:
            store = await open_store(settings.db, dimension=embedder.dimension,
                                     dedupe_similarity=settings.dedupe_similarity, model=embedder.name)
            stack.push_async_callback(store.close)
        ready("store")
        memories = Memories(store, embedder, k=settings.recall_k, min_similarity=settings.min_similarity,
                            max_chars=settings.memory_max_chars, queue_size=settings.write_queue,
                            fusion=Fusion(lexical_weight=settings.lexical_weight), profile_max=settings.profile_max,
                            profile_max_chars=settings.profile_max_chars)
        memories.start()
        stack.push_async_callback(memories.stop)
        yield memories
