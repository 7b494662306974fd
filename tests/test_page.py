"""The inspector page (/ui) in a real headless Chromium, against a real proxy (real model, real SQLite) whose
memories were made the real way: chats with the demo upstream, which writes `<memory>` blocks.

Every test fails on an uncaught script error and on any request the page makes outside the proxy's origin.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from playwright.sync_api import Browser, Page, expect

from proxy.config import Settings
from proxy.inspector import CONTENT_SECURITY_POLICY
from tests.browser import chromium
from tests.test_demo import RECALL_BUDGET_MS

ADMIN = "admin-token-for-the-page-0123"
KEY = "pk-acme-for-the-page-0123456"
XSS = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script> & "quotes" </memory>'
expect.set_options(timeout=20_000)  # a shared 2-core machine: the first embedding can take seconds


def wait_for(what: str, probe: Callable[[], Any]) -> Any:
    """Poll `probe` until it returns something truthy (writes land off the request path); fail after 20 s."""
    deadline = time.monotonic() + 20
    while not (found := probe()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)
    return found


def chat(proxy: str, user: str, text: str, session: str) -> str:
    with openai.OpenAI(base_url=proxy + "/v1", api_key="unused", max_retries=0) as client:
        reply = client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": text}],
            extra_headers={"X-Memory-User": user, "X-Memory-Session": session})
    return reply.choices[0].message.content or ""


def memories(proxy: str, user: str, **headers: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{proxy}/memories/{user}", params={"include_history": "true"}, headers=headers)
    response.raise_for_status()
    return list(response.json()["data"])


def seed(proxy: str) -> None:
    """ana: told two facts, then moved (the demo model replaces the old home: history), in two sessions; bob: a
    memory that is markup; a user id that needs encoding."""
    chat(proxy, "ana", "Hi! I'm vegetarian and I live in Porto.", "trip-1")
    wait_for("ana's first memories", lambda: len(memories(proxy, "ana")) == 2)
    chat(proxy, "ana", "I moved to Lisbon.", "trip-2")
    wait_for("the move to replace the old home", lambda: len(memories(proxy, "ana")) == 3)
    httpx.post(f"{proxy}/memories/bob", json={"text": XSS}).raise_for_status()
    httpx.post(f"{proxy}/memories/zo%C3%AB%20o'neil", json={"text": "Zoë plays the cello"}).raise_for_status()
    wait_for("conversation excerpts", lambda: httpx.get(f"{proxy}/memories/ana/search", params={
        "q": "Porto", "kind": "conversation"}).json()["data"])


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched


@pytest.fixture
def open_page(browser: Browser) -> Iterator[Callable[[str], Page]]:
    """Open /ui of a proxy in a fresh browser context; checks at the end that the page threw nothing and
    fetched nothing outside the proxy."""
    contexts, errors, outside = [], [], []

    def open_(proxy: str) -> Page:
        context = browser.new_context(accept_downloads=True)
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on("request", lambda request: None if request.url.startswith((proxy + "/", "blob:", "data:"))
                else outside.append(request.url))
        page.goto(proxy + "/ui/")
        return page

    yield open_
    for context in contexts:
        context.close()
    assert errors == [], "the page threw"
    assert outside == [], "the page fetched something outside the proxy"


def card(page: Page, text: str) -> Any:
    return page.locator("#memory-list > li.memory").filter(has=page.locator(":scope > p.text", has_text=text))


def test_the_page_is_served_with_its_security_headers(demo_upstream: str, settings_for: Callable[..., Settings],
                                                      start_proxy: Callable[..., str]) -> None:
    proxy = start_proxy(settings_for(demo_upstream, admin_token=ADMIN))  # the files need no token: no data
    page = httpx.get(f"{proxy}/ui/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert "script-src 'self';" in CONTENT_SECURITY_POLICY and "unsafe-inline" not in CONTENT_SECURITY_POLICY
    assert page.headers["x-content-type-options"] == "nosniff" and page.headers["x-frame-options"] == "DENY"
    assert httpx.get(f"{proxy}/ui/app.js").headers["content-type"].startswith(("text/javascript",
                                                                                 "application/javascript"))
    assert httpx.get(f"{proxy}/ui", follow_redirects=True).url.path == "/ui/"
    missing = httpx.get(f"{proxy}/ui/nope.js")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert httpx.get(f"{proxy}/users").status_code == 401  # the data is behind the token


def test_list_search_edit_forget_export_erase_without_a_token(
        demo_upstream: str, settings_for: Callable[..., Settings], start_proxy: Callable[..., str],
        open_page: Callable[[str], Page], tmp_path: Path) -> None:
    proxy = start_proxy(settings_for(demo_upstream, session_history="store", min_similarity=-1.0,
                                     recall_budget_ms=RECALL_BUDGET_MS))
    seed(proxy)
    page = open_page(proxy)
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.accept()))

    expect(page.locator("#user-list button")).to_have_text(["ana", "bob", "zoë o'neil"])
    expect(page.locator("#connection")).to_contain_text("without a token")
    page.get_by_role("button", name="ana", exact=True).click()
    expect(page.locator("#user-title")).to_have_text("ana")

    # Newest first; the old home is the history of the new one; category, source and expiry shown.
    expect(page.locator("#memory-list > li.memory > p.text")).to_have_text(["User lives in Lisbon",
                                                                             "User is vegetarian"])
    lisbon = card(page, "User lives in Lisbon")
    expect(lisbon.locator("details.history summary")).to_have_text("1 earlier version")
    expect(lisbon.locator("details.history li")).to_contain_text("User lives in Porto")
    expect(lisbon.locator(":scope > p.meta").first).to_contain_text("fact")
    expect(lisbon.locator(":scope > p.meta").first).to_contain_text("source: inline")
    expect(lisbon.locator(":scope > p.meta").first).to_contain_text("never expires")
    expect(page.locator("#memory-count")).to_have_text("(2 active, 1 earlier versions)")

    # Sessions, newest first; a session's messages are what the client saw (no <memory> block).
    expect(page.locator("#session-list > li > p.text")).to_have_text(["trip-2", "trip-1"])
    trip = page.locator("#session-list > li").filter(has_text="trip-1")
    trip.get_by_role("button", name="Show messages").click()
    expect(trip.locator(".messages li")).to_have_text([
        "userHi! I'm vegetarian and I live in Porto.",
        "assistantNoted: you're vegetarian. Noted: you live in Porto."])

    # Search by meaning, then in past conversations.
    page.fill("#search-query", "Where does the user live?")
    page.select_option("#search-kind", "memory")
    page.get_by_role("button", name="Search").click()
    expect(page.locator("#result-list > li > p.text").first).to_have_text("User lives in Lisbon")
    expect(page.locator("#result-list .score").first).to_contain_text("score 0.")
    page.select_option("#search-kind", "conversation")
    page.fill("#search-query", "Porto")
    page.get_by_role("button", name="Search").click()
    expect(page.locator("#result-list > li.excerpt > p.text").first).to_contain_text("Porto")
    page.get_by_role("button", name="Clear").click()
    expect(page.locator("#results")).to_be_hidden()

    # Edit: text and category; a secret is refused by the API and the page says why.
    lisbon.get_by_role("button", name="Edit").click()
    editing = page.locator("#memory-list li.editing")
    editing.locator("textarea").fill("my password is hunter2hunter2")
    editing.get_by_role("button", name="Save").click()
    expect(page.locator("#error")).to_contain_text("400")
    expect(page.locator("#error")).to_contain_text("secrets are never stored")
    editing.locator("textarea").fill("User lives in Lisbon, by the river")
    editing.locator("input.edit-category").fill("Preferences")  # mapped to one of the five categories
    editing.get_by_role("button", name="Save").click()
    expect(page.locator("#notice")).to_have_text("Saved.")
    expect(page.locator("#error")).to_be_hidden()
    edited = card(page, "User lives in Lisbon, by the river")
    expect(edited.locator(":scope > p.meta .category")).to_have_text("preference")
    [stored] = [m for m in memories(proxy, "ana") if m["text"] == "User lives in Lisbon, by the river"]
    assert stored["category"] == "preference" and not stored["superseded_by"]

    # Forget one memory (after a confirmation).
    card(page, "User is vegetarian").get_by_role("button", name="Forget").click()
    expect(page.locator("#memory-list > li.memory > p.text")).to_have_text(["User lives in Lisbon, by the river"])
    assert dialogs == ["Forget this memory?\n\nUser is vegetarian"]
    assert "User is vegetarian" not in [m["text"] for m in memories(proxy, "ana")]

    # Export: the JSON Lines download, history included.
    with page.expect_download() as download:
        page.get_by_role("button", name="Export (JSON Lines)").click()
    exported = [orjson.loads(line) for line in Path(download.value.path()).read_bytes().splitlines()]
    assert sorted(m["text"] for m in exported) == ["User lives in Lisbon, by the river", "User lives in Porto"]
    assert download.value.suggested_filename == "memories-ana.jsonl"

    # Erase, only once the user id is typed.
    page.get_by_role("button", name="Erase user…").click()
    expect(page.locator("#erase-dialog")).to_be_visible()
    expect(page.locator("#erase-submit")).to_be_disabled()
    page.fill("#erase-confirm", "an")
    expect(page.locator("#erase-submit")).to_be_disabled()
    page.fill("#erase-confirm", "ana")
    page.locator("#erase-submit").click()
    expect(page.locator("#notice")).to_have_text("Erased ana: 2 memories and 2 conversations.")
    expect(page.locator("#user-list button")).to_have_text(["bob", "zoë o'neil"])
    expect(page.locator("#user")).to_be_hidden()
    assert memories(proxy, "ana") == [] and httpx.get(f"{proxy}/sessions/ana").json()["data"] == []
    assert [u["id"] for u in httpx.get(f"{proxy}/users").json()["data"]] == ["bob", "zoë o'neil"]

    # Stored markup stays text.
    page.get_by_role("button", name="bob", exact=True).click()
    expect(page.locator("#memory-list > li.memory > p.text")).to_have_text([XSS])
    assert page.locator("#memory-list img, #memory-list script").count() == 0
    assert page.evaluate("window.pwned") is None

    # A user id that needs encoding, and the selection survives a reload (#user=…).
    page.get_by_role("button", name="zoë o'neil").click()
    expect(page.locator("#memory-list > li.memory > p.text")).to_have_text(["Zoë plays the cello"])
    page.reload()
    expect(page.locator("#user-title")).to_have_text("zoë o'neil")
    expect(page.locator("#memory-list > li.memory > p.text")).to_have_text(["Zoë plays the cello"])


def test_with_the_admin_token_and_a_proxy_key(demo_upstream: str, settings_for: Callable[..., Settings],
                                              start_proxy: Callable[..., str],
                                              open_page: Callable[[str], Page]) -> None:
    proxy = start_proxy(settings_for(demo_upstream, admin_token=ADMIN, proxy_keys=f"acme:{KEY}",
                                     upstream_key="unused"))
    admin = {"Authorization": f"Bearer {ADMIN}"}
    httpx.post(f"{proxy}/memories/carol", json={"text": "Carol is outside every tenant"}, headers=admin)
    httpx.post(f"{proxy}/memories/dan", json={"text": "Dan is in acme"}, headers={"Authorization": f"Bearer {KEY}"})
    httpx.post(f"{proxy}/memories/erin", json={"text": "Erin is in acme too"},
               headers={**admin, "X-Memory-Tenant": "acme"}).raise_for_status()
    page = open_page(proxy)

    # No token: the page says what is missing instead of showing nothing.
    expect(page.locator("#error")).to_contain_text("401: this endpoint needs the admin token")
    expect(page.locator("#connection")).to_have_text("Not connected.")
    expect(page.locator("#user-list button")).to_have_count(0)
    page.fill("#token", "not-the-token")
    page.get_by_role("button", name="Connect").click()
    expect(page.locator("#error")).to_contain_text("401")
    expect(page.locator("#user-list button")).to_have_count(0)

    # The admin token: users of no tenant, or of the tenant named.
    page.fill("#token", ADMIN)
    page.get_by_role("button", name="Connect").click()
    expect(page.locator("#user-list button")).to_have_text(["carol"])
    expect(page.locator("#error")).to_be_hidden()
    page.fill("#tenant", "acme")
    page.get_by_role("button", name="Connect").click()
    expect(page.locator("#user-list button")).to_have_text(["dan", "erin"])
    expect(page.locator("#connection")).to_contain_text('tenant "acme"')
    page.get_by_role("button", name="erin").click()
    expect(page.locator("#memory-list > li.memory > p.text")).to_have_text(["Erin is in acme too"])
    page.on("dialog", lambda dialog: dialog.accept())
    card(page, "Erin is in acme too").get_by_role("button", name="Forget").click()
    expect(page.locator("#memories-empty")).to_be_visible()
    assert memories(proxy, "erin", **admin, **{"X-Memory-Tenant": "acme"}) == []
    page.reload()  # the token is kept for this tab
    expect(page.locator("#user-list button")).to_have_text(["dan"])

    # A proxy key sees its own tenant only, whatever tenant is typed.
    page.fill("#token", KEY)
    page.fill("#tenant", "")
    page.get_by_role("button", name="Connect").click()
    expect(page.locator("#user-list button")).to_have_text(["dan"])
    page.get_by_role("button", name="dan").click()
    page.fill("#search-query", "which company")
    page.get_by_role("button", name="Search").click()
    expect(page.locator("#result-list > li > p.text")).to_have_text(["Dan is in acme"])

    # Forgetting the token: back to the error, not a blank page.
    page.get_by_role("button", name="Forget token").click()
    expect(page.locator("#error")).to_contain_text("401")
    expect(page.locator("#user-list button")).to_have_count(0)


@pytest.mark.parametrize(("required", "outcome"), [("0", "1 skipped"), ("1", "1 error")])
def test_without_chromium_developers_get_a_loud_skip_and_ci_a_failure(required: str, outcome: str,
                                                                      tmp_path: Path) -> None:
    env = {"PATH": str(Path(sys.executable).parent), "HOME": str(tmp_path), "MEMORY_PROXY_CHROMIUM": "/nonexistent",
           "MEMORY_PROXY_REQUIRE_BROWSER": required}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                           f"{__file__}::test_with_the_admin_token_and_a_proxy_key"],
                          cwd=Path(__file__).parent.parent, env=env, capture_output=True, text=True, timeout=300)
    assert outcome in done.stdout and "NO BROWSER: /nonexistent not found" in done.stdout, done.stdout
    assert (done.returncode == 0) == (required == "0")
