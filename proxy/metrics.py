"""Prometheus metrics: the registry, the metric families, the few helpers that record into them, and
`GET /metrics`.

With one process the values live in its memory. With `serve --workers N`, `serve` points PROMETHEUS_MULTIPROC_DIR
at a private temporary directory (created before the workers start, removed when serve ends): prometheus_client
then keeps each worker's values in memory-mapped files there, and a scrape answered by any worker merges the
files of all of them (its multiprocess mode). Counters and histograms of a worker that died still count; the
write-queue gauges count live workers only (`livesum`).

Every family is named `memory_proxy_*`; units are in the names (`_seconds`), counters end in `_total`. Labels
take a small, fixed set of values, never a user id or anything a client chooses.
"""

from __future__ import annotations

import asyncio
import glob
import hmac
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from starlette.requests import Request
from starlette.responses import Response

from proxy.errors import Unauthorized

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
REGISTRY = CollectorRegistry()
if MULTIPROC_ENV not in os.environ:
    ProcessCollector(registry=REGISTRY)  # process_* (CPU, RSS, open files): one process only, they do not add up

# The proxy adds ~0.5 ms to a pass-through and ~5-15 ms to the memory path (README, Speed).
LATENCY_BUCKETS = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1.0, 2.5)

REQUESTS = Counter(
    "memory_proxy_requests", "HTTP requests answered, by route template, method and status.",
    ["route", "method", "status"], registry=REGISTRY)
ADDED_LATENCY = Histogram(
    "memory_proxy_added_latency_seconds",
    "Time the proxy added before the first byte of a /v1 answer: from the request's arrival to the first body "
    "byte sent, less the time spent waiting on the upstream. path: passthrough (other /v1 calls), chat (chat "
    "or Responses API call without memory), memory (the memory path); stream: whether the answer was an event stream.",
    ["path", "stream"], buckets=LATENCY_BUCKETS, registry=REGISTRY)
RECALL_LATENCY = Histogram(
    "memory_proxy_recall_duration_seconds", "Time to recall a user's memories (embed the question, search); "
    "a recall cut off by recall_budget_ms counts with the time it had.", buckets=LATENCY_BUCKETS, registry=REGISTRY)
INJECTED = Histogram(
    "memory_proxy_memories_injected", "Memories injected into one chat request on the memory path.",
    buckets=(0, 1, 2, 3, 4, 5, 8, 13, 21), registry=REGISTRY)
FAIL_OPEN = Counter(
    "memory_proxy_fail_open", "Chats answered without memory after a memory fault, by reason (the "
    "x-memory-error value: recall-timeout is a recall over recall_budget_ms).", ["reason"], registry=REGISTRY)
MEMORY_OPERATIONS = Counter(
    "memory_proxy_memory_operations", "Memory operations from chats, by outcome (added, updated, forgotten, "
    "refused: looked like a secret) and extraction mode (inline, background).", ["operation", "extraction"],
    registry=REGISTRY)
BLOCKS_UNPARSEABLE = Counter(
    "memory_proxy_blocks_unparseable", "Memory blocks that could not be read, by extraction mode.",
    ["extraction"], registry=REGISTRY)
EXTRACTION_CALLS = Counter(
    "memory_proxy_extraction_calls", "Background extraction calls to the upstream, by outcome (ok, error).",
    ["outcome"], registry=REGISTRY)
EXTRACTION_TOKENS = Counter(
    "memory_proxy_extraction_tokens", "Tokens of background extraction calls as the upstream counted them, by "
    "kind (prompt, completion).", ["kind"], registry=REGISTRY)
QUEUE_DEPTH = Gauge(
    "memory_proxy_write_queue_depth", "Writes waiting off the request path, by queue (memories, sessions); the "
    "sum over live workers.", ["queue"], multiprocess_mode="livesum", registry=REGISTRY)
QUEUE_DROPPED = Counter(
    "memory_proxy_write_queue_dropped", "Writes dropped because their queue was full, by queue.", ["queue"],
    registry=REGISTRY)
STORE_ERRORS = Counter(
    "memory_proxy_store_errors", "Faults of the memory store (locked, full, unreachable, ...), by engine.",
    ["engine"], registry=REGISTRY)
UPSTREAM_ERRORS = Counter(
    "memory_proxy_upstream_errors", "Failed upstream calls, by kind: connect_error, connect_timeout, read_timeout, "
    "write_timeout, pool_timeout, protocol_error, network_error, broken_off (the answer stopped midway), "
    "http_429, http_5xx (the upstream answered so).", ["kind"], registry=REGISTRY)
EMBED_LATENCY = Histogram(
    "memory_proxy_embedding_duration_seconds", "Time of one embedding model batch (tokenise, run, pool).",
    buckets=LATENCY_BUCKETS, registry=REGISTRY)
EMBED_BATCH = Histogram(
    "memory_proxy_embedding_batch_size", "Texts embedded in one model batch.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=REGISTRY)
SESSION_TURNS = Counter(
    "memory_proxy_session_turns_recorded", "Conversation turns stored in sessions.", registry=REGISTRY)


_children: dict[tuple[Any, ...], Any] = {}


def _child(metric: Any, *labels: str) -> Any:
    """`metric.labels(*labels)`, kept: the lookup costs more than the increment (every label set is small)."""
    key = (metric, *labels)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*labels)
    return child


def request_answered(route: str, method: str, status: int) -> None:
    _child(REQUESTS, route, method, str(status)).inc()


def added_latency(path: str, stream: bool, seconds: float) -> None:
    _child(ADDED_LATENCY, path, "true" if stream else "false").observe(max(seconds, 0.0))


def recalled(seconds: float) -> None:
    RECALL_LATENCY.observe(seconds)


def injected(count: int) -> None:
    INJECTED.observe(count)


def failed_open(reason: str) -> None:
    _child(FAIL_OPEN, reason).inc()


def memory_operation(operation: str, extraction: str, count: int = 1) -> None:
    """`operation`: added, updated, forgotten or refused; `extraction`: inline or background."""
    if count:
        _child(MEMORY_OPERATIONS, operation, extraction).inc(count)


def block_unparseable(extraction: str) -> None:
    _child(BLOCKS_UNPARSEABLE, extraction).inc()


def extraction_call(ok: bool, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
    """One background extraction call and the tokens the upstream's `usage` reported for it."""
    _child(EXTRACTION_CALLS, "ok" if ok else "error").inc()
    if prompt_tokens:
        _child(EXTRACTION_TOKENS, "prompt").inc(prompt_tokens)
    if completion_tokens:
        _child(EXTRACTION_TOKENS, "completion").inc(completion_tokens)


def queue_depth(queue: str, depth: int) -> None:
    _child(QUEUE_DEPTH, queue).set(depth)


def queue_dropped(queue: str) -> None:
    _child(QUEUE_DROPPED, queue).inc()


def store_error(engine: str) -> None:
    _child(STORE_ERRORS, engine).inc()


def upstream_error(kind: str) -> None:
    _child(UPSTREAM_ERRORS, kind).inc()


def embedded(seconds: float, texts: int) -> None:
    EMBED_LATENCY.observe(seconds)
    EMBED_BATCH.observe(texts)


def session_turn() -> None:
    SESSION_TURNS.inc()


# --- several workers ------------------------------------------------------------------------------------------

@contextmanager
def multiprocess_directory() -> Iterator[str]:
    """For `serve --workers N`: a private directory (mode 0700) for the workers' metric files, named in
    PROMETHEUS_MULTIPROC_DIR for the workers started inside the block; removed, and the variable restored, after.
    Workers must be started after this (prometheus_client picks its mode when it is imported)."""
    directory = tempfile.mkdtemp(prefix="memory-proxy-metrics-")
    previous = os.environ.get(MULTIPROC_ENV)
    os.environ[MULTIPROC_ENV] = directory
    try:
        yield directory
    finally:
        if previous is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = previous
        shutil.rmtree(directory, ignore_errors=True)


def worker_stopped(pid: int | None = None) -> None:
    """Take a stopping worker's live gauges out of the sums (its counters and histograms stay)."""
    directory = os.environ.get(MULTIPROC_ENV)
    if directory:
        mark_process_dead(os.getpid() if pid is None else pid, directory)  # type: ignore[no-untyped-call]


def forget_dead_workers(directory: str) -> None:
    """Live gauges of workers that died without stopping (killed): uvicorn starts a new worker in their place."""
    for path in glob.glob(os.path.join(directory, "gauge_live*_*.db")):
        pid = Path(path).stem.rpartition("_")[2]
        if pid.isdigit() and not _alive(int(pid)):
            mark_process_dead(int(pid), directory)  # type: ignore[no-untyped-call]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- GET /metrics ---------------------------------------------------------------------------------------------

def exposition(accept: str = "") -> tuple[bytes, str]:
    """The metrics in the format the `Accept` header asks for (Prometheus text 0.0.4 by default, OpenMetrics when
    asked) and its content type; merged across workers in multiprocess mode."""
    encoder, content_type = choose_encoder(accept)
    directory = os.environ.get(MULTIPROC_ENV)
    if not directory:
        return encoder(REGISTRY), content_type
    forget_dead_workers(directory)
    merged = CollectorRegistry()
    MultiProcessCollector(merged, directory)  # type: ignore[no-untyped-call]
    return encoder(merged), content_type


def check_access(request: Request) -> None:
    """/metrics is guarded like the management API: open when nothing is configured (or `metrics_open`), else it
    takes the admin token or the metrics token. A proxy key is not enough: the figures cover every tenant."""
    settings = request.app.state.settings
    tokens = [token for token in (settings.admin_token, settings.metrics_token) if token]
    if settings.metrics_open or (not tokens and request.app.state.gate.open):
        return
    scheme, _, sent = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and any(hmac.compare_digest(sent.strip().encode(), token.encode())
                                          for token in tokens):
        return
    raise Unauthorized("/metrics needs the admin token or the metrics token (Authorization: Bearer <token>); "
                       "set metrics_token for a scraper, or metrics_open")


async def metrics_endpoint(request: Request) -> Response:
    """GET /metrics: the Prometheus exposition, rendered in a thread (multiprocess mode reads files)."""
    check_access(request)
    body, content_type = await asyncio.to_thread(exposition, request.headers.get("accept", ""))
    return Response(body, headers={"content-type": content_type})
