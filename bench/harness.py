"""What every benchmark needs: processes on 127.0.0.1 that stop by themselves, percentiles, a table."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def process(args: Sequence[str], ready_url: str, env: dict[str, str] | None = None,
            timeout: float = 60, cwd: Path = ROOT) -> Iterator[subprocess.Popen[bytes]]:
    """Run a server process until the block ends; wait until `ready_url` answers 200."""
    with tempfile.TemporaryFile() as log:  # a pipe nobody reads would fill and stall the server
        proc = subprocess.Popen(list(args), cwd=cwd, env={**os.environ, **(env or {})},
                                stdout=subprocess.DEVNULL, stderr=log)
        try:
            _wait_ready(proc, args, ready_url, timeout, log)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_ready(proc: subprocess.Popen[bytes], args: Sequence[str], ready_url: str, timeout: float,
                log: IO[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"{' '.join(args)} exited: {log.read().decode(errors='replace')}")
        try:
            if httpx.get(ready_url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{' '.join(args)} did not become ready")
        time.sleep(0.05)


@contextmanager
def fake_upstream() -> Iterator[str]:
    """The instant upstream of bench/upstream.py in its own process; yields its base URL (…/v1)."""
    port = free_port()
    with process([sys.executable, "-m", "bench.upstream", str(port)], f"http://127.0.0.1:{port}/v1/models"):
        yield f"http://127.0.0.1:{port}/v1"


@dataclass
class Server:
    url: str  # base URL, ending in /v1
    proc: subprocess.Popen[bytes]

    @property
    def root(self) -> str:
        return self.url.removesuffix("/v1")


@contextmanager
def memory_proxy(upstream: str, data_dir: str, *extra: str, env: dict[str, str] | None = None,
                 source: Path = ROOT) -> Iterator[Server]:
    """`memory-proxy serve` in its own process, run from the checkout `source` (another one compares versions)."""
    port = free_port()
    args = [sys.executable, "-m", "proxy", "serve", "--port", str(port), "--upstream", upstream, *extra]
    env = {"MEMORY_PROXY_DATA_DIR": data_dir, "MEMORY_PROXY_LOG_LEVEL": "warning", "PYTHONPATH": str(source),
           **(env or {})}
    with process(args, f"http://127.0.0.1:{port}/readyz", env=env, timeout=120, cwd=source) as proc:
        yield Server(f"http://127.0.0.1:{port}/v1", proc)


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (uvicorn's workers are children of its supervisor)."""
    found = [pid]
    for tid in _listdir(f"/proc/{pid}/task"):
        try:
            children = Path(f"/proc/{pid}/task/{tid}/children").read_text().split()
        except OSError:
            continue
        for child in children:
            found += process_tree(int(child))
    return found


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def rss_mib(pid: int) -> float:
    """Resident memory of the process and its descendants (VmRSS, shared pages counted in each), in MiB."""
    total = 0
    for member in process_tree(pid):
        try:
            status = Path(f"/proc/{member}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


class RssSampler:
    """The peak RSS of a process tree while a block runs, sampled every 50 ms in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, rss_mib(self.pid))

    def __enter__(self) -> RssSampler:
        self.peak = rss_mib(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def event_loop_of(pid: int) -> str:
    """Which loop and HTTP parser a uvicorn process actually runs, from the native modules it mapped."""
    names = []
    for member in process_tree(pid):
        try:
            maps = Path(f"/proc/{member}/maps").read_text()
        except OSError:
            continue
        names = [n for n in ("uvloop", "httptools") if f"/{n}/" in maps]
        if names:
            break
    return " + ".join(names) or "asyncio + h11"


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


def histogram_totals(root: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of every histogram the proxy at `root` exposes on /metrics, summed over its labels, parsed with
    prometheus-client's own parser; compare two scrapes to get the mean over what happened in between."""
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, tuple[float, float]] = {}
    for family in text_string_to_metric_families(httpx.get(root + "/metrics", timeout=30).text):
        if family.type != "histogram":
            continue
        total = sum(s.value for s in family.samples if s.name.endswith("_sum"))
        count = sum(s.value for s in family.samples if s.name.endswith("_count"))
        totals[family.name] = (total, count)
    return totals


def mean_ms(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]], name: str) -> str:
    """The mean in ms of histogram `name` (seconds) over what happened between two `histogram_totals`."""
    total = after.get(name, (0.0, 0.0))[0] - before.get(name, (0.0, 0.0))[0]
    count = after.get(name, (0.0, 0.0))[1] - before.get(name, (0.0, 0.0))[1]
    return f"{total / count * 1000:.2f}" if count else "-"

