"""GET /metrics through a real proxy (real model, real SQLite) and a fake upstream: each family moves when what it
counts happens, and only then. The registry is per process, so every check compares a scrape before and after.
(`serve --workers 2`, where the counts of the workers add up: tests/test_serve.py.)"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy import metrics
from proxy.config import Settings
from proxy.store.sqlite import SqliteStore, db
from tests.fakeupstream import FakeUpstream, Reply

Upstream = tuple[FakeUpstream, str]
ALICE = {"X-Memory-User": "alice"}



@pytest.fixture
def proxy(patient_proxy: str) -> str:
    return patient_proxy

def block(*items: str) -> str:
    return "\n<memory>\n[" + ", ".join(items) + "]\n</memory>"


class Scrape:
    """One scrape of /metrics, parsed with prometheus_client's own parser."""

    def __init__(self, text: str) -> None:
        self.samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                        for family in text_string_to_metric_families(text) for s in family.samples}

    def __call__(self, name: str, **labels: str) -> float:
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)


def grew(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    """How much a sample grew from one scrape to the next."""
    return after(name, **labels) - before(name, **labels)


def scrape(proxy: str, **headers: str) -> Scrape:
    response = httpx.get(proxy + "/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return Scrape(response.text)


def chat(proxy: str, text: str = "Where should I eat tonight?", *, headers: dict[str, str] | None = None,
         **body: Any) -> httpx.Response:
    return httpx.post(proxy + "/v1/chat/completions", headers=headers if headers is not None else ALICE,
                      json={"model": "m", "messages": [{"role": "user", "content": text}], **body}, timeout=30)


def settle(proxy: str, condition: Callable[[Scrape], bool]) -> Scrape:
    """Scrape until `condition` holds (writes land off the request path), at most 10 s."""
    deadline = time.monotonic() + 10
    while True:
        now = scrape(proxy)
        if condition(now) or time.monotonic() > deadline:
            return now
        time.sleep(0.02)


@pytest.fixture
def unused_port() -> int:
    """A port of 127.0.0.1 nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def sample(name: str, **labels: str) -> float:
    """A value of this process's registry (the proxies these tests start run in it)."""
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def test_requests_by_route_method_and_status(proxy: str) -> None:
    before = scrape(proxy)
    for _ in range(3):
        assert httpx.get(proxy + "/v1/models").status_code == 200
    assert httpx.get(proxy + "/nowhere").status_code == 404
    assert httpx.request("PROPFIND", proxy + "/v1/models").status_code == 405  # a method of the client's own
    after = scrape(proxy)
    route = {"route": "/v1/{path:path}", "method": "GET", "status": "200"}
    assert grew(before, after, "memory_proxy_requests_total", **route) == 3
    unmatched = {"route": "unmatched", "method": "GET", "status": "404"}
    assert grew(before, after, "memory_proxy_requests_total", **unmatched) == 1
    other = {"route": "/v1/{path:path}", "method": "other", "status": "405"}
    assert grew(before, after, "memory_proxy_requests_total", **other) == 1
    assert not any(dict(labels).get("method") == "PROPFIND" for _, labels in after.samples)


def test_added_latency_by_path_kind(proxy: str, upstream: Upstream) -> None:
    fake = upstream[0]
    before = scrape(proxy)
    httpx.get(proxy + "/v1/models")
    fake.reply("Hi.", "Hi.", "Hi.")
    chat(proxy, headers={})  # no user: forwarded as it came
    chat(proxy)
    chat(proxy, stream=True)
    after = scrape(proxy)
    for path, stream in (("passthrough", "false"), ("chat", "false"), ("memory", "false"), ("memory", "true")):
        assert grew(before, after, "memory_proxy_added_latency_seconds_count", path=path, stream=stream) == 1
        assert 0 < grew(before, after, "memory_proxy_added_latency_seconds_sum", path=path, stream=stream) < 5


def test_the_upstreams_time_is_not_counted_as_added(proxy: str, upstream: Upstream) -> None:
    """The fake takes 0.4 s to its first byte, then 0.2 s between chunks: the added latency stays far below."""
    fake = upstream[0]
    before = scrape(proxy)
    fake.reply(Reply("Slowly but surely.", chunk_size=6, wait=0.4, delay=0.2),
               Reply("Slowly but surely.", wait=0.4))
    started = time.perf_counter()
    chat(proxy, stream=True)
    chat(proxy)
    assert time.perf_counter() - started > 1
    after = scrape(proxy)
    for stream in ("true", "false"):
        assert 0 < grew(before, after, "memory_proxy_added_latency_seconds_sum", path="memory", stream=stream) < 0.2


def test_recall_injected_and_memory_operations(proxy: str, upstream: Upstream) -> None:
    fake = upstream[0]
    before = scrape(proxy)
    fake.reply("Noted." + block('"User is vegetarian"', '"User lives in Lisbon"'))
    chat(proxy, "I'm a vegetarian living in Lisbon.", headers={"X-Memory-User": "ops"})
    added = {"operation": "added", "extraction": "inline"}
    now = settle(proxy, lambda s: grew(before, s, "memory_proxy_memory_operations_total", **added) == 2)
    assert grew(before, now, "memory_proxy_memory_operations_total", **added) == 2
    fake.reply("Porto then." + block('{"text": "User lives in Porto", "replaces": "m2"}', '{"forget": "m1"}',
                                     '"my password is hunter2-hunter2"'))
    response = chat(proxy, "I moved from Lisbon to Porto and I'm no longer a vegetarian. Where do I live?",
                    headers={"X-Memory-User": "ops"})
    assert response.headers["x-memory-recalled"] == "2"
    done = {"operation": "updated", "extraction": "inline"}
    after = settle(proxy, lambda s: grew(before, s, "memory_proxy_memory_operations_total", **done) > 0)
    for operation, count in (("added", 2), ("updated", 1), ("forgotten", 1), ("refused", 1)):
        assert grew(before, after, "memory_proxy_memory_operations_total", operation=operation,
                    extraction="inline") == count, operation
    assert grew(before, after, "memory_proxy_memories_injected_count") == 2
    assert grew(before, after, "memory_proxy_memories_injected_sum") == 2
    assert grew(before, after, "memory_proxy_recall_duration_seconds_count") == 2
    assert grew(before, after, "memory_proxy_embedding_duration_seconds_count") > 0
    assert grew(before, after, "memory_proxy_embedding_batch_size_sum") > 0


def test_unparseable_blocks_are_counted(proxy: str, upstream: Upstream) -> None:
    fake = upstream[0]
    before = scrape(proxy)
    fake.reply('Sure.\n<memory>[{"text": "this is no JSON at all", </memory>')  # brackets never closed
    assert chat(proxy).json()["choices"][0]["message"]["content"] == "Sure."
    after = settle(proxy, lambda s: grew(before, s, "memory_proxy_blocks_unparseable_total", extraction="inline") > 0)
    assert grew(before, after, "memory_proxy_blocks_unparseable_total", extraction="inline") == 1


def test_recall_over_its_budget_is_a_fail_open(upstream: Upstream, settings_for: Callable[..., Settings],
                                               start_proxy: Callable[..., str]) -> None:
    fake, url = upstream
    proxy = start_proxy(settings_for(url, recall_budget_ms=0.001))
    before = scrape(proxy)
    fake.reply("Hi.")
    response = chat(proxy, "A question nobody asked before: how tall is a giraffe?")
    assert response.status_code == 200 and response.headers["x-memory-error"] == "recall-timeout"
    after = scrape(proxy)
    assert grew(before, after, "memory_proxy_fail_open_total", reason="recall-timeout") == 1
    assert grew(before, after, "memory_proxy_recall_duration_seconds_count") == 1


def test_upstream_errors_by_kind(proxy: str, upstream: Upstream, settings_for: Callable[..., Settings],
                                 start_proxy: Callable[..., str], unused_port: int) -> None:
    fake = upstream[0]
    before = scrape(proxy)
    fake.reply(Reply(status=503, error={"message": "overloaded"}), Reply(status=429, error={"message": "slow down"}),
               Reply("A long answer, cut off midway.", chunk_size=2, drop_after=3))
    assert chat(proxy).status_code == 503
    assert chat(proxy).status_code == 429
    with pytest.raises(httpx.HTTPError):
        httpx.post(proxy + "/v1/chat/completions", headers={}, timeout=30,
                   json={"model": "m", "stream": True, "messages": [{"role": "user", "content": "Go on"}]}).read()
    down = start_proxy(settings_for(f"http://127.0.0.1:{unused_port}/v1"))
    assert httpx.get(down + "/v1/models").status_code == 502
    after = scrape(proxy)  # one registry per process: the second proxy's count shows here too
    for kind in ("http_5xx", "http_429", "broken_off", "connect_error"):
        assert grew(before, after, "memory_proxy_upstream_errors_total", kind=kind) == 1, kind


def test_store_errors_are_counted(upstream: Upstream, settings_for: Callable[..., Settings],
                                  start_proxy: Callable[..., str], tmp_path: Path) -> None:
    path = tmp_path / "memory.db"
    store = asyncio.run(SqliteStore.open(str(path), dimension=384, dedupe_similarity=0.9, busy_timeout=0.2))
    try:
        proxy = start_proxy(settings_for(upstream[1]), store=store)
        before = scrape(proxy)
        other = db.connect(str(path), isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")  # another writer holds the lock past the busy timeout
            assert httpx.post(proxy + "/memories/alice", json={"text": "User has a cat"}).status_code == 503
        finally:
            other.execute("ROLLBACK")
            other.close()
        after = scrape(proxy)
        assert grew(before, after, "memory_proxy_store_errors_total", engine="sqlite") == 1
    finally:
        asyncio.run(store.close())


def test_sessions_recorded_and_the_write_queue_gauges(upstream: Upstream, settings_for: Callable[..., Settings],
                                                      start_proxy: Callable[..., str]) -> None:
    fake, url = upstream
    proxy = start_proxy(settings_for(url, session_history="store"))
    before = scrape(proxy)
    fake.reply("One." + block('"User likes trains"'), "Two.")
    for text in ("First turn", "Second turn"):
        chat(proxy, text, headers={**ALICE, "X-Memory-Session": "s1"})
    after = settle(proxy, lambda s: grew(before, s, "memory_proxy_session_turns_recorded_total") == 2)
    assert grew(before, after, "memory_proxy_session_turns_recorded_total") == 2
    for queue in ("memories", "sessions"):
        assert ("memory_proxy_write_queue_depth", (("queue", queue),)) in after.samples
        assert after("memory_proxy_write_queue_depth", queue=queue) == 0  # drained


async def test_a_full_write_queue_counts_its_drops() -> None:
    from proxy.embed import HashEmbedder
    from proxy.memories import Memories
    from proxy.models import NewMemory
    from proxy.store import open_store

    store = await open_store(":memory:", dimension=64)
    memories = Memories(store, HashEmbedder(64), queue_size=2)  # the writer is not started: nothing drains
    try:
        before = sample("memory_proxy_write_queue_dropped_total", queue="memories")
        for n in range(3):
            memories.remember("u", [NewMemory(f"fact {n}")])
        assert sample("memory_proxy_write_queue_depth", queue="memories") == 2
        assert sample("memory_proxy_write_queue_dropped_total", queue="memories") - before == 1
    finally:
        await store.close()


def test_extraction_calls_and_their_tokens() -> None:
    """The helper background extraction records with (its calls land with that mode)."""
    def values() -> list[float]:
        return [sample("memory_proxy_extraction_calls_total", outcome="ok"),
                sample("memory_proxy_extraction_calls_total", outcome="error"),
                sample("memory_proxy_extraction_tokens_total", kind="prompt"),
                sample("memory_proxy_extraction_tokens_total", kind="completion")]

    before = values()
    metrics.extraction_call(True, prompt_tokens=120, completion_tokens=30)
    metrics.extraction_call(False)
    assert [after - was for after, was in zip(values(), before, strict=True)] == [1, 1, 120, 30]


def test_openmetrics_when_the_scraper_asks_for_it(proxy: str) -> None:
    response = httpx.get(proxy + "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")
    assert "memory_proxy_requests_total" in response.text


@pytest.mark.parametrize(("options", "credentials", "status"), [
    ({}, None, 200),  # nothing configured: open, like the management API
    ({"admin_token": "admin-token-0123456789"}, None, 401),
    ({"admin_token": "admin-token-0123456789"}, "Bearer admin-token-0123456789", 200),
    ({"admin_token": "admin-token-0123456789"}, "bearer admin-token-0123456789", 200),
    ({"admin_token": "admin-token-0123456789"}, "Bearer wrong-token-0123456789", 401),
    ({"admin_token": "admin-token-0123456789", "metrics_token": "scrape-token-0123"}, "Bearer scrape-token-0123", 200),
    ({"metrics_token": "scrape-token-0123"}, None, 401),
    ({"proxy_keys": "acme:acme-key-0123456789ab", "upstream_key": "sk-up"}, "Bearer acme-key-0123456789ab", 401),
    ({"admin_token": "admin-token-0123456789", "metrics_open": True}, None, 200),
])
def test_metrics_are_guarded_like_the_management_api(upstream: Upstream, settings_for: Callable[..., Settings],
                                                      start_proxy: Callable[..., str], options: dict[str, Any],
                                                      credentials: str | None, status: int) -> None:
    proxy = start_proxy(settings_for(upstream[1], **options))
    headers = {"Authorization": credentials} if credentials else {}
    response = httpx.get(proxy + "/metrics", headers=headers)
    assert response.status_code == status
    if status == 401:
        assert response.json()["error"]["type"] == "authentication_error"
        assert "memory_proxy" not in response.text


def test_the_readme_lists_every_metric_family() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    names = {metric.name + ("_total" if metric.type == "counter" else "") for metric in metrics.REGISTRY.collect()
             if metric.name.startswith("memory_proxy_")}
    assert len(names) == 16
    assert [name for name in sorted(names) if f"| `{name}` |" not in readme] == []


def test_background_extraction_counts_its_calls_tokens_and_operations(
        upstream: tuple[FakeUpstream, str], settings_for: Callable[..., Settings],
        start_proxy: Callable[..., str]) -> None:
    fake, url = upstream
    proxy = start_proxy(settings_for(url, extraction="background", extract_coalesce_seconds=0.05))
    before = scrape(proxy)
    fake.extraction_replies.append(Reply('{"memories": [{"text": "User keeps bees", "category": "fact", '
                                         '"replaces": null}]}'))
    fake.reply("Lovely.")
    assert chat(proxy, "I keep bees.").status_code == 200
    added = {"operation": "added", "extraction": "background"}
    after = settle(proxy, lambda now: grew(before, now, "memory_proxy_memory_operations_total", **added) >= 1)
    assert grew(before, after, "memory_proxy_memory_operations_total", **added) == 1
    assert grew(before, after, "memory_proxy_extraction_calls_total", outcome="ok") == 1
    assert grew(before, after, "memory_proxy_extraction_tokens_total", kind="prompt") == 321
