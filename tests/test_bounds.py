"""Issue 17, section 3 (client side): with `context_budgets` set, one 30 MB user message costs memory bounded by
its size, with a user named and without. The proxy runs as `memory-proxy serve` in a process of its own, whose
peak RSS (VmHWM) is read before and after; the client and the fake upstream live in the test process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson

from tests.fakeupstream import FakeUpstream
from tests.pgserver import free_port

Upstream = tuple[FakeUpstream, str]
MESSAGE_BYTES = 30 * 1024 * 1024
# Before the fix these two requests took +3.6 GiB here (the issue saw +2.45 GiB for one); after it, +36 MiB. What
# they may cost: the body read, the parsed JSON string, the request re-serialised for the upstream, and the
# allocator's slack: a small multiple of the body.
BOUND = 4 * MESSAGE_BYTES


def peak_rss(pid: int) -> int:
    """The process's peak resident set size (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/PID/status")


def serve(url: str, tmp_path: Path, **settings: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "HOME": str(tmp_path), "MEMORY_PROXY_DATA_DIR": str(tmp_path / "data"),
           **{f"MEMORY_PROXY_{name.upper()}": value for name, value in settings.items()}}
    process = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--upstream", url, "--port", str(port),
                                "--log-level", "warning"], env=env, stdin=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/readyz").status_code == 200:
                return process, base
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            raise RuntimeError("memory-proxy serve exited")
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("memory-proxy serve did not become ready")


def chat(base: str, text: str, user: str | None) -> httpx.Response:
    body = orjson.dumps({"model": "gpt-4o-mini", "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "earlier question"},
        {"role": "assistant", "content": "earlier answer"}, {"role": "user", "content": text}]})
    headers = {"content-type": "application/json", **({"x-memory-user": user} if user else {})}
    return httpx.post(base + "/v1/chat/completions", content=body, headers=headers, timeout=300)


def test_a_30_mb_message_with_context_budgets_costs_bounded_memory(upstream: Upstream, tmp_path: Path) -> None:
    fake, url = upstream
    process, base = serve(url, tmp_path, context_budgets="*=8000")
    try:
        for user in (None, "alice"):  # warm up every path first: what is measured is the big message alone
            fake.reply("ok")
            assert chat(base, "a short question", user).status_code == 200
        before = peak_rss(process.pid)
        words = ("lorem ipsum dolor sit amet " * (MESSAGE_BYTES // 27 + 1))[:MESSAGE_BYTES]
        for user in (None, "alice"):
            fake.reply("ok")
            response = chat(base, words, user)
            assert response.status_code == 200, response.text[:300]
            sent = fake.chats[-1].json()["messages"]
            assert [m["content"][:20] for m in sent if m["role"] != "system"] == [words[:20]]  # older turn left out
        grown = peak_rss(process.pid) - before
        assert grown < BOUND, f"peak RSS grew by {grown / 2**20:.0f} MiB for a {MESSAGE_BYTES / 2**20:.0f} MiB message"
    finally:
        process.terminate()
        process.wait(timeout=30)
