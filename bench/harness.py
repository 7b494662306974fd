"""What every benchmark needs: processes on 127.0.0.1 that stop by themselves, percentiles, a table."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def process(args: Sequence[str], ready_url: str, env: dict[str, str] | None = None,
            timeout: float = 60) -> Iterator[subprocess.Popen[bytes]]:
    """Run a server process until the block ends; wait until `ready_url` answers 200."""
    log = tempfile.TemporaryFile()  # a pipe nobody reads would fill and stall the server
    proc = subprocess.Popen(list(args), cwd=ROOT, env={**os.environ, **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"{' '.join(args)} exited: {log.read().decode(errors='replace')}")
            try:
                if httpx.get(ready_url, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{' '.join(args)} did not become ready")
            time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@contextmanager
def fake_upstream() -> Iterator[str]:
    """The instant upstream of bench/upstream.py in its own process; yields its base URL (…/v1)."""
    port = free_port()
    with process([sys.executable, "-m", "bench.upstream", str(port)], f"http://127.0.0.1:{port}/v1/models"):
        yield f"http://127.0.0.1:{port}/v1"


@contextmanager
def memory_proxy(upstream: str, data_dir: str, *extra: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """`memory-proxy serve` in its own process; yields its base URL (…/v1)."""
    port = free_port()
    args = [sys.executable, "-m", "proxy", "serve", "--port", str(port), "--upstream", upstream, *extra]
    with process(args, f"http://127.0.0.1:{port}/readyz", env={"MEMORY_PROXY_DATA_DIR": data_dir, **(env or {})}):
        yield f"http://127.0.0.1:{port}/v1"


def percentile(samples: Sequence[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [list(map(str, header)), *[list(map(str, r)) for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
