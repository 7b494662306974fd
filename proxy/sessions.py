"""Conversation memory on the request path: the sessions the proxy keeps, the context that fits, past conversations.

    turn   = begin(request, body, user)     the session named by X-Memory-Session (else metadata.session_id)
    body   = prepend(turn, body)            prepend mode: the stored turns go in front of the client's new ones
    body   = fit(turn, body)                the window / the model's token budget; the rolling summary where
                                            turns were left out
    record(turn, answer)                    once the answer is out: queued for proxy/upkeep.py, which stores it,
                                            chunks it for recall and folds older turns into the summary

A session fault never breaks a chat: the request goes on with what could be had. A client that sends its next
message the moment it has its answer finds the previous turn stored: `prepend` waits for this process's pending
write of the same session. (With several workers a turn may land on another process first; the README says so.)
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.requests import Request

from proxy import context
from proxy.context import TokenCounter, budget_for, message_texts
from proxy.errors import BadRequest
from proxy.models import MAX_USER_ID, check_name
from proxy.store.sessions import ChunkHit, SessionStore, open_session_store
from proxy.upkeep import Job, Upkeep
from proxy.upstream import RawHeaders, Upstream, credentials

if TYPE_CHECKING:
    from proxy.config import Settings
    from proxy.embed import Embedder
    from proxy.memories import Memories

log = logging.getLogger("memory_proxy.sessions")
SESSION_HEADER = "x-memory-session"
WRITE_WAIT = 2.0  # seconds `prepend` waits for the previous turn of the session to be stored
RECALL_K = 2
INLINE_CHARS = 2000  # more uncounted text than this (~0.5 ms to count) is counted in a thread


def session_id(request: Request, body: dict[str, Any]) -> str | None:
    """The session named by the header (ours: 400 when malformed), else by the body's `metadata.session_id`
    (the upstream's field: never refused, see `session_key`)."""
    value = request.headers.get(SESSION_HEADER)
    if value is not None:
        return check_session(value, "X-Memory-Session")
    metadata = body.get("metadata")
    return session_key(metadata.get("session_id") if isinstance(metadata, dict) else None)


def session_key(value: Any) -> str | None:
    """The session a field of the upstream's API names (`metadata.session_id`, `conversation`,
    `previous_response_id`): the value when it is a valid session id; for a string that is not (over 256
    characters, control characters), `sha256:` and its digest, so that the same value names the same session;
    None for "" or a value that is not a string. The upstream judges its own fields: none is refused here."""
    if not isinstance(value, str) or not value:
        return None
    if check_name(value, "session id") is None:
        return value
    return "sha256:" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()


def check_session(value: Any, param: str) -> str:
    if not isinstance(value, str) or check_name(value, "session id"):
        raise BadRequest(f"the session id must be a string of 1 to {MAX_USER_ID} characters without control "
                         "characters", param=param, code="invalid_session")
    return value


@dataclass(slots=True)
class Turn:
    user: str
    session: str
    messages: list[Any]  # as the client sent them
    credentials: RawHeaders  # for the summary call, made as this client
    summary: str = ""
    summary_tokens: int = 0
    prepended: bool = False  # the summarised turns were left out, so the summary must go in
    known: dict[int, tuple[Any, int]] = field(default_factory=dict)  # id(message) → (message, tokens) stored

    @property
    def key(self) -> tuple[str, str]:
        return self.user, self.session


class Sessions:
    def __init__(self, settings: Settings, store: SessionStore | None, embedder: Embedder, upstream: Upstream,
                 counter: TokenCounter) -> None:
        self.store = store
        self.embedder = embedder
        self.counter = counter
        self.mode = settings.session_history if store is not None else "off"
        self.max_messages = settings.session_max_messages
        self.window = settings.context_window or None
        self.budgets = context.parse_budgets(settings.context_budgets)
        self.recall_conversations = settings.recall_conversations
        self.min_score = settings.conversation_min_similarity
        self.recall_budget = settings.recall_budget_ms / 1000
        self.upkeep = None if store is None else Upkeep(settings, store, embedder, upstream, counter)
        if store is None and settings.session_history != "off":
            log.warning("session_history is %s, but this memory store keeps no sessions", settings.session_history)

    # --- the request path ---------------------------------------------------------------------------------------

    def begin(self, request: Request, body: dict[str, Any], user: str, *, name: str | None = None,
              messages: list[Any] | None = None) -> Turn | None:
        """The turn of the session the request names, or None when sessions are off or none is named. The
        Responses API gives the `name` (proxy/chains.py; "" until the response's id names it) and its input as
        chat `messages`."""
        if self.upkeep is not None:
            self.upkeep.last_chat = time.monotonic()  # background embedding waits for a quiet moment
        name = None if self.mode == "off" else session_id(request, body) if name is None else name
        if name is None:
            return None
        return Turn(user, name, body["messages"] if messages is None else messages, credentials(request.headers.raw))

    async def prepend(self, turn: Turn | None, body: dict[str, Any]) -> dict[str, Any]:
        """Prepend mode: the session's stored messages (those the summary does not cover) after the client's
        leading system messages."""
        if turn is None or self.mode != "prepend" or self.store is None or self.upkeep is None:
            return body
        await self.upkeep.written(turn.key, WRITE_WAIT)
        try:
            session, history = await self.store.history(turn.user, turn.session, limit=self.max_messages)
        except Exception:
            log.exception("could not read a session: answering without its history")
            return body
        if session is None:
            return body
        turn.summary, turn.summary_tokens, turn.prepended = session.summary, session.summary_tokens, True
        turn.known = {id(m.message): (m.message, m.tokens) for m in history}
        messages = body["messages"]
        lead = next((i for i, message in enumerate(messages) if not context.is_system(message)), len(messages))
        return {**body, "messages": [*messages[:lead], *(m.message for m in history), *messages[lead:]]}

    async def fit(self, turn: Turn | None, body: dict[str, Any]) -> dict[str, Any]:
        """The body trimmed to the window and the model's budget, with the summary where turns were left out;
        `body` itself when nothing changes."""
        budget = budget_for(self.budgets, body.get("model"))
        summary = turn is not None and turn.prepended and bool(turn.summary)
        if budget is None and self.window is None and not summary:
            return body
        messages = body["messages"]
        tokens = await self.count(messages, turn, budget) if budget is not None else None
        limits: dict[str, Any] = {"window": self.window, "budget": budget}
        kept, dropped = context.fit(messages, tokens, **limits, summary=turn.summary if turn else "",
                                    summary_tokens=turn.summary_tokens if turn else 0, always_summary=summary)
        if dropped and turn is not None and not turn.prepended and self.store is not None:
            # Store mode: the client sent the whole conversation; the session's summary stands for the cut turns.
            try:
                session = await self.store.get(turn.user, turn.session)
            except Exception:
                log.exception("could not read a session's summary: going on without")
                session = None
            if session is not None and session.summary:
                kept, dropped = context.fit(messages, tokens, **limits, summary=session.summary,
                                            summary_tokens=session.summary_tokens)
        if len(kept) == len(messages) and all(a is b for a, b in zip(kept, messages, strict=True)):
            return body
        log.debug("left %d of %d messages out to fit the context", dropped, len(messages))
        return {**body, "messages": kept}

    async def count(self, messages: Sequence[Any], turn: Turn | None, budget: int | None = None) -> list[int]:
        """Tokens of each message (stored ones as stored); past `budget`, counting stops (TokenCounter.messages)."""
        known = turn.known if turn is not None else {}
        unknown = [message for message in messages if id(message) not in known]
        size = sum(len(text) for message in unknown for text in message_texts(message)[0])
        counted = iter(await asyncio.to_thread(self.counter.messages, unknown, budget) if size > INLINE_CHARS
                       else self.counter.messages(unknown, budget))
        return [known[id(message)][1] if id(message) in known else next(counted) for message in messages]

    async def recall(self, user: str, turn: Turn | None, text: str) -> list[str]:
        """Excerpts of the user's other conversations that match the question (recall_conversations)."""
        if not self.recall_conversations or self.store is None or not text.strip():
            return []
        try:
            async with asyncio.timeout(self.recall_budget):
                vector = await self.embedder.embed_one(text)  # just embedded for the memories: from the cache
                hits = await self.store.search_chunks(user, vector, RECALL_K, self.min_score,
                                                      exclude_session=turn.session if turn else None)
        except TimeoutError:
            log.warning("conversation recall took longer than %.0f ms: going on without", self.recall_budget * 1000)
            return []
        except Exception:
            log.exception("conversation recall failed: going on without")
            return []
        return [hit.chunk.text for hit in hits]

    def record(self, turn: Turn | None, answer: bytes) -> None:
        """Queue the turn (the client's new messages and the answer it saw) to be stored off the request path."""
        if turn is not None and turn.session and self.upkeep is not None:
            self.upkeep.put(Job(turn.user, turn.session, turn.messages, answer, turn.credentials, asyncio.Event()))

    # --- the management API ---------------------------------------------------------------------------------------

    async def search(self, user: str, text: str, k: int) -> list[ChunkHit]:
        if self.store is None:
            return []
        return await self.store.search_chunks(user, await self.embedder.embed_one(text), k)

    async def settled(self, user: str, session: str | None = None) -> None:
        """Wait (a little) for this process's queued turns of the user (or one session) to be stored, so that an
        erase is not followed by a turn queued before it."""
        if self.upkeep is None:
            return
        for key in [key for key in self.upkeep.unwritten if key[0] == user and session in (None, key[1])]:
            await self.upkeep.written(key, WRITE_WAIT)

    async def erase(self, user: str) -> int:
        if self.store is None:
            return 0
        await self.settled(user)
        return await self.store.erase(user)

    async def delete(self, user: str, session: str) -> bool:
        if self.store is None:
            return False
        await self.settled(user, session)
        return await self.store.delete(user, session)


@asynccontextmanager
async def open_sessions(settings: Settings, memories: Memories, upstream: Upstream) -> AsyncIterator[Sessions]:
    """The session service on the memory store's engine; turns queued at shutdown are stored before it ends."""
    counter = await asyncio.to_thread(TokenCounter)
    store = await open_session_store(memories.store)
    sessions = Sessions(settings, store, memories.embedder, upstream, counter)
    if sessions.upkeep is None:
        yield sessions
        return
    sessions.upkeep.start()
    try:
        yield sessions
    finally:
        await sessions.upkeep.stop()
