"""Take the README's screenshot of the inspector page: `python -m tests.screenshot [docs/inspector.png]`.

Everything is real and local, as in tests/test_page.py: the demo upstream, a proxy with the bundled model on a
throwaway SQLite file, memories made by chatting, Debian's Chromium driven by Playwright.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from proxy import config
from proxy.app import create_app
from proxy.demo import create_demo_app
from tests.browser import chromium
from tests.servers import running
from tests.test_demo import RECALL_BUDGET_MS
from tests.test_page import chat, memories, wait_for

CHATS = [
    ("ana", "weekend", "Hi! My name is Ana. I'm vegetarian and I live in Porto."),
    ("ana", "weekend", "I'm allergic to peanuts, what could I bake?"),
    ("ana", "work", "I work at a bakery"),
    ("ana", "moving", "Big news: I moved to Lisbon!"),
    ("ben", "intro", "I'm vegan and my favourite colour is green"),
    ("chen", "intro", "I live in Taipei"),
]


def main(target: str = "docs/inspector.png") -> None:
    with tempfile.TemporaryDirectory() as home, running(create_demo_app()) as demo:
        settings = config.load(environ={"HOME": home}, overrides={
            "upstream": demo + "/v1", "data_dir": home, "session_history": "store", "min_similarity": -1.0,
            "recall_budget_ms": RECALL_BUDGET_MS})
        with running(create_app(settings)) as proxy:
            for user, session, text in CHATS:
                count = len(memories(proxy, user))
                chat(proxy, user, text, session)
                wait_for(f"{user}'s memory", lambda user=user, count=count: len(memories(proxy, user)) > count)
            with chromium() as browser:
                page = browser.new_page(viewport={"width": 1200, "height": 860}, device_scale_factor=1)
                page.goto(proxy + "/ui/#user=ana")
                page.locator("#memory-list li.memory").first.wait_for()
                page.locator("#memory-list details.history").first.evaluate("details => details.open = true")
                page.fill("#search-query", "where does she live?")
                page.click("#search button[type=submit]")
                page.locator("#result-list li").first.wait_for()
                page.screenshot(path=target, full_page=True)
    print(f"wrote {Path(target).resolve()}")


if __name__ == "__main__":
    main(*sys.argv[1:])
