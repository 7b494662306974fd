"""Logs through a real proxy: request ids, the user on every line of a request, what debug shows and what no level
shows without `log_content`, the access log, the start-up line, misspelt variables. (The same format in every
worker of `serve --workers 2`: tests/test_serve.py.)"""

from __future__ import annotations

import io
import logging
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import orjson
import pytest

from proxy import config, logs
from proxy.config import Settings
from proxy.logs import JsonFormatter, RequestFilter, TextFormatter
from tests.fakeupstream import FakeUpstream, Reply

Upstream = tuple[FakeUpstream, str]
FACT = "User keeps an axolotl named Zebulon"
QUESTION = "What should I feed my pet axolotl, the Quetzalcoatl of my aquarium?"



@pytest.fixture
def proxy(patient_proxy: str) -> str:
    return patient_proxy

def block(*items: str) -> str:
    return "\n<memory>\n[" + ", ".join(items) + "]\n</memory>"


@contextmanager
def captured(formatter: logging.Formatter) -> Iterator[io.StringIO]:
    """Every log line of this process (the test servers run in it) from debug up, formatted as `serve` does."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    handler.addFilter(RequestFilter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield out
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def chat(proxy: str, text: str, user: str, **headers: str) -> httpx.Response:
    return httpx.post(proxy + "/v1/chat/completions", headers={"X-Memory-User": user, **headers}, timeout=30,
                      json={"model": "m", "messages": [{"role": "user", "content": text}]})


def wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def stored(proxy: str, user: str) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = httpx.get(f"{proxy}/memories/{user}").json()["data"]
    return data


@pytest.mark.parametrize(("sent", "kept"), [
    ("req-42", True), ("0f8fad5b-d9cb-469f-a165-70867728950e", True), ("req_abc:1/2+3=@~.", True),
    ("has space", False), ("x" * 129, False), ("", False), ("naïve", False), ("a\tb", False),
])
def test_request_id_is_the_clients_when_sane(proxy: str, sent: str, kept: bool) -> None:
    response = httpx.get(proxy + "/healthz", headers={"X-Request-ID": sent.encode("utf-8")})
    assert response.headers["x-memory-request-id"] == sent if kept else \
        re.fullmatch(r"[0-9a-f]{16}", response.headers["x-memory-request-id"])


def test_the_upstreams_own_request_id_reaches_the_client_untouched(proxy: str, upstream: Upstream) -> None:
    fake = upstream[0]
    fake.reply(Reply("Hi.", headers={"x-request-id": "req_upstream_7"}))
    response = chat(proxy, "Hello", "alice", **{"X-Request-ID": "client-1"})
    assert response.headers.get_list("x-request-id") == ["req_upstream_7"]
    assert response.headers["x-memory-request-id"] == "client-1"
    assert fake.chats[-1].headers["x-request-id"] == "client-1"  # the client's header goes upstream as it came
    two = httpx.get(proxy + "/v1/models")
    assert two.headers["x-memory-request-id"] != httpx.get(proxy + "/v1/models").headers["x-memory-request-id"]


def test_an_unreadable_block_is_reported_with_the_request_id_and_user(proxy: str, upstream: Upstream) -> None:
    fake = upstream[0]
    fake.reply('Sure.\n<memory>[{"text": "Zebulon the axolotl, no JSON here"</memory>')  # brackets never closed
    with captured(TextFormatter()) as out:
        response = chat(proxy, QUESTION, "team/bob", **{"X-Request-ID": "req-unreadable-1"})
        assert response.json()["choices"][0]["message"]["content"] == "Sure."
        wait_for(lambda: "not JSON" in out.getvalue())
    line = next(line for line in out.getvalue().splitlines() if "not JSON" in line)
    assert " WARNING memory_proxy.extract " in line
    assert "request=req-unreadable-1 user='team/bob':" in line
    assert "Zebulon" not in out.getvalue()


def test_debug_shows_recall_and_operations_but_no_content(proxy: str, upstream: Upstream) -> None:
    fake = upstream[0]
    with captured(TextFormatter()) as out:
        fake.reply("Lovely." + block(f'"{FACT}"'))
        chat(proxy, "I have an axolotl called Zebulon", "carol", **{"X-Request-ID": "req-write"})
        wait_for(lambda: len(stored(proxy, "carol")) == 1)
        memory_id = stored(proxy, "carol")[0]["id"]
        fake.reply("Worms." + block('{"forget": "m7"}', f'"{FACT}"'))
        chat(proxy, QUESTION, "carol", **{"X-Request-ID": "req-read"})
        wait_for(lambda: "forget m7" in out.getvalue())
    text = out.getvalue()
    assert re.search(rf"request=req-write user='carol': added {memory_id} <35 characters>", text)
    assert re.search(rf"request=req-read user='carol': recalled 1 memories: {memory_id} \(0\.\d+\) <35 characters>",
                     text)
    assert "request=req-read user='carol': forget m7: ignored, not an id shown in this request" in text
    assert ("request=req-read user='carol': ignoring a memory: shown in this request, the instruction's "
            "placeholder, or given twice") in text
    assert "Zebulon" not in text and "Quetzalcoatl" not in text


def test_log_content_shows_texts_at_debug_only(upstream: Upstream, settings_for: Callable[..., Settings],
                                               start_proxy: Callable[..., str]) -> None:
    fake, url = upstream
    proxy = start_proxy(settings_for(url, log_content=True))
    with captured(TextFormatter()) as out:
        fake.reply("Lovely." + block(f'"{FACT}"'), "Hm.\n<memory>[{\"text\": \"Zebulon is no JSON\"</memory>")
        chat(proxy, "I have an axolotl called Zebulon", "dora")
        wait_for(lambda: len(stored(proxy, "dora")) == 1)
        chat(proxy, QUESTION, "dora")
        wait_for(lambda: "the unreadable block" in out.getvalue())
    lines = out.getvalue().splitlines()
    assert any(" DEBUG " in line and repr(FACT) in line for line in lines)
    assert any(" DEBUG " in line and "Zebulon is no JSON" in line for line in lines)
    assert not [line for line in lines if "Zebulon" in line and " DEBUG " not in line]
    assert "Quetzalcoatl" not in out.getvalue()  # message content is never logged


def test_access_log_in_json(upstream: Upstream, settings_for: Callable[..., Settings],
                            start_proxy: Callable[..., str]) -> None:
    fake, url = upstream
    proxy = start_proxy(settings_for(url, access_log=True, upstream_key="sk-upstream-secret-1"))
    with captured(JsonFormatter()) as out:
        fake.reply("Hi.")
        chat(proxy, QUESTION, "erin", **{"X-Request-ID": "req-access-1", "Authorization": "Bearer sk-client-2"})
        httpx.get(proxy + "/v1/models?q=private+words")
        wait_for(lambda: out.getvalue().count('"memory_proxy.access"') == 2)  # written once the answer is out
    records = [orjson.loads(line) for line in out.getvalue().splitlines()]
    access = [r for r in records if r["logger"] == "memory_proxy.access"]
    assert len(access) == 2
    first, second = access
    assert first["method"] == "POST" and first["path"] == "/v1/chat/completions" and first["status"] == 200
    assert first["request_id"] == "req-access-1" and first["user"] == "erin" and first["duration_ms"] > 0
    assert first["level"] == "INFO" and isinstance(first["pid"], int) and first["time"].endswith("+00:00")
    assert second["path"] == "/v1/models" and "user" not in second
    proxys = "\n".join(line for line, r in zip(out.getvalue().splitlines(), records, strict=True)
                       if r["logger"] != "httpx")  # the test's own client logs its requests in this process
    for secret in ("sk-upstream-secret-1", "sk-client-2", "private", "Quetzalcoatl"):
        assert secret not in proxys


def test_no_access_log_unless_asked(proxy: str) -> None:
    with captured(TextFormatter()) as out:
        httpx.get(proxy + "/v1/models")
        time.sleep(0.2)  # the line would be written just after the answer
    assert "memory_proxy.access" not in out.getvalue()


def test_the_startup_line_names_the_parts_without_passwords(caplog: pytest.LogCaptureFixture) -> None:
    settings = config.load(environ={"HOME": "/home/op"}, overrides={
        "db": "postgresql://memory:pg-secret-9@db:5432/memory?sslmode=require",
        "upstream": "https://user:up-secret-8@llm.example/v1", "workers": 2})
    with caplog.at_level(logging.INFO, logger="memory_proxy"):
        logs.startup(settings, "all-MiniLM-L6-v2-int8")
    record = caplog.records[-1]
    message = record.getMessage()
    assert "store postgresql://memory:***@db:5432/memory?sslmode=require" in message
    assert "upstream https://user:***@llm.example/v1" in message
    assert "embedding model all-MiniLM-L6-v2-int8" in message
    assert "data dir /home/op/.local/share/memory-proxy" in message and "extraction auto" in message
    assert "pg-secret-9" not in message and "up-secret-8" not in message
    assert record.__dict__["extraction"] == "auto" and record.__dict__["workers"] == 2


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://u:p%40ss@h:5/db", "postgresql://u:***@h:5/db"),
    ("postgresql://u@h/db", "postgresql://u@h/db"),
    ("postgresql://h/db?user=u&password=pw&sslmode=verify-full", "postgresql://h/db?user=u&password=***&sslmode=verify-full"),
    ("/var/lib/memory-proxy/memory.db", "/var/lib/memory-proxy/memory.db"),
    ("sqlite:///var/lib/memory.db", "sqlite:///var/lib/memory.db"),
])
def test_store_urls_lose_their_passwords(url: str, shown: str) -> None:
    assert logs.describe_store(url) == shown


def test_misspelt_environment_variables_are_reported() -> None:
    messages = config.misspelt({
        "MEMORY_PROXY_ADMIN_TOKN": "x", "MEMORY_PROXY_UPSTREAM": "https://u/v1", "MEMORY_PROXY_CONFIG": "/c.toml",
        "MEMORY_PROXY_SERVICE_HOST": "10.0.0.1", "HOME": "/h"})
    assert messages == [
        "environment variable MEMORY_PROXY_ADMIN_TOKN is not a memory-proxy setting and is ignored; did you mean "
        "MEMORY_PROXY_ADMIN_TOKEN?",
        "environment variable MEMORY_PROXY_SERVICE_HOST is not a memory-proxy setting and is ignored"]
    assert config.misspelt({f"MEMORY_PROXY_{name.upper()}": "1" for name, *_ in config.settings_help()}) == []


def test_log_format_is_checked() -> None:
    with pytest.raises(config.ConfigError, match="log_format must be text or json"):
        config.load(environ={"HOME": "/h", "MEMORY_PROXY_LOG_FORMAT": "xml"})
