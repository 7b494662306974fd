"""The README's "The first ten minutes", run as written from a fresh install.

The commands are read from the README (its section's `sh` block), so the two cannot drift. They run in a copy of
the repository: a new venv with `pip install .` (the package as a user gets it, through the same package index
pip is configured with: ~1 minute here), then the demo upstream and the proxy as background processes on free
ports of 127.0.0.1 (the README's ports swapped for them), then the two curl calls. A fact told in the first must
be stored, and recalled in the second, a new conversation. The environment differs from a newcomer's in two
variables only: the data directory (XDG_DATA_HOME, a temporary one) and a longer recall budget.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.servers import free_port
from tests.test_demo import RECALL_BUDGET_MS

ROOT = Path(__file__).resolve().parent.parent
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", ".*_cache",
                                    ".hypothesis", "*.db", "*.db-wal", "*.db-shm", "results")


def walkthrough(readme: str) -> list[str]:
    """The commands of the README's "The first ten minutes": its `sh` block, continuation lines joined."""
    section = readme.split("\n## The first ten minutes\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```sh\n", 1)[1].split("\n```", 1)[0]
    return [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def wait_until_up(url: str, process: subprocess.Popen[bytes], log: Path, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while True:
        if process.poll() is not None:
            pytest.fail(f"{url} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{url} did not come up in {seconds} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


@contextmanager
def background(command: str, cwd: Path, env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run `command &` as the shell would, in a process group of its own that is ended at the block's end."""
    with log.open("wb") as out:
        process = subprocess.Popen(command.removesuffix("&").strip(), shell=True, cwd=cwd, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield process
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()


def run(command: str, cwd: Path, env: dict[str, str], timeout: float = 120) -> str:
    done = subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"{command!r} failed:\n{done.stdout.decode()[-2000:]}\n{done.stderr.decode()[-3000:]}"
    return done.stdout.decode()


def content(reply: str) -> Any:
    return orjson.loads(reply)["choices"][0]["message"]["content"]


def test_the_readme_has_five_commands_two_of_them_servers() -> None:
    commands = walkthrough((ROOT / "README.md").read_text())
    assert len(commands) == 5
    assert [c.endswith("&") for c in commands] == [False, True, True, False, False]
    assert "pip install ." in commands[0] and "demo-upstream" in commands[1] and " serve " in commands[2]


def test_the_first_ten_minutes_from_a_fresh_install(tmp_path: Path) -> None:
    commands = walkthrough((ROOT / "README.md").read_text())
    demo_port, proxy_port = free_port(), free_port()
    commands = [re.sub(r"\b8080\b", str(proxy_port), re.sub(r"\b9000\b", str(demo_port), c)) for c in commands]
    source = tmp_path / "memory-proxy"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("MEMORY_PROXY_", "VIRTUAL_ENV", "PYTHON"))}
    env["XDG_DATA_HOME"] = str(tmp_path / "data")  # where the proxy keeps its memories by default
    # A recall that misses its budget (50 ms) answers without memory, by design; a loaded CI machine can miss it.
    env["MEMORY_PROXY_RECALL_BUDGET_MS"] = str(RECALL_BUDGET_MS)
    install, demo, serve, tell, ask = commands
    proxy = f"http://127.0.0.1:{proxy_port}"

    run(install, source, env, timeout=900)
    with ExitStack() as servers:
        demo_process = servers.enter_context(background(demo, source, env, tmp_path / "demo.log"))
        wait_until_up(f"http://127.0.0.1:{demo_port}/v1/models", demo_process, tmp_path / "demo.log")
        proxy_process = servers.enter_context(background(serve, source, env, tmp_path / "proxy.log"))
        wait_until_up(f"{proxy}/readyz", proxy_process, tmp_path / "proxy.log")

        told = run(tell, source, env)
        assert content(told) == "Noted: you're vegetarian." and "<memory>" not in told
        deadline = time.monotonic() + 20
        while not (stored := httpx.get(f"{proxy}/memories/alice").json()["data"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [(m["text"], m["category"]) for m in stored] == [("User is vegetarian", "preference")]

        asked = run(ask, source, env)
        assert content(asked) == "How about a mushroom risotto tonight? I remember: User is vegetarian."
        page = httpx.get(f"{proxy}/ui", follow_redirects=True)  # the page's files came with the install
        assert page.status_code == 200 and "memory-proxy inspector" in page.text
    assert (tmp_path / "data" / "memory-proxy" / "memory.db").is_file()
