"""Sessions off the request path: turns stored, conversations chunked for recall, older turns folded into the
rolling summary, expired sessions purged.

    put(job)       a finished turn, queued (bounded; a full queue drops the turn, logged)
    write_turns    one at a time, in order: the client's new messages and the answer it saw are counted and
                   appended; a summary that has come due is started (an upstream call, many in flight at most
                   SUMMARY_CALLS)
    index_turns    chunks embedded when the chat path is quiet: the model runs one batch at a time, and a chunk
                   (~100 tokens) takes ~4x a question's time, so indexing right after each turn would delay the
                   next question's recall. It waits for QUIET seconds without a chat, but never more than
                   QUIET_WAIT at a time, so a busy proxy still indexes, INDEX_BATCH chunks a run.
    purge          expired sessions deleted every PURGE_EVERY seconds

All progress is kept in the store (chunked_through, summarized_through), so a turn whose follow-up was skipped
or lost to a restart is caught up with at the session's next turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from proxy import metrics, transcript
from proxy.context import TokenCounter, summary_message
from proxy.errors import StoreError
from proxy.store.sessions import NewMessage, Session, SessionStore
from proxy.upstream import RawHeaders, Upstream, close_quietly, request_headers

if TYPE_CHECKING:
    from proxy.config import Settings
    from proxy.embed import Embedder

log = logging.getLogger("memory_proxy.sessions")
SUMMARY_BATCH = 10  # summarise once this many messages past the verbatim ones have piled up, not every turn
SUMMARY_CALLS = 4
SUMMARY_PAUSE = 60.0  # seconds without summary calls after one failed
QUIET = 0.2
QUIET_WAIT = 2.0
QUIET_STEP = 0.05
INDEX_BATCH = 4
PURGE_EVERY = 300.0
Key = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Job:
    user: str
    session: str
    messages: list[Any]  # the client's, as sent
    answer: bytes  # the upstream's, as it came
    credentials: RawHeaders  # the summary call is made as this client
    done: asyncio.Event


class Upkeep:
    def __init__(self, settings: Settings, store: SessionStore, embedder: Embedder, upstream: Upstream,
                 counter: TokenCounter) -> None:
        self.store = store
        self.embedder = embedder
        self.upstream = upstream
        self.counter = counter
        self.prepend = settings.session_history == "prepend"
        self.max_messages = settings.session_max_messages
        self.ttl = settings.session_ttl_seconds or None
        self.summary_model = settings.summary_model
        self.keep = settings.summary_keep_messages
        self.queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=settings.write_queue)
        self.unwritten: dict[Key, asyncio.Event] = {}  # the latest queued turn of each session
        self.to_index: dict[Key, int] = {}  # sessions with turns to chunk → a count that changes with each turn
        self.pending = asyncio.Event()  # set while to_index holds a session
        self.indexed = asyncio.Event()  # set while it holds none
        self.indexed.set()
        self.summarising: dict[Key, asyncio.Task[None]] = {}
        self.summary_slots = asyncio.Semaphore(SUMMARY_CALLS)
        self.summaries_paused_until = 0.0
        self.last_chat = 0.0  # monotonic time of the last chat on the memory path
        self.stopping = False
        self.dropped = 0
        self.tasks: set[asyncio.Task[None]] = set()

    def put(self, job: Job) -> None:
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            self.dropped += 1
            metrics.queue_dropped("sessions")
            log.warning("session write queue is full: a turn was not stored")
            return
        metrics.queue_depth("sessions", self.queue.qsize())
        self.unwritten[job.user, job.session] = job.done

    async def written(self, key: Key, seconds: float) -> None:
        """Wait (at most `seconds`) until the queued turns of the session are stored."""
        pending = self.unwritten.get(key)
        if pending is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await pending.wait()

    def start(self) -> None:
        for work in (self.write_turns(), self.index_turns(), self.purge()):
            self.spawn(work)

    def spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def write_turns(self) -> None:
        while True:
            job = await self.queue.get()
            metrics.queue_depth("sessions", self.queue.qsize())
            key = (job.user, job.session)
            try:
                session = await self.write(job)
                if session is not None:
                    metrics.session_turn()
                if session is not None and (key in self.to_index or len(self.to_index) < self.queue.maxsize):
                    self.to_index[key] = self.to_index.get(key, 0) + 1  # else: caught up with at its next turn
                    self.indexed.clear()
                    self.pending.set()
                if session is not None and self.summary_due(session):
                    self.summarising[key] = self.spawn(self.summarise(session, job.credentials))
            except StoreError as exc:  # a known store fault (locked, read-only, full) says it all in one line
                log.error("could not store a session turn: %s", exc.message)
            except Exception:
                log.exception("could not store a session turn")
            finally:
                job.done.set()
                if self.unwritten.get(key) is job.done:
                    del self.unwritten[key]
                self.queue.task_done()

    async def write(self, job: Job) -> Session | None:
        everything = self.prepend or await self.store.get(job.user, job.session) is None
        messages, tokens = await asyncio.to_thread(self.turn_messages, job, everything)
        if not messages:
            return None
        stored = [NewMessage(message, count) for message, count in zip(messages, tokens, strict=True)]
        return await self.store.append(job.user, job.session, stored, max_messages=self.max_messages,
                                       ttl_seconds=self.ttl)

    def turn_messages(self, job: Job, everything: bool) -> tuple[list[dict[str, Any]], list[int]]:
        """In a thread (a long answer streamed is thousands of events): what the turn adds, and its tokens."""
        reply = transcript.answer(job.answer)
        messages = transcript.new_messages(job.messages, everything=everything) + ([reply] if reply else [])
        return messages, self.counter.messages(messages)

    async def index_turns(self) -> None:
        while True:
            if not self.to_index:
                self.pending.clear()
                self.indexed.set()
                await self.pending.wait()
            await self.quiet()
            key, turns = next(iter(self.to_index.items()))
            try:
                more = await self.index(*key)
            except StoreError as exc:
                log.error("could not index a conversation for recall: %s", exc.message)
                more = False
            except Exception:
                log.exception("could not index a conversation for recall")
                more = False
            if not more and self.to_index.get(key) == turns:  # no turn came in meanwhile
                del self.to_index[key]

    async def quiet(self) -> None:
        """Until the chat path has been quiet for QUIET seconds, but no longer than QUIET_WAIT."""
        for _ in range(round(QUIET_WAIT / QUIET_STEP)):
            if self.stopping or time.monotonic() - self.last_chat >= QUIET:
                return
            await asyncio.sleep(QUIET_STEP)

    async def index(self, user: str, name: str) -> bool:
        """Embed and store the session's next INDEX_BATCH chunks; True when more are left."""
        session = await self.store.get(user, name)
        if session is None or session.chunked_through >= session.last_seq:
            return False
        after = max(0, session.chunked_through - transcript.CHUNK_MESSAGES)
        _, messages = await self.store.history(user, name, after_seq=after)
        chunks = transcript.chunks(messages, session.chunked_through)[:INDEX_BATCH]
        if not chunks:
            return False
        vectors = await self.embedder.embed([chunk.text for chunk in chunks])
        await self.store.add_chunks(user, name, chunks, vectors, chunks[-1].last_seq)
        return chunks[-1].last_seq < session.last_seq

    def summary_due(self, session: Session) -> bool:
        """Enough messages older than the verbatim ones are unsummarised (never more than can be stored)."""
        folded = max(session.summarized_through, session.first_seq - 1)
        batch = min(SUMMARY_BATCH, self.max_messages - self.keep)
        return (bool(self.summary_model) and (session.user, session.id) not in self.summarising
                and session.last_seq - self.keep - folded >= batch and time.monotonic() >= self.summaries_paused_until)

    async def summarise(self, session: Session, credentials: RawHeaders) -> None:
        """Fold the messages older than the newest `keep` into the rolling summary, by an upstream call."""
        through = session.last_seq - self.keep
        try:
            async with self.summary_slots:
                _, messages = await self.store.history(session.user, session.id,
                                                       after_seq=max(session.summarized_through, session.first_seq - 1))
                request = transcript.summary_request(self.summary_model, session.summary,
                                                     [m.message for m in messages if m.seq <= through])
                headers = request_headers(credentials, self.upstream.key)
                headers.append((b"content-type", b"application/json"))
                response = await self.upstream.send("POST", "/chat/completions", b"", headers, orjson.dumps(request))
                try:
                    raw = await response.aread()
                finally:
                    await close_quietly(response)
                text = transcript.summary_text(raw) if response.status_code == 200 else ""
                if not text:
                    raise RuntimeError(f"the summary model answered {response.status_code} without a summary")
                tokens = self.counter.messages([summary_message(text)])[0]
                await self.store.set_summary(session.user, session.id, text, through, tokens)
        except Exception as exc:
            self.summaries_paused_until = time.monotonic() + SUMMARY_PAUSE
            log.warning("could not summarise a session (%s); summaries pause for %.0f s", exc, SUMMARY_PAUSE)
        finally:
            self.summarising.pop((session.user, session.id), None)

    async def purge(self) -> None:
        while True:
            try:
                purged = await self.store.purge_expired()
                if purged:
                    log.info("purged %d expired session(s)", purged)
            except StoreError as exc:
                log.error("could not purge expired sessions: %s", exc.message)
            except Exception:
                log.exception("could not purge expired sessions")
            await asyncio.sleep(PURGE_EVERY)

    async def drain(self, seconds: float = 10.0) -> None:
        """Wait until queued turns are stored and indexed and summaries in flight are in (shutdown, tests)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.queue.join()
                await self.indexed.wait()
                if self.summarising:
                    await asyncio.wait(list(self.summarising.values()))

    async def stop(self) -> None:
        self.stopping = True  # nothing waits for a quiet moment any more
        await self.drain()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
