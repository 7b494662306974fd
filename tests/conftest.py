from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import openai
import pytest

from proxy import config
from proxy.app import create_app
from proxy.config import Settings
from proxy.demo import create_demo_app
from proxy.server import server_options
from tests.fakeupstream import FakeUpstream
from tests.servers import running


@pytest.fixture
def upstream() -> Iterator[tuple[FakeUpstream, str]]:
    """A fake OpenAI upstream on a real socket; yields it and its base URL (ending in /v1)."""
    fake = FakeUpstream()
    with running(fake.app) as url:
        yield fake, url + "/v1"


@pytest.fixture
def demo_upstream() -> Iterator[str]:
    """The demo upstream that ships with the package (proxy/demo.py) on a real socket; its base URL (/v1)."""
    with running(create_demo_app()) as url:
        yield url + "/v1"


@pytest.fixture
def settings_for(tmp_path: Path) -> Callable[..., Settings]:
    def make(upstream_url: str, **overrides: Any) -> Settings:
        # Recall answers within 50 ms on a quiet machine, not on a loaded CI runner: tests that assert what was
        # recalled must not fail open for lack of time. The budget itself is tested with budgets of its own.
        overrides = {"recall_budget_ms": 5000.0, **overrides}
        return config.load(environ={"HOME": str(tmp_path)},
                           overrides={"upstream": upstream_url, "data_dir": str(tmp_path / "data"), **overrides})
    return make


@pytest.fixture
def start_proxy() -> Iterator[Callable[..., str]]:
    """Start a real proxy server for the given settings, with the options `serve` gives uvicorn (proxy/limits.py);
    returns its base URL. Stopped at the test's end."""
    with ExitStack() as stack:
        def start(settings: Settings, **app_options: Any) -> str:
            app_options.setdefault("environ", {})  # no forward proxy from the machine's environment
            return stack.enter_context(running(create_app(settings, **app_options), **server_options(settings)))
        yield start


@pytest.fixture
def proxy(upstream: tuple[FakeUpstream, str], settings_for: Callable[..., Settings],
          start_proxy: Callable[..., str]) -> str:
    """A proxy in front of the fake upstream, with default settings; its base URL."""
    return start_proxy(settings_for(upstream[1]))


@pytest.fixture
def patient_proxy(upstream: tuple[FakeUpstream, str], settings_for: Callable[..., Settings],
                  start_proxy: Callable[..., str]) -> str:
    """The default proxy with a generous recall budget, for tests that count what memory does: on a busy machine
    a recall over the default 50 ms would answer without memory."""
    return start_proxy(settings_for(upstream[1], recall_budget_ms=5000))


@pytest.fixture
def client(proxy: str) -> Iterator[openai.OpenAI]:
    """The official OpenAI SDK pointed at the proxy, as an app would be."""
    with openai.OpenAI(base_url=proxy + "/v1", api_key="sk-client", max_retries=0) as sdk:
        yield sdk


@pytest.fixture
def serve(settings_for: Callable[..., Settings], start_proxy: Callable[..., str]
          ) -> Iterator[Callable[..., tuple[FakeUpstream, str, str]]]:
    """Start a fake upstream (with a chat template's rules) and a proxy in front of it: (fake, its URL, proxy)."""
    with ExitStack() as stack:
        def start(template: str | None = None, **settings: Any) -> tuple[FakeUpstream, str, str]:
            fake = FakeUpstream(template)
            url = stack.enter_context(running(fake.app)) + "/v1"
            return fake, url, start_proxy(settings_for(url, **settings))
        yield start
