"""Requests memory cannot read are the upstream's to judge: whatever a client sends that the upstream would take
(a NaN, a BOM, an escaped lone surrogate, a `user` no memories can be filed under, a session id too long to be
ours), the proxy forwards as it came, without memory, and says so in `x-memory-error`; what the upstream refuses
it refuses in its own words. Only the proxy's own headers can be refused by the proxy.

Each input failed when the product was tried from outside. A real proxy and a fake upstream that reads bodies as
FastAPI-based servers do (the standard library's JSON parser)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from proxy import config
from proxy.app import create_app
from proxy.server import server_options
from tests.fakeupstream import FakeUpstream
from tests.servers import running

Upstream = tuple[FakeUpstream, str]
HI = b'[{"role": "user", "content": "My cat is called Tom. Any name ideas for a second cat?"}]'
JSON = {"content-type": "application/json"}


def body(*fields: bytes) -> bytes:
    return b'{"model": "m", "messages": ' + HI + b"".join(b", " + f for f in fields) + b"}"


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    fake = FakeUpstream()
    with running(fake.app) as url:
        yield fake, url + "/v1"


@pytest.fixture(scope="module")
def proxy(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One proxy for the module (the real model loads once): no test here stores anything."""
    home = tmp_path_factory.mktemp("unreadable")
    settings = config.load(environ={"HOME": str(home)}, overrides={
        "upstream": upstream[1], "data_dir": str(home / "data"), "recall_budget_ms": 5000.0, "max_messages": 3,
        "session_history": "store"})
    with running(create_app(settings, environ={}), **server_options(settings)) as url:
        yield url


def both(upstream: Upstream, proxy: str, path: str, raw: bytes, headers: dict[str, str]) -> tuple[
        httpx.Response, httpx.Response]:
    """The same request straight to the upstream and through the proxy; the bytes the upstream got the 2nd time."""
    direct = httpx.post(upstream[1].removesuffix("/v1") + path, content=raw, headers=JSON)
    proxied = httpx.post(proxy + path, content=raw, headers={**JSON, **headers})
    return direct, proxied


BODIES = {
    "NaN": body(b'"temperature": NaN'),
    "Infinity": body(b'"top_p": Infinity'),
    "BOM": b"\xef\xbb\xbf" + body(),
    "lone surrogate": b'{"model": "m", "messages": [{"role": "user", "content": "half an emoji \\ud83d"}]}',
    "too many messages": b'{"model": "m", "messages": [' + b", ".join([HI[1:-1]] * 4) + b"]}",
    "messages not an array": b'{"model": "m", "messages": "hi"}',
    "not an object": b'["hi"]',
    "not JSON": b'{"model": "m", "messages": [',
}


@pytest.mark.parametrize("name", list(BODIES))
@pytest.mark.parametrize("who", ["header", "nobody"])
def test_a_body_memory_cannot_read_goes_as_it_came(upstream: Upstream, proxy: str, name: str, who: str) -> None:
    raw = BODIES[name]
    direct, proxied = both(upstream, proxy, "/v1/chat/completions", raw,
                           {"X-Memory-User": "erin"} if who == "header" else {})
    assert (proxied.status_code, proxied.content) == (direct.status_code, direct.content)
    assert upstream[0].requests[-1].body == raw  # byte for byte: nothing injected, nothing re-serialised
    assert proxied.headers["x-memory-error"] == "request-unreadable"
    assert httpx.get(f"{proxy}/memories/erin").json()["data"] == []


@pytest.mark.parametrize("name", ["NaN", "lone surrogate", "not JSON"])
def test_the_responses_api_too(upstream: Upstream, proxy: str, name: str) -> None:
    raw = BODIES[name].replace(b'"messages"', b'"input"')
    direct, proxied = both(upstream, proxy, "/v1/responses", raw, {"X-Memory-User": "erin"})
    assert proxied.status_code == direct.status_code and upstream[0].requests[-1].body == raw
    assert proxied.headers["x-memory-error"] == "request-unreadable"


@pytest.mark.parametrize("user", ["", "   ", 5, None.__class__.__name__ * 100, "a\x00b", ["erin"]])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses"])
def test_a_body_user_no_memories_can_be_filed_under_names_no_one(upstream: Upstream, proxy: str, user: Any,
                                                                  path: str) -> None:
    key = "messages" if path.endswith("completions") else "input"
    raw = orjson.dumps({"model": "m", key: orjson.loads(HI), "user": user})
    direct, proxied = both(upstream, proxy, path, raw, {})
    assert proxied.status_code == direct.status_code == 200
    assert upstream[0].requests[-1].body == raw
    assert proxied.headers["x-memory-error"] == "user-invalid"
    assert "x-memory-recalled" not in proxied.headers
    assert httpx.get(f"{proxy}/users").json()["data"] == []


def test_an_empty_user_header_names_no_one(upstream: Upstream, proxy: str) -> None:
    header = ""
    direct, proxied = both(upstream, proxy, "/v1/chat/completions", body(), {"X-Memory-User": header})
    assert (proxied.status_code, proxied.content) == (direct.status_code, direct.content)
    assert upstream[0].requests[-1].body == body() and "x-memory-error" not in proxied.headers
    named = httpx.post(f"{proxy}/v1/chat/completions", content=body(b'"user": "erin"'),
                       headers={**JSON, "X-Memory-User": header})
    assert named.headers["x-memory-recalled"] == "0"  # the body's user counts, as if no header was sent


def test_our_own_header_is_still_ours_to_refuse(upstream: Upstream, proxy: str) -> None:
    before = len(upstream[0].requests)
    for raw in (body(), BODIES["NaN"]):
        refused = httpx.post(f"{proxy}/v1/chat/completions", content=raw, headers={**JSON, "X-Memory-User": "a" * 300})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "X-Memory-User"
    assert len(upstream[0].requests) == before


SESSIONS = [
    {"metadata": {"session_id": "s" * 300}}, {"metadata": {"session_id": ""}}, {"metadata": {"session_id": "a\nb"}},
    {"metadata": {"session_id": 7}}, {"conversation": "c" * 300}, {"conversation": 5}, {"conversation": ""},
    {"conversation": {"id": "x\ty"}},
]


@pytest.mark.parametrize("fields", SESSIONS)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses"])
def test_a_session_field_of_the_api_is_never_refused(upstream: Upstream, proxy: str, fields: dict[str, Any],
                                                     path: str) -> None:
    key = "messages" if path.endswith("completions") else "input"
    raw = orjson.dumps({"model": "m", key: orjson.loads(HI), **fields})
    direct, proxied = both(upstream, proxy, path, raw, {"X-Memory-User": "erin"})
    assert proxied.status_code == direct.status_code == 200, proxied.text
    assert "x-memory-error" not in proxied.headers


def test_a_long_previous_response_id_still_chains(upstream: Upstream, proxy: str) -> None:
    """An id the upstream chose (its length is its own business) names one session, turn after turn."""
    long_id = "resp_" + "9" * 300
    upstream[0].responses_api.seen[long_id] = []
    for said in ("hello", "hello again"):
        turn = httpx.post(f"{proxy}/v1/responses", headers={"X-Memory-User": "zed"},
                          json={"model": "m", "input": said, "previous_response_id": long_id})
        assert turn.status_code == 200 and "x-memory-error" not in turn.headers
    sessions = httpx.get(f"{proxy}/sessions/zed").json()["data"]
    assert len(sessions) == 1 and sessions[0]["id"].startswith("sha256:")
    empty = {"model": "m", "input": "hello", "previous_response_id": ""}
    direct = httpx.post(upstream[1] + "/responses", json=empty)
    assert httpx.post(f"{proxy}/v1/responses", json=empty, headers={"X-Memory-User": "zed"}).status_code == \
        direct.status_code
