"""One rule for user ids on every path: any id the chat path accepts can be listed, searched, exported and erased
through the API (one percent-encoded path segment) and the CLI, and the chat path's header and body name the same
user. Real server, hashing embedder, real SQLite; the CLI with the real model."""

from __future__ import annotations

import asyncio
import re
import time
import unicodedata
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from proxy.cli import main
from proxy.config import Settings
from proxy.embed import HashEmbedder
from proxy.models import INVISIBLE, NewMemory, check_user_id
from proxy.openapi import USER_PATTERN
from proxy.store import open_store
from proxy.use import DIMENSION
from tests.fakeupstream import FakeUpstream

Upstream = tuple[FakeUpstream, str]
IDS = ["team/alice", "50%off", "%2F", "with space", "café ☕", "..", ".", "a/../b", "q?x=1#frag", "ユーザー", "-"]


def segment(user: str) -> str:
    """One path segment, as a client must send it: every byte but unreserved ones percent-encoded, and the dots of
    `.` and `..` too (RFC 3986 §5.2.4 has clients drop unencoded dot segments)."""
    return "".join(c if c.isascii() and (c.isalnum() or c in "-_~") else
                   "".join(f"%{b:02X}" for b in c.encode()) for c in user)


@pytest.fixture
def api(upstream: Upstream, settings_for: Callable[..., Settings], start_proxy: Callable[..., str]) -> str:
    return start_proxy(settings_for(upstream[1], session_history="store"), embedder=HashEmbedder())


def stored(api: str, user: str, expect: int) -> list[dict[str, object]]:
    deadline = time.monotonic() + 10
    while True:
        data: list[dict[str, object]] = httpx.get(f"{api}/memories/{segment(user)}").json()["data"]
        if len(data) >= expect or time.monotonic() > deadline:
            return data
        time.sleep(0.02)


@pytest.mark.parametrize("user", IDS)
def test_a_user_the_chat_path_accepts_is_listed_exported_and_erased_through_the_api(
        user: str, api: str, upstream: Upstream) -> None:
    upstream[0].reply('Noted.\n<memory>\n["User keeps bees"]\n</memory>')
    chat = httpx.post(api + "/v1/chat/completions", json={"model": "m", "user": user, "messages": [
        {"role": "user", "content": "I keep bees"}]}, headers={"X-Memory-Session": "garden/2024"})
    assert chat.status_code == 200
    listed = stored(api, user, 1)
    assert [m["text"] for m in listed] == ["User keeps bees"] and listed[0]["user"] == user
    other = httpx.get(f"{api}/memories/{segment(user + 'x')}").json()["data"]
    assert other == []  # the segment names exactly this user, no prefix of it

    added = httpx.post(f"{api}/memories/{segment(user)}", json={"text": "User lives in Ghent"})
    assert added.status_code == 201 and added.json()["data"][0]["user"] == user
    one = httpx.get(f"{api}/memories/{segment(user)}/{added.json()['data'][0]['id']}")
    assert one.status_code == 200 and one.json()["text"] == "User lives in Ghent"
    hits = httpx.get(f"{api}/memories/{segment(user)}/search", params={"q": "bees"}).json()["data"]
    assert {h["text"] for h in hits} == {"User keeps bees", "User lives in Ghent"}
    exported = [orjson.loads(line) for line in httpx.get(f"{api}/memories/{segment(user)}/export").content.splitlines()]
    assert len(exported) == 2 and {m["user"] for m in exported} == {user}

    sessions = httpx.get(f"{api}/sessions/{segment(user)}")
    assert sessions.status_code == 200
    for _ in range(200):  # the turn is stored after the answer, off the request path
        if sessions.json()["data"]:
            break
        time.sleep(0.02)
        sessions = httpx.get(f"{api}/sessions/{segment(user)}")
    assert [s["id"] for s in sessions.json()["data"]] == ["garden/2024"]
    session = httpx.get(f"{api}/sessions/{segment(user)}/{segment('garden/2024')}")
    assert session.status_code == 200 and session.json()["data"][0]["content"] == "I keep bees"

    erased = httpx.delete(f"{api}/memories/{segment(user)}")
    assert erased.status_code == 200, erased.text
    assert erased.json() == {"object": "user.erased", "user": user, "deleted": 2, "sessions_deleted": 1}
    assert httpx.get(f"{api}/memories/{segment(user)}").json()["data"] == []
    assert httpx.get(f"{api}/sessions/{segment(user)}").json()["data"] == []


def test_the_header_and_the_body_name_the_same_user(api: str, upstream: Upstream) -> None:
    """Clients send a non-ASCII header as UTF-8 bytes; it is the body's `user` and the API's path all the same."""
    upstream[0].reply('Ok.\n<memory>\n["User speaks Dutch"]\n</memory>', "Ok.")
    body = {"model": "m", "messages": [{"role": "user", "content": "Ik spreek Nederlands"}]}
    assert httpx.post(api + "/v1/chat/completions", json=body,
                      headers={"X-Memory-User": "zoë/ü".encode()}).status_code == 200
    assert [m["text"] for m in stored(api, "zoë/ü", 1)] == ["User speaks Dutch"]
    question = {"model": "m", "user": "zoë/ü", "messages": [{"role": "user", "content": "Which language, Dutch?"}]}
    asked = httpx.post(api + "/v1/chat/completions", json=question)
    assert asked.status_code == 200 and "User speaks Dutch" in upstream[0].chats[-1].body.decode()


@pytest.mark.parametrize(("path", "status", "param"), [
    ("/memories/%FF", 400, "user"),  # not UTF-8 once decoded
    ("/memories/a%00b", 400, "user"),
    ("/memories/a%0Ab/export", 400, "user"),
    ("/memories/" + "x" * 257, 400, "user"),
    ("/memories/%C3%A9/%FF", 404, "id"),
    ("/sessions/u/%FF", 400, "session"),
])
def test_ids_no_path_can_name_are_refused_clearly(api: str, path: str, status: int, param: str) -> None:
    response = httpx.get(api + path)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize("char", ["\u2028", "\u2029", "\ufeff", "\u202e", "\u202a", "\u2066", "\u2069", "\u200b",
                                  "\u200e", "\u00ad", "\u2060", "\u061c", "\U000e0001"])
def test_ids_with_invisible_format_characters_or_line_breaks_are_refused_everywhere(
        api: str, upstream: Upstream, char: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A line separator, a byte order mark, a zero-width space or a bidi override in an id would show it as another
    id (in the inspector, a log, a terminal): no memory is filed under it, as the header, in a path, by import or by
    the CLI; as the body's `user` (the upstream's field) it names no one, so the chat goes on without memory and
    says why. Reading, exporting and erasing such an id (one an earlier release stored) still works."""
    user = f"alice{char}evil"
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    refused = httpx.post(api + "/v1/chat/completions", json=body, headers={"X-Memory-User": user.encode()})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "X-Memory-User"
    assert f"U+{ord(char):04X}" in refused.json()["error"]["message"]
    for path in ("", "/import"):
        added = httpx.post(f"{api}/memories/{segment(user)}{path}", json=[{"text": "likes tea"}])
        assert added.status_code == 400 and added.json()["error"]["code"] == "invalid_user", path
    for method, path in (("GET", ""), ("GET", "/export"), ("DELETE", "")):
        assert httpx.request(method, f"{api}/memories/{segment(user)}{path}").status_code == 200, (method, path)
    upstream[0].reply("Hello!")
    answered = httpx.post(api + "/v1/chat/completions", json={**body, "user": user})
    assert answered.status_code == 200 and answered.json()["choices"][0]["message"]["content"] == "Hello!"
    assert answered.headers["x-memory-error"] == "user-invalid"
    code = main(["memories", "add", f"--user={user}", "likes tea", "--db", str(tmp_path / "m.db")], environ={})
    assert code == 2 and f"U+{ord(char):04X}" in capsys.readouterr().err
    for fine in ("👨\u200d👩\u200d👧", "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",  # ZWJ: emoji; ZWNJ: Persian
                 "\U0001f3f4\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f"):  # tags: a flag
        assert httpx.get(f"{api}/memories/{segment(fine)}").status_code == 200


def test_the_invisible_list_is_every_format_character_and_line_break_unicode_knows() -> None:
    """INVISIBLE is written out (Unicode 15.1); the running Python's Unicode database must not know a format
    character (Cf) or a line or paragraph separator (Zl, Zp) it lacks, but the three kinds kept on purpose. The
    OpenAPI pattern refuses the same characters of the Basic Multilingual Plane."""
    kept = {0x200C, 0x200D, *range(0xE0020, 0xE0080)}
    missing = [f"U+{point:04X}" for point in range(0x110000) if point not in kept
               and unicodedata.category(chr(point)) in ("Cf", "Zl", "Zp") and not INVISIBLE.fullmatch(chr(point))]
    assert missing == []
    assert not any(INVISIBLE.fullmatch(chr(point)) for point in kept)
    pattern = re.compile(USER_PATTERN.removesuffix("$") + r"\Z")  # `$` as ECMA-262 reads it: the end, no newline
    contextual = {0x200C, 0x200D, *range(0xFE00, 0xFE10), 0x180B, 0x180C, 0x180D, 0x180F, 0x2800}  # beyond a pattern
    for point in range(0x10000):
        if 0xD800 <= point < 0xE000 or point in contextual:
            continue
        assert bool(pattern.match(f"a{chr(point)}b")) == (check_user_id(f"a{chr(point)}b") is None), hex(point)


FLAG = "\U0001f3f4\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f"  # Scotland


@pytest.mark.parametrize(("user", "why"), [
    ("ali\u200dce", "U+200D"), ("ali\u200cce", "U+200C"), ("\u200d", "U+200D"), ("alice\ufe0f", "U+FE0F"),
    ("alice\U000e0041", "U+E0041"), ("alice\U000e007f", "U+E007F"), ("\U000e0041", "U+E0041"),
    (FLAG[:-1], "U+E0067"), (" ", "no visible character"), ("\u3000", "no visible character"),
    ("\xa0dave", "whitespace"), ("erin\u3000", "whitespace"), ("dave ", "whitespace"), ("\tdave", "control"),
    ("alice\U000e0100", "U+E0100"), ("alice\u180b", "U+180B"), ("alice\U000e0080", "U+E0080"),
    ("alice\u2065", "U+2065"), ("alice\ufff0", "U+FFF0"), ("\u2800", "no visible character"),
    ("\u00e9\u200c\u200c\u00e9", "U+200C"), ("zo\u00eb\ufe0f\ufe0f", "U+FE0F"), ("alice\u00a0\ufe0f", "U+FE0F"),
    ("a\u200c\u20e3", "U+200C"),
])
def test_what_is_kept_of_the_invisible_kinds_is_kept_only_where_it_belongs(user: str, why: str) -> None:
    """Joiners between two non-ASCII characters, variation selectors after one, tag characters inside an emoji
    flag: elsewhere they show nothing and make a look-alike of another id, as an id of nothing visible, or one
    padded with whitespace, would."""
    problem = check_user_id(user)
    assert problem is not None and why in problem
    for fine in ("👨\u200d👩\u200d👧", "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645", FLAG, "❤\ufe0fteam",
                 "1\ufe0f\u20e3team", "with space", "a\u00a0b", f"team {FLAG}", "\u2764\ufe0f\u200d\U0001f525",
                 "\u845b\U000e0100\u57ce", "\u1820\u180b\u1822"):
        assert check_user_id(fine) is None, fine


@pytest.mark.parametrize("header", ["\u2028", "\u2029", "\u3000", "\u00a0", "\u200d"])
def test_a_user_header_of_other_blanks_is_refused_not_taken_for_no_header(api: str, upstream: Upstream,
                                                                          header: str) -> None:
    """An empty user header (or spaces and tabs, HTTP's own blank) names no one; a header of any other blank
    character is a malformed id: a 400, never the body's `user` instead."""
    body = {"model": "m", "user": "carol", "messages": [{"role": "user", "content": "hi"}]}
    refused = httpx.post(api + "/v1/chat/completions", json=body, headers={"X-Memory-User": header.encode()})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "X-Memory-User"
    upstream[0].reply("Hello!")
    assert httpx.post(api + "/v1/chat/completions", json=body, headers={"X-Memory-User": ""}).status_code == 200


def test_an_id_an_earlier_release_stored_can_still_be_listed_exported_and_erased(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before ids that show as another were refused, any id without control characters was stored: its memories
    (and the users list's paging past it) stay reachable, so they can be exported and erased."""
    db = tmp_path / "m.db"
    legacy = "alice\u200bx"

    async def seed() -> None:
        store = await open_store(str(db), dimension=DIMENSION)
        try:
            await store.add(legacy, [NewMemory("User keeps bees")], np.ones((1, DIMENSION), dtype=np.float32))
        finally:
            await store.close()

    asyncio.run(seed())

    def cli(*argv: str) -> tuple[int, str]:
        code = main([*argv, "--db", str(db)], environ={"HOME": str(tmp_path)})
        return code, capsys.readouterr().out

    assert [m["text"] for m in orjson.loads(cli("memories", "list", f"--user={legacy}", "--json")[1])] == [
        "User keeps bees"]
    assert orjson.loads(cli("memories", "export", f"--user={legacy}")[1].splitlines()[0])["user"] == legacy
    assert cli("memories", "add", f"--user={legacy}", "Another")[0] == 2  # nothing new is filed under it
    assert orjson.loads(cli("memories", "erase", f"--user={legacy}", "--yes", "--json")[1])[0]["deleted"] == 1
    assert orjson.loads(cli("memories", "list", f"--user={legacy}", "--json")[1]) == []


@pytest.mark.parametrize("user", IDS)
def test_the_cli_takes_the_same_ids(user: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "m.db")

    def cli(*argv: str) -> str:
        assert main([*argv, "--db", db], environ={"HOME": str(tmp_path)}) == 0, capsys.readouterr().err
        return capsys.readouterr().out

    cli("memories", "add", f"--user={user}", "User keeps bees")
    cli("memories", "add", f"--user={user}x", "Someone else entirely")
    listed = orjson.loads(cli("memories", "list", f"--user={user}", "--json"))
    assert [(m["user"], m["text"]) for m in listed] == [(user, "User keeps bees")]
    assert [orjson.loads(line)["user"] for line in cli("memories", "export", f"--user={user}").splitlines()] == [user]
    assert orjson.loads(cli("memories", "erase", f"--user={user}", "--yes", "--json"))[0]["deleted"] == 1
    assert orjson.loads(cli("memories", "list", f"--user={user}", "--json")) == []
    assert len(orjson.loads(cli("memories", "list", f"--user={user}x", "--json"))) == 1
