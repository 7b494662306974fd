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
from proxy.errors import BadRequest, StoreError, StoreUnavailable
from proxy.models import PROFILE, Forget, Hit, Memory, NewMemory, Operation, category_of, happened_at
from proxy.search import DENSE, Fusion, mixed
from proxy.sensitive import mask_contacts, secret_kind

if TYPE_CHECKING:
    from proxy.config import Settings
    from proxy.embed import Embedder, Vector
    from proxy.store import Store

log = logging.getLogger("memory_proxy.memories")
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
WRITE_BATCH = 32  # queued jobs stored together, their texts embedded in one model run
RETRY_FIRST, RETRY_MAX = 0.25, 5.0  # seconds between tries while the store is down


def clean_text(text: str, max_chars: int) -> str:
    """Stored text: no control characters (newlines and tabs folded to spaces), no lone surrogates (U+FFFD
    instead: no store can encode them), trimmed, capped."""
    text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    text = CONTROL.sub("", text.replace("\n", " ").replace("\t", " ").replace("\r", " "))
    return " ".join(text.split())[:max_chars].strip()


def is_new(memory: Memory) -> bool:
    """Whether a memory the store just wrote is a new one, rather than an update of an older one (a near-duplicate
    updated in place, or a memory that `replaces` another)."""
    return memory.created_at == memory.updated_at and memory.supersedes is None


@dataclass(frozen=True, slots=True)
class Cleaning:
    """The one cleaning every write path applies — a chat's <memory> block, the REST API (add, patch, import),
    the CLI and `migrate` — so that every stored field that reaches a prompt is data:

    - no field holds a secret (proxy/sensitive.py, on the NFKC-normalised text, the category included);
    - the text has no control characters, newlines and tabs folded to spaces, at most `max_chars` long;
    - e-mail addresses and phone numbers are kept, masked (`[email]`, `[phone]`) or refused (`contact_info`);
    - the category is one of CATEGORIES (`category_of`: aliases mapped, anything else "fact").
    """

    max_chars: int = 500
    contact_info: str = "keep"
    phone_region: str = "US"

    def item(self, item: NewMemory, param: str = "") -> NewMemory:
        """The item as it is stored. Raises BadRequest (400; `code` secret_refused or contact_refused, `param` the
        field, after `param` when given) when it must not be stored, or when its text is empty once cleaned."""
        for name, value in (("text", item.text), ("category", item.category)):
            kind = secret_kind(value) if isinstance(value, str) else None
            if kind:
                raise BadRequest(f"'{name}' looks like it holds a {kind}; secrets are never stored",
                                 param=f"{param} {name}".strip(), code="secret_refused")
        text = clean_text(item.text, self.max_chars)
        if self.contact_info != "keep" and text:
            masked, found = mask_contacts(text, self.phone_region)
            if found and self.contact_info == "refuse":
                raise BadRequest("'text' holds an e-mail address or a phone number, which this proxy does not store",
                                 param=f"{param} text".strip(), code="contact_refused")
            text = masked
        if not text:
            raise BadRequest("'text' is empty once cleaned", param=f"{param} text".strip())
        return replace(item, text=text, category=category_of(item.category), happened_at=happened_at(item.happened_at))


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
    extraction: str = "inline"  # how the operations were found: inline (the answer's block) or background
    context: logs.RequestContext | None = field(default_factory=logs.current)  # the request, for the log lines


class Memories:
    def __init__(self, store: Store, embedder: Embedder, *, k: int = 5, min_similarity: float = 0.3,
                 max_chars: int = 500, queue_size: int = 1000, cleaning: Cleaning | None = None,
                 fusion: Fusion = DENSE, profile_max: int = 0, profile_max_chars: int = 600) -> None:
        self.store = store
        self.embedder = embedder
        self.k = k
        self.min_similarity = min_similarity
        self.fusion = fusion
        self.profile_max = profile_max
        self.profile_max_chars = profile_max_chars
        self.max_chars = max_chars
        self.cleaning = cleaning or Cleaning(max_chars)
        self.queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=queue_size)
        self.dropped = 0  # writes refused by the full queue
        self.failed = 0  # writes that failed for good (a bug, a fault the store will not recover from)
        self.waiting = 0  # writes the writer holds while the store is down
        self.down = ""  # why the store is down, while it is
        self._worker: asyncio.Task[None] | None = None

    async def recall(self, user: str, text: str, k: int | None = None, min_similarity: float | None = None, *,
                     profile: bool = True) -> list[Hit]:
        """What to inject for `text` (a str, or a Question: proxy/search.py): the user's profile memories first
        whatever the question (at most profile_max, within profile_max_chars; not with `profile` False, as a
        search of the API wants), then their memories for it, best first (hybrid ranking).
        A user who never had a memory costs one lookup: the question is not embedded."""
        started = time.perf_counter()
        try:
            if not text.strip() or not await self.store.known(user):
                return []
            # The store gets the embedding under way: one that needs a round trip makes it while the model runs.
            vector = asyncio.ensure_future(self.question_vector(text))
            try:
                hits = await self.store.search(user, vector, k or self.k,
                                               self.min_similarity if min_similarity is None else min_similarity,
                                               text=text, fusion=self.fusion,
                                               profile=self.profile_max if profile else 0)
            finally:  # the search failed before it needed the vector: stop it, or take its fault as seen
                if not vector.cancel() and not vector.cancelled():
                    vector.exception()
        finally:  # a recall cut off by its budget counts too, with the time it had
            metrics.recalled(time.perf_counter() - started)
        hits = capped_profile(hits, self.profile_max_chars) if profile else hits
        if log.isEnabledFor(logging.DEBUG):
            log.debug("recalled %d memories: %s", len(hits), ", ".join(
                f"{hit.memory.id} ({hit.score:.3f}) {logs.content(hit.memory.text)}" for hit in hits) or "none")
        return hits

    async def question_vector(self, text: str) -> Vector:
        """The vector searched for `text`: a Question's (proxy/search.py) weighs in the user's message before it."""
        before = getattr(text, "before", "")
        if before.strip():  # usually still in the embedder's cache: it was the last message of the request before
            last, previous = await self.embedder.embed([text, before])
            return mixed(last, previous)
        return await self.embedder.embed_one(text)

    def clean(self, items: Sequence[NewMemory], extraction: str | None = None) -> list[NewMemory]:
        """The items to store, as `Cleaning` makes them; those it refuses are left out and logged (counted as
        refused when they came from a chat, whose `extraction` mode is given)."""
        cleaned = []
        for item in items:
            try:
                cleaned.append(self.cleaning.item(item))
            except BadRequest as exc:
                if exc.code:  # refused (a secret, a contact); the message names the field, never the text
                    log.warning("not storing a memory: %s", exc.message)
                    if extraction:
                        metrics.memory_operation("refused", extraction)
                else:
                    log.debug("ignoring a memory that is empty once cleaned")
        return cleaned

    async def add(self, user: str, items: Sequence[NewMemory]) -> list[Memory]:
        """Write now (the API and CLI path): texts cleaned and capped, embedded, deduplicated by the store."""
        cleaned = await asyncio.to_thread(self.clean, items)  # the secret scan: ~0.25 ms an item, off the loop
        if not cleaned:
            return []
        vectors = await self.embedder.embed([item.text for item in cleaned])
        return await self.store.add(user, cleaned, vectors)

    async def apply_all(self, jobs: Sequence[Job]) -> list[Job]:
        """Store the jobs, every new text among them embedded in one model run, each user's jobs in order and the
        users side by side: under load the writer keeps up with the requests, where a model run and an event-loop
        round trip per job would fall behind and fill the queue. Returns the jobs to try again, in order: those
        the store could not take because it is down (StoreUnavailable), with the later jobs of the same users. A
        job that fails otherwise is logged and counted; the others are stored all the same."""
        batches = await asyncio.to_thread(lambda: [  # the secret scan, off the event loop
            self.clean([op for op in job.operations if isinstance(op, NewMemory)], job.extraction) for job in jobs])
        texts = [item.text for batch in batches for item in batch]
        try:
            vectors = await self.embedder.embed(texts) if texts else None
        except Exception:
            self.failed += len(jobs)
            log.exception("could not embed %d memory text(s)", len(texts))
            return []
        per_user: dict[str, list[tuple[int, Job, list[NewMemory], Vector | None]]] = {}
        start = 0
        for number, (job, batch) in enumerate(zip(jobs, batches, strict=True)):
            rows = None if vectors is None or not batch else vectors[start:start + len(batch)]
            per_user.setdefault(job.user, []).append((number, job, batch, rows))
            start += len(batch)
        again = await asyncio.gather(*(self._store_in_order(work) for work in per_user.values()))
        return [jobs[number] for number in sorted(number for numbers in again for number in numbers)]

    async def _store_in_order(self, work: list[tuple[int, Job, list[NewMemory], Vector | None]]) -> list[int]:
        """Store one user's jobs in order; the numbers of those left for later (the store is down)."""
        for position, (_number, job, batch, rows) in enumerate(work):
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
            except StoreUnavailable as exc:
                self.down = exc.message
                return [number for number, *_ in work[position:]]  # this job and the user's later ones wait
            except StoreError as exc:  # a known store fault says it all in one line
                self.failed += 1
                log.error("could not store %d memory operation(s): %s", len(job.operations), exc.message)
            except Exception:
                self.failed += 1
                log.exception("could not store %d memory operation(s)", len(job.operations))
        return []

    def remember(self, user: str, operations: Sequence[Operation], extraction: str = "inline") -> bool:
        """Queue operations to apply off the request path; False (counted in `dropped`, and logged) when the queue
        is full — as it fills while the store is down and the writer holds the writes it cannot make yet.
        `extraction` (inline or background) says how they were found, for the metrics."""
        if not operations:
            return True
        try:
            self.queue.put_nowait(Job(user, tuple(operations), extraction))
        except asyncio.QueueFull:
            self.dropped += 1
            metrics.queue_dropped("memories")
            log.warning("memory write queue is full%s: dropped %d operation(s) for a user (%d dropped so far)",
                        " (the store is down)" if self.down else "", len(operations), self.dropped)
            return False
        metrics.queue_depth("memories", self.queue.qsize())
        return True

    def start(self) -> None:
        self._worker = asyncio.create_task(self._work(), name="memory-writer")

    async def _work(self) -> None:
        """The writer: a batch of queued jobs at a time. While the store is down it holds the jobs it could not
        store and tries them again (backing off from RETRY_FIRST to RETRY_MAX seconds) before taking new ones, so
        they are stored in order once it is back; meanwhile new jobs wait in the bounded queue."""
        waiting: list[Job] = []
        pause = RETRY_FIRST
        while True:
            jobs = waiting or [await self.queue.get()]
            while not waiting and len(jobs) < WRITE_BATCH and not self.queue.empty():
                jobs.append(self.queue.get_nowait())
            metrics.queue_depth("memories", self.queue.qsize())
            try:
                waiting = await self.apply_all(jobs)
            finally:
                for _ in range(len(jobs) - len(waiting)):
                    self.queue.task_done()
            self.waiting = len(waiting)
            if not waiting:
                if self.down:
                    log.warning("the memory store is back: the memory writes that waited are stored")
                self.down, pause = "", RETRY_FIRST
                continue
            if pause == RETRY_FIRST:
                log.error("the memory store is down: %d memory write(s) wait to be retried (%s)", len(waiting),
                          self.down)
            await asyncio.sleep(pause)
            pause = min(pause * 2, RETRY_MAX)

    async def drain(self, seconds: float = 10.0) -> None:
        """Wait until every queued write is stored (shutdown, tests)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.queue.join()

    async def stop(self) -> None:
        """Store what is queued, then stop the writer. The store and embedder stay open for their owner."""
        await self.drain()
        unstored = self.waiting + self.queue.qsize()
        if unstored:
            log.error("stopping with %d memory write(s) not stored: the store was still down", unstored)
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker


def cleaning_for(settings: Settings) -> Cleaning:
    return Cleaning(settings.memory_max_chars, settings.contact_info, settings.phone_region)


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
                            cleaning=cleaning_for(settings), fusion=Fusion(lexical_weight=settings.lexical_weight),
                            profile_max=settings.profile_max, profile_max_chars=settings.profile_max_chars)
        memories.start()
        stack.push_async_callback(memories.stop)
        yield memories
