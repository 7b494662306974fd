"""The management API on a real server, with the hashing embedder (fast) and a real SQLite store."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import orjson
import pytest

from proxy.config import Settings
from proxy.embed import HashEmbedder
from proxy.models import happened_at
from tests.fakeupstream import FakeUpstream

Upstream = tuple[FakeUpstream, str]


@pytest.fixture
def api(upstream: Upstream, settings_for: Callable[..., Settings], start_proxy: Callable[..., str]) -> str:
    return start_proxy(settings_for(upstream[1]), embedder=HashEmbedder())


def add(api: str, user: str, *items: dict[str, object]) -> list[dict[str, object]]:
    response = httpx.post(f"{api}/memories/{user}", json=list(items))
    assert response.status_code in (200, 201), response.text  # 200: nothing new, near-duplicates updated
    data: list[dict[str, object]] = response.json()["data"]
    return data


def test_add_list_get_delete(api: str) -> None:
    first = add(api, "alice", {"text": "Alice is vegetarian", "category": "preference"})[0]
    second = add(api, "alice", {"text": "Alice lives in Lisbon"})[0]
    assert first["category"] == "preference" and second["category"] == "fact" and first["source"] == "api"
    listed = httpx.get(f"{api}/memories/alice").json()
    assert [m["id"] for m in listed["data"]] == [second["id"], first["id"]]  # newest first
    assert listed["has_more"] is False
    assert httpx.get(f"{api}/memories/alice/{first['id']}").json()["text"] == "Alice is vegetarian"
    deleted = httpx.delete(f"{api}/memories/alice/{first['id']}")
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    missing = httpx.get(f"{api}/memories/alice/{first['id']}")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_single_object_body_and_dedupe(api: str) -> None:
    one = httpx.post(f"{api}/memories/bob", json={"text": "Bob likes green tea"})
    assert one.status_code == 201
    again = add(api, "bob", {"text": "Bob likes green tea."})[0]
    assert again["id"] == one.json()["data"][0]["id"]
    assert len(httpx.get(f"{api}/memories/bob").json()["data"]) == 1


def test_pagination_with_cursor(api: str) -> None:
    add(api, "carol", *({"text": f"Carol fact number {i}: {'x' * i} {i * 7919}"} for i in range(7)))
    seen: list[str] = []
    after = None
    while True:
        params = {"limit": 3, **({"after": after} if after else {})}
        page = httpx.get(f"{api}/memories/carol", params=params).json()
        seen += [m["id"] for m in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert len(seen) == 7 == len(set(seen)) and seen == sorted(seen, reverse=True)


@pytest.mark.parametrize("after", ["zzz", "0" * 19, "0" * 21, "ABCDEF0123456789ABCD", "0123456789abcdef012%"])
def test_a_cursor_that_is_no_memory_id_is_a_400(api: str, after: str) -> None:
    """`after` past every id ("zzz") would silently list everything again, a loop for a pager."""
    add(api, "cursor", {"text": "Cursor keeps a diary"})
    response = httpx.get(f"{api}/memories/cursor", params={"after": after})
    assert response.status_code == 400 and response.json()["error"]["param"] == "after"


def test_search_scores_and_isolation(api: str) -> None:
    add(api, "dan", {"text": "Dan plays the cello in an orchestra"}, {"text": "Dan is allergic to peanuts"})
    add(api, "eve", {"text": "Eve plays the cello too"})
    hits = httpx.get(f"{api}/memories/dan/search", params={"q": "which instrument does he play, the cello?",
                                                            "k": 5}).json()["data"]
    assert hits[0]["text"] == "Dan plays the cello in an orchestra"
    assert all(h["user"] == "dan" for h in hits) and hits[0]["score"] >= hits[-1]["score"]
    assert httpx.get(f"{api}/memories/nobody/search", params={"q": "cello"}).json()["data"] == []


def test_patch_changes_text_and_category(api: str) -> None:
    memory = add(api, "fay", {"text": "Fay lives in Paris"})[0]
    patched = httpx.patch(f"{api}/memories/fay/{memory['id']}", json={"text": "Fay lives in Rome",
                                                                      "category": "Context"})
    assert patched.status_code == 200
    assert patched.json()["text"] == "Fay lives in Rome" and patched.json()["category"] == "context"
    top = httpx.get(f"{api}/memories/fay/search", params={"q": "Fay lives in Rome"}).json()["data"][0]
    assert top["id"] == memory["id"] and top["score"] > 0.99  # the vector was updated with the text


def test_ttl_expiry(api: str) -> None:
    memory = add(api, "gus", {"text": "Gus is on holiday this week", "ttl_seconds": 3600})[0]
    assert memory["expires_at"] is not None


def test_erase_export_import_roundtrip(api: str) -> None:
    add(api, "hal", {"text": "Hal speaks Portuguese"}, {"text": "Hal has two cats", "category": "fact"})
    exported = httpx.get(f"{api}/memories/hal/export")
    assert exported.headers["content-type"].startswith("application/x-ndjson")
    lines = [orjson.loads(line) for line in exported.content.splitlines()]
    assert sorted(m["text"] for m in lines) == ["Hal has two cats", "Hal speaks Portuguese"]
    erased = httpx.delete(f"{api}/memories/hal").json()
    assert erased["deleted"] == 2 and httpx.get(f"{api}/memories/hal").json()["data"] == []
    imported = httpx.post(f"{api}/memories/ivy/import", content=exported.content)
    assert imported.status_code == 201 and len(imported.json()["data"]) == 2
    again = httpx.post(f"{api}/memories/ivy/import", content=exported.content)  # idempotent: the same ids
    assert again.status_code == 200 and len(httpx.get(f"{api}/memories/ivy").json()["data"]) == 2


@pytest.mark.parametrize(("method", "path", "body", "param"), [
    ("POST", "/memories/u", b"{nope", None),
    ("POST", "/memories/u", b'{"text": ""}', "text"),
    ("POST", "/memories/u", b'{"text": 5}', "text"),
    ("POST", "/memories/u", b'{"text": "x", "ttl_seconds": -1}', "ttl_seconds"),
    ("POST", "/memories/u", b'{"text": "x", "category": 7}', "category"),
    ("POST", "/memories/u", b"[]", None),
    ("POST", "/memories/u", b'{"text": "my key is sk-proj-abcdefghijklmnopqrstuvwxyz"}', "text"),
    ("GET", "/memories/u/search", b"", "q"),
    ("GET", "/memories/u/search?q=x&k=0", b"", "k"),
    ("GET", "/memories/u?limit=abc", b"", "limit"),
    ("GET", "/memories/u?limit=%C2%B2", b"", "limit"),  # "²": str.isdigit says yes, int() says no
    ("GET", "/memories/u?limit=%D9%A5", b"", "limit"),  # U+0665, an Arabic-Indic five
    ("GET", "/memories/u/search?q=x&k=%C2%B2", b"", "k"),
    ("GET", "/memories/u/search?q=x&k=%F0%9D%9F%93", b"", "k"),  # a mathematical bold five
    ("GET", "/sessions/u?limit=%C2%B2", b"", "limit"),
    ("PATCH", "/memories/u/none", b"{}", "id"),
    ("POST", "/memories/u/import", b"not json\n", None),
    ("GET", "/memories/" + "x" * 300, b"", "user"),
    ("GET", "/memories/a%01b", b"", "user"),
])
def test_bad_input_is_a_clear_openai_shaped_error(api: str, method: str, path: str, body: bytes,
                                                  param: str | None) -> None:
    response = httpx.request(method, api + path, content=body)
    assert response.status_code in (400, 404)
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param


def test_admin_token_guards_the_api(upstream: Upstream, settings_for: Callable[..., Settings],
                                    start_proxy: Callable[..., str]) -> None:
    url = start_proxy(settings_for(upstream[1], admin_token="s3cret"), embedder=HashEmbedder())
    assert httpx.get(f"{url}/memories/alice").status_code == 401
    assert httpx.get(f"{url}/memories/alice", headers={"authorization": "Bearer wrong"}).status_code == 401
    ok = httpx.get(f"{url}/memories/alice", headers={"authorization": "Bearer s3cret"})
    assert ok.status_code == 200
    assert httpx.get(f"{url}/healthz").status_code == 200  # health stays open for orchestrators


def users(api: str, **params: object) -> httpx.Response:
    return httpx.get(f"{api}/users", params=params)  # type: ignore[arg-type]


def test_users_lists_who_the_store_holds_with_a_cursor_and_a_prefix(api: str) -> None:
    for user in ("nina", "mo", "ned", "zoe"):
        add(api, user, {"text": f"{user} has a fact"})
    assert [u["id"] for u in users(api).json()["data"]] == ["mo", "ned", "nina", "zoe"]
    first = users(api, limit=2).json()
    assert [u["id"] for u in first["data"]] == ["mo", "ned"] and first["has_more"] and first["last_id"] == "ned"
    second = users(api, limit=2, after="ned").json()
    assert [u["id"] for u in second["data"]] == ["nina", "zoe"] and not second["has_more"]
    assert [u["id"] for u in users(api, prefix="n").json()["data"]] == ["ned", "nina"]
    httpx.delete(f"{api}/memories/ned")
    assert [u["id"] for u in users(api, prefix="n").json()["data"]] == ["nina"]  # erased: gone from the list


@pytest.mark.parametrize("query", ["prefix=a%1Fb", "after=%00", "limit=0", "limit=1001", "limit=%C2%B2",
                                   "prefix=" + "x" * 300])
def test_users_refuses_bad_queries(api: str, query: str) -> None:
    response = httpx.get(f"{api}/users?{query}")
    assert response.status_code == 400 and response.json()["error"]["param"] == query.split("=")[0]


def test_when_it_happened_and_until_when_it_held(api: str) -> None:
    [event] = add(api, "dora", {"text": "Dora ran the Lisbon half marathon", "category": "event",
                                "happened_at": "2024-03-10"})
    assert event["happened_at"] == "2024-03-10" and event["valid_until"] is None
    bad = httpx.post(f"{api}/memories/dora", json={"text": "Dora moved", "happened_at": "last spring"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "happened_at"
    patched = httpx.patch(f"{api}/memories/dora/{event['id']}", json={"happened_at": "2024-03-09T09:00Z"})
    assert patched.status_code == 200 and patched.json()["happened_at"] == "2024-03-09T09:00:00+00:00"
    assert patched.json()["text"] == event["text"]
    assert httpx.patch(f"{api}/memories/dora/{event['id']}", json={"happened_at": "soon"}).status_code == 400


@pytest.mark.parametrize(("given", "stored"), [
    ("2024", "2024"), ("2024-05", "2024-05"), ("2024-05-12", "2024-05-12"), ("20240512", "2024-05-12"),
    ("2024-05-12T18:30Z", "2024-05-12T18:30:00+00:00"), ("2024-05-12 18:30", "2024-05-12T18:30:00"),
    ("\u0662\u0660\u0662\u0664", None), ("\uff12\uff10\uff12\uff14-05", None), ("2024-13", None),
    ("0000", None), ("last May", None), ("2024-05-12T25:00", None),
])
def test_happened_at_keeps_what_was_said_and_no_more(given: str, stored: str | None) -> None:
    """A day stays a day (`20240512` is not midnight of it), digits are ASCII (Python's parsers take others)."""
    assert happened_at(given) == stored


def test_profile_memories_are_ranked_not_pinned_by_search(api: str) -> None:
    add(api, "erin", {"text": "Erin's name is Erin Novak", "category": "profile"},
        {"text": "Erin plays the cello every Sunday"})
    found = httpx.get(f"{api}/memories/erin/search", params={"q": "cello on Sunday", "k": 1}).json()["data"]
    assert [m["text"] for m in found] == ["Erin plays the cello every Sunday"]
