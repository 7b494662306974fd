"""Background extraction: a turn's facts learned by a separate call after its answer, the answer untouched.

    submit(exchange)   queued once the answer is out (bounded: past `extract_queue` waiting turns, dropped,
                       counted and logged)
    per user           turns that arrive within `extract_coalesce_seconds` of the first wait for each other and
                       go to one call; at most MAX_TURNS a call
    the call           the user's memories most related to the turns (short ids m1, m2...), the turns, the
                       versioned prompt of proxy/extract.py; `response_format` json_schema, or plain JSON where
                       the upstream refuses it (remembered per model); 429, 5xx and transport faults retried
                       with backoff (`Retry-After` honoured up to MAX_BACKOFF)
    the answer         parsed by the same parser as a block, resolved the same way (short ids, no feedback
                       loop, the store's dedupe), written through the same bounded write queue

A failure is logged and counted, never seen by a chat. Counts (calls, failures, tokens) are on `stats`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
import orjson

from proxy import extract, metrics
from proxy.egress import Egress
from proxy.errors import ProxyError
from proxy.rewrite import render_memories
from proxy.upstream import RawHeaders, Upstream, close_quietly, request_headers

if TYPE_CHECKING:
    from proxy.config import Settings
    from proxy.memories import Memories

log = logging.getLogger("memory_proxy.extraction")
MAX_TURNS = 8  # turns in one call at most
MAX_SAID = 4000  # characters of one turn's user text, and of its answer, shown to the extraction model
RELATED_K = 10
RELATED_MIN = 0.1
CALLS = 4  # extraction calls in flight at once
MAX_BACKOFF = 30.0


@dataclass(frozen=True, slots=True)
class Exchange:
    """One finished turn to learn from."""

    user: str  # the store's id (tenant namespace included)
    said: str  # the user's new messages this turn, joined
    answer: str  # the assistant's answer as the client got it
    model: str  # the chat's model
    credentials: RawHeaders  # the client's, for a call made on its behalf
    at: float = field(default_factory=time.time)  # when the turn ended (epoch seconds)


@dataclass
class Stats:
    calls: int = 0
    failed: int = 0
    dropped: int = 0
    retried: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    operations: int = 0


class Extractor:
    def __init__(self, settings: Settings, memories: Memories, upstream: Upstream, *, own_upstream: bool = False
                 ) -> None:
        self.memories = memories
        self.upstream = upstream
        self.own_upstream = own_upstream
        self.model = settings.extract_model
        self.key = settings.extract_key
        self.timeout = settings.extract_timeout
        self.window = settings.extract_coalesce_seconds
        self.capacity = settings.extract_queue
        self.retries = settings.extract_retries
        self.stats = Stats()
        self.no_schema: set[str] = set()  # models whose upstream refused response_format json_schema
        self.max_tokens = settings.extract_max_tokens
        self.completion_field: set[str] = set()  # models that refused max_tokens (OpenAI's reasoning models)
        self._waiting: dict[str, list[Exchange]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._slots = asyncio.Semaphore(CALLS)
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def waiting(self) -> int:
        return sum(map(len, self._waiting.values()))

    def submit(self, exchange: Exchange) -> bool:
        """Queue a turn; False (counted, logged) when `extract_queue` turns are waiting already."""
        if not exchange.said.strip():
            return True
        if self.waiting >= self.capacity:
            self.stats.dropped += 1
            log.warning("background extraction queue is full (%d turns): dropped a turn", self.capacity)
            return False
        self._waiting.setdefault(exchange.user, []).append(exchange)
        if exchange.user not in self._tasks:
            self._idle.clear()
            task = asyncio.create_task(self._run(exchange.user), name="memory-extraction")
            self._tasks[exchange.user] = task
        return True

    async def _run(self, user: str) -> None:
        try:
            while self._waiting.get(user):
                await asyncio.sleep(self.window)  # later turns of the user join this call
                turns = self._waiting[user][:MAX_TURNS]
                del self._waiting[user][:MAX_TURNS]
                async with self._slots:
                    await self.learn(user, turns)
        finally:
            self._waiting.pop(user, None)
            self._tasks.pop(user, None)
            if not self._tasks:
                self._idle.set()

    async def learn(self, user: str, turns: Sequence[Exchange]) -> None:
        """One extraction call for the user's turns; what it asks for goes to the write queue."""
        try:
            text = "\n".join(t.said for t in turns)
            hits = await self.memories.recall(user, text, k=RELATED_K, min_similarity=RELATED_MIN)
            shown, aliases = render_memories(hits, max_chars=4000)
            model = self.model or turns[-1].model
            reply = await self.call(model, turns, shown)
            shown_hits = [hit for hit in hits if hit.memory.id in aliases.values()]
            operations = extract.resolve(extract.parse(reply, extraction="background"), aliases, shown_hits,
                                         self.memories.max_chars, "background")
            self.stats.operations += len(operations)
            self.memories.remember(user, operations, extraction="background")
            log.debug("background extraction: %d turn(s), %d operation(s)", len(turns), len(operations))
        except Exception as exc:
            self.stats.failed += 1
            detail = exc.message if isinstance(exc, ProxyError) else str(exc) or type(exc).__name__
            log.warning("background extraction failed for %d turn(s): %s", len(turns), detail)

    async def call(self, model: str, turns: Sequence[Exchange], shown: str) -> str:
        """The extraction model's answer text, after retries; raises when there is none."""
        rows = [(time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t.at)), cut(t.said), cut(t.answer)) for t in turns]
        today = time.strftime("%Y-%m-%d", time.gmtime(turns[-1].at))
        # A separate extraction upstream never sees the client's credentials: only extract_key, if any.
        client = [] if self.own_upstream else turns[-1].credentials
        headers = request_headers(client, self.key or self.upstream.key)
        headers.append((b"content-type", b"application/json"))
        attempt = 0
        while True:
            schema = model not in self.no_schema
            field = "max_completion_tokens" if model in self.completion_field else "max_tokens"
            body = orjson.dumps(extract.extraction_request(model, rows, shown, today, json_schema=schema,
                                                           max_tokens=self.max_tokens, token_field=field))
            self.stats.calls += 1
            status, data, retry_after = await self.post(headers, body)
            usage = data.get("usage") if isinstance(data, dict) else None
            prompt, completion = tokens(usage)
            self.stats.prompt_tokens += prompt
            self.stats.completion_tokens += completion
            metrics.extraction_call(status == 200, prompt, completion)
            if status == 200:
                return answer_text(data)
            if self.max_tokens and field == "max_tokens" and refused_field(status, data, b"max_tokens"):
                self.completion_field.add(model)  # OpenAI's o-series: "Use 'max_completion_tokens' instead."
                log.info("the extraction model %r refused max_tokens: bounding it by max_completion_tokens", model)
                continue
            if schema and refused_schema(status, data):  # ask again without response_format, and remember
                self.no_schema.add(model)
                log.info("the extraction model %r refused response_format json_schema: asking for plain JSON", model)
                continue
            if (status == 429 or status >= 500 or status == 0) and attempt < self.retries:
                attempt += 1
                self.stats.retried += 1
                await asyncio.sleep(min(MAX_BACKOFF, retry_after if retry_after is not None else 0.5 * 2 ** attempt))
                continue
            raise RuntimeError(f"the extraction model answered {status or 'nothing'}")

    async def post(self, headers: RawHeaders, body: bytes) -> tuple[int, Any, float | None]:
        """(status, JSON body or None, Retry-After seconds); status 0 when the upstream could not be reached."""
        try:
            async with asyncio.timeout(self.timeout):
                response = await self.upstream.send("POST", "/chat/completions", b"", headers, body)
                try:
                    raw = await response.aread()
                finally:
                    await close_quietly(response)
        except (TimeoutError, ProxyError, httpx.HTTPError) as exc:
            log.debug("extraction call failed: %s", exc)
            return 0, None, None
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            data = None
        return response.status_code, data, retry_after(response.headers.get("retry-after"))

    async def drain(self, seconds: float = 10.0) -> None:
        """Wait until every queued turn has had its call (shutdown, tests)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._idle.wait()

    async def stop(self) -> None:
        await self.drain()
        for task in list(self._tasks.values()):
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)


def cut(text: str) -> str:
    """A turn's text for the prompt: at most MAX_SAID characters, the end kept (facts come late in long text)."""
    text = " ".join(text.split())
    return text if len(text) <= MAX_SAID else "…" + text[-MAX_SAID + 1:]


def tokens(usage: Any) -> tuple[int, int]:
    """(prompt, completion) tokens from a chat.completion's `usage`; zeros when it has none."""
    if not isinstance(usage, dict):
        return 0, 0
    try:
        return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    except (TypeError, ValueError):
        return 0, 0


def refused_field(status: int, data: Any, name: bytes) -> bool:
    """Whether a 400 names the request field `name` as the reason (in its `param` or its message)."""
    return status == 400 and isinstance(data, dict) and name in orjson.dumps(data.get("error"))


def refused_schema(status: int, data: Any) -> bool:
    """Whether the answer to a call sent with `response_format` json_schema refuses that option: a 400 (most
    likely it), or another error (not a 429) whose JSON body names it, in whatever shape the server gives it:
    llama-cpp-python's server (0.3.x) answers a json_schema it does not know with a 500 quoting its validation
    error on `response_format`, FastAPI's default is a 422 `{"detail": [{"loc": ["body", "response_format", ...]}]}`."""
    if status == 400:
        return True
    if status < 400 or status == 429 or not isinstance(data, dict | list):
        return False
    text = orjson.dumps(data)
    return b"response_format" in text or b"json_schema" in text


def answer_text(data: Any) -> str:
    """The first choice's text of a chat.completion; '' when there is none."""
    try:
        content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return ""
    return content if isinstance(content, str) else ""


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header given in seconds (RFC 9110 §10.2.3); None otherwise."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


@contextlib.asynccontextmanager
async def open_extractor(settings: Settings, memories: Memories, upstream: Upstream,
                         transport: httpx.AsyncBaseTransport | None = None,
                         environ: Mapping[str, str] | None = None) -> AsyncIterator[Extractor | None]:
    """The extractor the settings ask for (None when extraction is off), on the chat upstream or on
    `extract_upstream` (reached as `environ`'s proxy variables say); queued turns get their call before it
    closes."""
    if settings.extraction == "off":
        yield None
        return
    own = None
    if settings.extract_upstream:
        own = Upstream(dataclasses.replace(settings, upstream=settings.extract_upstream,
                                           upstream_key=settings.extract_key), transport,
                       egress=Egress.from_environ(environ or {}, settings.extract_upstream))
    extractor = Extractor(settings, memories, own or upstream, own_upstream=own is not None)
    try:
        yield extractor
    finally:
        await extractor.stop()
        if own is not None:
            await own.aclose()
