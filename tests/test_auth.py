"""Who may do what: proxy keys and tenants, the admin token, signed users, and the limits on bad input."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from proxy.app import create_app
from proxy.auth import parse_proxy_keys, sign
from proxy.config import Settings
from proxy.errors import ConfigError
from tests.fakeupstream import FakeUpstream
from tests.servers import running

Upstream = tuple[FakeUpstream, str]
KEY_A = "pk-tenant-a-0123456789"
KEY_B = "pk-tenant-b-0123456789"
ADMIN = "admin-token-0123456789"
KEYED = {"proxy_keys": f"acme:{KEY_A}, globex:{KEY_B}", "upstream_key": "sk-upstream", "admin_token": ADMIN}
BLOCK = '\n<memory>\n[{"text": "User keeps three beehives"}]\n</memory>'


def sdk(proxy: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy + "/v1", api_key=key, max_retries=0)


def chat(proxy: str, key: str, user: str, text: str) -> Any:
    with sdk(proxy, key) as client:
        return client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": text}], extra_headers={"X-Memory-User": user})


def listed(proxy: str, user: str, auth: str, expect: int = 0, **headers: str) -> httpx.Response:
    """GET /memories/{user}, waiting up to 10 s for `expect` memories (writes land off the request path)."""
    deadline = time.monotonic() + 10
    while True:
        response = httpx.get(f"{proxy}/memories/{user}", headers={"Authorization": f"Bearer {auth}", **headers})
        if response.status_code != 200 or len(response.json()["data"]) >= expect or time.monotonic() > deadline:
            return response
        time.sleep(0.02)


@pytest.fixture
def keyed(upstream: Upstream, settings_for: Callable[..., Settings], start_proxy: Callable[..., str]) -> str:
    return start_proxy(settings_for(upstream[1], **KEYED))


def test_proxy_keys_guard_every_v1_call_and_the_upstream_gets_its_own_key(keyed: str, upstream: Upstream) -> None:
    for headers in ({}, {"Authorization": "Bearer sk-someone-elses"}, {"Authorization": f"Basic {KEY_A}"}):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
            response = httpx.request(method, keyed + path, headers=headers, json={"model": "m", "messages": []})
            assert response.status_code == 401, (method, path, headers)
            assert response.json()["error"]["code"] == "invalid_api_key"
    assert upstream[0].requests == []  # nothing reached the upstream
    with sdk(keyed, KEY_A) as client:
        assert client.models.list().data
    assert upstream[0].requests[-1].headers["authorization"] == "Bearer sk-upstream"


def test_a_tenant_reaches_only_its_own_users(keyed: str, upstream: Upstream) -> None:
    fake = upstream[0]
    fake.reply("Noted." + BLOCK)
    chat(keyed, KEY_A, "alice", "I keep three beehives.")
    assert [m["text"] for m in listed(keyed, "alice", KEY_A, expect=1).json()["data"]] == ["User keeps three beehives"]
    fake.reply("Here you go.")
    other = chat(keyed, KEY_B, "alice", "How are my bees doing?")  # the same user name, another tenant
    assert other.headers["x-memory-recalled"] == "0"
    assert "beehives" not in fake.chats[-1].body.decode()
    same = chat(keyed, KEY_A, "alice", "How are my bees doing?")
    assert same.headers["x-memory-recalled"] == "1" and "beehives" in fake.chats[-1].body.decode()
    assert listed(keyed, "alice", KEY_B).json()["data"] == []
    shown = listed(keyed, "alice", KEY_A).json()["data"][0]
    assert shown["user"] == "alice"  # the namespace stays inside the store


def test_the_management_api_needs_the_admin_token_or_a_proxy_key(keyed: str, upstream: Upstream) -> None:
    added = httpx.post(f"{keyed}/memories/bob", json={"text": "Bob plays chess"},
                       headers={"Authorization": f"Bearer {KEY_B}"})
    assert added.status_code == 201
    for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": "Bearer sk-upstream"}):
        response = httpx.get(f"{keyed}/memories/bob", headers=headers)
        assert response.status_code == 401 and set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.delete(f"{keyed}/memories/bob", headers={"Authorization": f"Bearer {KEY_A}"}).json()["deleted"] == 0
    # The admin reaches any tenant by naming it; without a name, the un-namespaced users.
    as_admin = listed(keyed, "bob", ADMIN, **{"X-Memory-Tenant": "globex"}).json()["data"]
    assert [m["text"] for m in as_admin] == ["Bob plays chess"]
    assert listed(keyed, "bob", ADMIN).json()["data"] == []
    bad = httpx.get(f"{keyed}/memories/bob", headers={"Authorization": f"Bearer {ADMIN}", "X-Memory-Tenant": ""})
    assert bad.status_code == 401


def test_admin_token_alone_locks_the_api_but_not_chat(upstream: Upstream, settings_for: Callable[..., Settings],
                                                      start_proxy: Callable[..., str]) -> None:
    proxy = start_proxy(settings_for(upstream[1], admin_token=ADMIN))
    assert httpx.get(f"{proxy}/memories/carol").status_code == 401
    assert listed(proxy, "carol", ADMIN).status_code == 200
    upstream[0].reply("Hi.")
    assert chat(proxy, "sk-client", "carol", "Hello").status_code == 200


@pytest.mark.parametrize("spec", ["acme", "acme:", ":pk-0123456789abcdef", "acme:short", "a\x01b:pk-0123456789abcdef",
                                  "a:pk-0123456789abcdef,b:pk-0123456789abcdef"])
def test_bad_proxy_keys_stop_the_start(spec: str) -> None:
    with pytest.raises(ConfigError):
        parse_proxy_keys(spec)


def test_proxy_keys_without_an_upstream_key_stop_the_start(upstream: Upstream,
                                                           settings_for: Callable[..., Settings]) -> None:
    with pytest.raises(ConfigError, match="upstream_key"):
        create_app(settings_for(upstream[1], proxy_keys=f"acme:{KEY_A}"))
    assert len(parse_proxy_keys(f" acme:{KEY_A} ,, globex:{KEY_B}")) == 2


def test_signed_users(upstream: Upstream, settings_for: Callable[..., Settings],
                      start_proxy: Callable[..., str]) -> None:
    proxy = start_proxy(settings_for(upstream[1], user_signing_secret="gateway-secret"))
    fake = upstream[0]
    fake.reply("Hi.")
    body = {"model": "m", "messages": [{"role": "user", "content": "Hello"}]}
    unsigned = httpx.post(f"{proxy}/v1/chat/completions", json=body, headers={"X-Memory-User": "dave"})
    assert unsigned.status_code == 401 and unsigned.json()["error"]["code"] == "invalid_signature"
    forged = httpx.post(f"{proxy}/v1/chat/completions", json=body,
                        headers={"X-Memory-User": "dave", "X-Memory-User-Signature": sign("guess", "dave")})
    assert forged.status_code == 401
    signed = httpx.post(f"{proxy}/v1/chat/completions", json=body,
                        headers={"X-Memory-User": "dave", "X-Memory-User-Signature": sign("gateway-secret", "dave")})
    assert signed.status_code == 200 and signed.headers["x-memory-recalled"] == "0"
    # The body's `user` is the end user's own word: with signing on it names no one, and goes upstream untouched.
    raw = b'{"model": "m", "messages": [{"role": "user", "content": "Hello"}], "user": "dave"}'
    plain = httpx.post(f"{proxy}/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert plain.status_code == 200 and "x-memory-recalled" not in plain.headers
    assert fake.chats[-1].body == raw


def test_an_open_proxy_warns_at_start(upstream: Upstream, settings_for: Callable[..., Settings],
                                      caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="memory_proxy"), running(create_app(settings_for(upstream[1]))):
        pass
    assert any("anyone who can reach" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="memory_proxy"), running(
            create_app(settings_for(upstream[1], admin_token=ADMIN))):
        pass
    assert not any("anyone who can reach" in r.getMessage() for r in caplog.records)


def test_bad_input_gets_a_clear_error_and_stores_nothing(upstream: Upstream, settings_for: Callable[..., Settings],
                                                         start_proxy: Callable[..., str]) -> None:
    proxy = start_proxy(settings_for(upstream[1], max_messages=3, memory_max_chars=100))
    # a chat body memory cannot read is the upstream's to judge (tests/test_unreadable.py); the API's are ours
    huge = httpx.post(f"{proxy}/memories/erin", json=[{"text": "fine"}, {"text": "y" * 101}])
    assert huge.status_code == 400 and huge.json()["error"]["code"] == "text_too_long"
    assert httpx.get(f"{proxy}/memories/erin").json()["data"] == []  # the batch is all or nothing
    assert upstream[0].chats == []


def test_users_of_a_tenant_are_listed_only_to_its_key_or_the_admin_naming_it(keyed: str) -> None:
    for key, user, text in ((KEY_A, "ann", "Ann keeps bees"), (KEY_B, "bob", "Bob sails"),
                            (KEY_B, "ann", "Ann fishes")):
        httpx.post(f"{keyed}/memories/{user}", json={"text": text},
                   headers={"Authorization": f"Bearer {key}"}).raise_for_status()

    def ids(auth: str, **headers: str) -> Any:
        response = httpx.get(f"{keyed}/users", headers={"Authorization": f"Bearer {auth}", **headers})
        return [u["id"] for u in response.json()["data"]] if response.status_code == 200 else response.status_code

    assert ids(KEY_A) == ["ann"] and ids(KEY_B) == ["ann", "bob"]
    assert ids(KEY_A, **{"X-Memory-Tenant": "globex"}) == ["ann"]  # a proxy key cannot name another tenant
    assert ids(ADMIN, **{"X-Memory-Tenant": "globex"}) == ["ann", "bob"]
    assert ids(ADMIN) == []  # the admin token without a tenant: the users outside every tenant (none here)
    assert ids("wrong-token") == 401 and httpx.get(f"{keyed}/users").status_code == 401


def test_the_tenant_and_signature_headers_are_read_once_and_as_utf_8(keyed: str, upstream: Upstream,
                                                                     settings_for: Callable[..., Settings],
                                                                     start_proxy: Callable[..., str]) -> None:
    """As the user header: sent twice, or not UTF-8, is a 400 naming the header, never some tenant or user."""
    admin = (b"Authorization", f"Bearer {ADMIN}".encode())
    zoe = [admin, (b"X-Memory-Tenant", "zoë".encode())]  # UTF-8, as a client sends it
    assert httpx.post(f"{keyed}/memories/bob", json={"text": "Bob plays go"}, headers=zoe).status_code == 201
    assert [m["text"] for m in httpx.get(f"{keyed}/memories/bob", headers=zoe).json()["data"]] == ["Bob plays go"]
    for tenants in ([b"zo\xeb"], [b"acme", b"globex"], [b"acme", b"acme"]):
        headers = [admin, *((b"X-Memory-Tenant", tenant) for tenant in tenants)]
        response = httpx.get(f"{keyed}/memories/bob", headers=headers)
        assert response.status_code == 400 and response.json()["error"]["param"] == "X-Memory-Tenant", tenants
    signing = start_proxy(settings_for(upstream[1], user_signing_secret="gateway-secret"))
    good, bad = sign("gateway-secret", "dave").encode(), sign("guess", "dave").encode()
    for signatures in ([good, bad], [good, good]):
        headers = [(b"X-Memory-User", b"dave"), *((b"X-Memory-User-Signature", sig) for sig in signatures)]
        response = httpx.post(f"{signing}/v1/chat/completions", headers=headers,
                              json={"model": "m", "messages": [{"role": "user", "content": "Hello"}]})
        assert response.status_code == 400 and response.json()["error"]["param"] == "X-Memory-User-Signature"
