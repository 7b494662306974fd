"""Soak: many concurrent streaming clients through the memory path, for a fixed time, on 127.0.0.1.

    python -m bench.soak --clients 500 --seconds 60

A real `memory-proxy serve` (its own process, a fresh SQLite file) in front of an instant upstream that echoes
each request's fact back inside a `<memory>` block (the answer is bench/upstream.py's, streamed the same way).
Each client is one end user on one keep-alive connection, sending turn after turn, each with a fact of its own:
six pseudo-words, so no two facts of a user come near the dedupe threshold (measured: cosine <= 0.78).

It passes when there were 0 errors (every stream complete, no block leaked), the proxy's RSS stayed flat (the
second half peaks within 20% of the first), and every fact sent is stored exactly once, read from the store
itself after the writes drained and the proxy stopped. Every loop is bounded by the clock and by a count.

Pacing: `--think` is the mean pause between a user's turns, `--token-ms` the gap between streamed events. The
defaults (10 s, 50 ms: a 1 s answer, then reading and typing) stay within what the in-process embedding model
can do on 2 cores; `--think 0 --token-ms 0` offers turns back to back, past that capacity: chats still answer
(recall fails open), but the bounded write queue then drops facts, and says so in the log and here.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench.harness import ROOT, free_port, ms, percentile, process, process_tree, rss_mib
from bench.upstream import ANSWER, read_body, stream_events

MAX_TURNS = 100_000  # per client: the clock ends the run long before
MARK_OPEN, MARK_CLOSE = "[[", "]]"
token_gap = 0.0  # seconds between the upstream's streamed events (`--token-ms`), set in its own process
CONSONANTS, VOWELS = "bcdfghjklmnprstvz", "aeiou"


# --- the upstream: bench/upstream.py's streamed answer, with the request's fact echoed in the block -------------

async def echo_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = await read_body(receive)
    if not scope["path"].endswith("/chat/completions"):
        payload = b'{"object":"list","data":[]}'
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": payload})
        return
    request = orjson.loads(body)
    question = next(m["content"] for m in reversed(request["messages"]) if m.get("role") == "user")
    text = ANSWER
    if b"<memory>" in body and MARK_OPEN in question:  # the proxy asked for a block: the fact goes in it
        fact = question.split(MARK_OPEN, 1)[1].split(MARK_CLOSE, 1)[0]
        text += "\n<memory>" + orjson.dumps([{"text": fact, "category": "fact"}]).decode() + "</memory>"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    for event in stream_events(request.get("model", "m"), text):
        await send({"type": "http.response.body", "body": event, "more_body": True})
        if token_gap:
            await asyncio.sleep(token_gap)
    await send({"type": "http.response.body", "body": b""})


# --- the clients ---------------------------------------------------------------------------------------------

@dataclass
class Tally:
    sent: dict[str, list[str]] = field(default_factory=dict)  # user → facts whose turn completed
    failed: dict[str, list[str]] = field(default_factory=dict)  # user → facts whose turn failed (may be stored)
    errors: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    memory_errors: Counter[str] = field(default_factory=Counter)  # x-memory-error values (fail-open recalls)
    turns: int = 0


def fact(rng: random.Random) -> str:
    return " ".join("".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(rng.randint(2, 3)))
                    for _ in range(6))


def request_bytes(user: str, text: str) -> bytes:
    body = orjson.dumps({"model": "soak", "stream": True, "messages": [
        {"role": "user", "content": f"Please remember this about me: {MARK_OPEN}{text}{MARK_CLOSE}"}]})
    return (b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            b"x-memory-user: %s\r\ncontent-length: %d\r\n\r\n%s" % (user.encode(), len(body), body))


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[bytes, bytes], bytes]:
    """Status, headers and the de-chunked body of one HTTP/1.1 response."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    headers = dict((k.strip().lower(), v.strip()) for k, _, v in (line.partition(b":") for line in lines[1:] if line))
    if b"content-length" in headers:
        return status, headers, await reader.readexactly(int(headers[b"content-length"]))
    body = bytearray()
    for _ in range(100_000):  # bounded: an answer is a few dozen chunks
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return status, headers, bytes(body)
        body += (await reader.readexactly(size + 2))[:-2]
    raise ValueError("endless chunked body")


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def exchange(connection: Connection | None, port: int, request: bytes
                   ) -> tuple[Connection, tuple[int, dict[bytes, bytes], bytes]]:
    """Send one request and read its answer, on the kept connection when the server has not closed it meanwhile
    (uvicorn closes keep-alive connections idle for 5 s): a reused connection that turns out closed before any
    byte of the answer is replaced once, as HTTP clients do; any other failure is the caller's to count."""
    for attempt in range(2):
        reused = connection is not None and not connection[0].at_eof()
        if not reused:
            if connection is not None:
                connection[1].close()
            connection = await asyncio.open_connection("127.0.0.1", port)
        assert connection is not None
        try:
            connection[1].write(request)
            return connection, await asyncio.wait_for(read_answer(connection[0]), 60)
        except (asyncio.IncompleteReadError, ConnectionResetError) as exc:
            stale = not isinstance(exc, asyncio.IncompleteReadError) or not exc.partial
            if not (reused and stale and attempt == 0):
                raise
            connection[1].close()
            connection = None
    raise AssertionError("unreachable")


async def client(number: int, port: int, deadline: float, think: float, tally: Tally) -> None:
    user = f"soak-{number}"
    rng = random.Random(number)
    tally.sent[user], tally.failed[user] = [], []
    connection: Connection | None = None
    if think:  # spread the first turns over one pause, as users who arrive at different times
        await asyncio.sleep(rng.uniform(0, think))
    for _ in range(MAX_TURNS):
        if time.monotonic() >= deadline:
            break
        text = fact(rng)
        started = time.perf_counter()
        try:
            connection, (status, headers, body) = await exchange(connection, port, request_bytes(user, text))
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, TimeoutError) as exc:
            tally.errors[type(exc).__name__] += 1
            tally.failed[user].append(text)
            if connection is not None:
                connection[1].close()
            connection = None
            continue
        tally.turns += 1
        if b"x-memory-error" in headers:
            tally.memory_errors[headers[b"x-memory-error"].decode()] += 1
        problem = ("status " + str(status) if status != 200 else "no [DONE]" if not body.endswith(b"data: [DONE]\n\n")
                   else "block leaked" if b"<memory" in body or text.encode() in body else None)
        if problem:
            tally.errors[problem] += 1
            tally.failed[user].append(text)
        else:
            tally.sent[user].append(text)
            tally.latencies.append(time.perf_counter() - started)
        if think:  # the user reads the answer and types the next message
            await asyncio.sleep(min(rng.uniform(0.5, 1.5) * think, max(0.0, deadline - time.monotonic())))
    if connection is not None:
        connection[1].close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its descendants, from /proc."""
    total = 0
    for member in process_tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / os.sysconf("SC_CLK_TCK")


class RssSeries:
    """The proxy's RSS every `every` seconds while the load runs."""

    def __init__(self, pid: int, every: float = 1.0) -> None:
        self.pid, self.every, self.samples = pid, every, [(0.0, rss_mib(pid))]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        start = time.monotonic()
        while not self.stop.wait(self.every):
            self.samples.append((time.monotonic() - start, rss_mib(self.pid)))

    def at(self, fraction: float) -> float:
        return self.samples[min(len(self.samples) - 1, round(fraction * (len(self.samples) - 1)))][1]


def run_loop(main: Coroutine[Any, Any, Tally]) -> Tally:
    """On uvloop when it is there (uvicorn[standard] brings it): the clients must cost less than the proxy."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    result: Tally = uvloop.run(main)
    return result


async def load(port: int, clients: int, seconds: float, think: float) -> Tally:
    tally = Tally()
    deadline = time.monotonic() + seconds
    await asyncio.gather(*(client(n, port, deadline, think, tally) for n in range(clients)))
    return tally


# --- after the run: the store ------------------------------------------------------------------------------------

def wait_drained(root: str, tally: Tally, seconds: float = 120) -> int:
    """Poll the API until every completed turn's fact is listed (or nothing changes for 10 s); how many are."""
    expected = sum(map(len, tally.sent.values()))
    last, since, stored = -1, time.monotonic(), 0
    with httpx.Client(timeout=30) as api:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            stored = sum(len(api.get(f"{root}/memories/{user}", params={"limit": 1000}).json()["data"])
                         for user in tally.sent)
            if stored >= expected:
                return stored
            if stored != last:
                last, since = stored, time.monotonic()
            elif time.monotonic() - since > 10:
                return stored
            time.sleep(1)
    return stored


async def audit(path: Path, tally: Tally) -> dict[str, int]:
    """Every fact sent against what the store holds: exactly once, missing, duplicated, or not sent at all."""
    from proxy.store.sqlite import SqliteStore

    store = await SqliteStore.open(str(path), dimension=384, dedupe_similarity=0.9)
    try:
        result: Counter[str] = Counter()
        for user, facts in tally.sent.items():
            held = Counter(m.text for m in await store.list(user, 1_000_000, include_history=True))
            for text in facts:
                count = held.pop(text, 0)
                result["stored once" if count == 1 else "missing" if count == 0 else "stored twice or more"] += 1
            result["unexpected"] += sum(n for text, n in held.items() if text not in tally.failed[user])
        result["integrity ok"] = int(await store.read(
            lambda conn: conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"))
        return dict(result)
    finally:
        await store.close()


# --- the run -----------------------------------------------------------------------------------------------------

@contextmanager
def echo_upstream(token_ms: float) -> Iterator[tuple[str, int]]:
    port = free_port()
    with process([sys.executable, "-m", "bench.soak", "--serve-upstream", str(port), "--token-ms", str(token_ms)],
                 f"http://127.0.0.1:{port}/v1/models") as proc:
        yield f"http://127.0.0.1:{port}/v1", proc.pid


@contextmanager
def memory_proxy(upstream: str, data: str, log: Path) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """`memory-proxy serve` on a fresh data dir, its log kept in `log` (bench.harness discards it)."""
    port = free_port()
    env = {"MEMORY_PROXY_DATA_DIR": data, "MEMORY_PROXY_LOG_LEVEL": "warning", "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-m", "proxy", "serve", "--port", str(port), "--upstream", upstream]
    with log.open("wb") as sink:
        proc = subprocess.Popen(args, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=sink)
        try:
            deadline = time.monotonic() + 120
            while not ready(f"http://127.0.0.1:{port}/readyz"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"memory-proxy did not start: {log.read_text(errors='replace')[-2000:]}")
                time.sleep(0.1)
            yield port, proc
        finally:
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def ready(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def run(clients: int, seconds: float, think: float, token_ms: float) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4 * clients + 256:  # client sockets here; client and upstream sockets in the proxy
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4 * clients + 256), hard))
    with tempfile.TemporaryDirectory(prefix="soak-") as data, echo_upstream(token_ms) as (upstream, upstream_pid):
        log = Path(data) / "proxy.log"
        with memory_proxy(upstream, data, log) as (port, proc):
            rss = RssSeries(proc.pid)
            rss.thread.start()
            started = time.monotonic()
            load_before = os.getloadavg()[0]
            cpu_before = (cpu_seconds(proc.pid), cpu_seconds(upstream_pid), time.process_time())
            tally = run_loop(load(port, clients, seconds, think))
            elapsed = time.monotonic() - started
            cpu = [(after - before) / elapsed for before, after in zip(cpu_before, (
                cpu_seconds(proc.pid), cpu_seconds(upstream_pid), time.process_time()), strict=True)]
            rss.stop.set()
            rss.thread.join()
            listed = wait_drained(f"http://127.0.0.1:{port}", tally)
            proc.send_signal(signal.SIGTERM)  # a clean stop: queued writes are stored, the WAL checkpointed
            proc.wait(60)
        checked = asyncio.run(audit(Path(data) / "memory.db", tally))
        warnings = Counter(line.split(": ", 1)[-1][:100] for line in log.read_text(errors="replace").splitlines()
                           if " WARNING " in line or " ERROR " in line)
    print(f"soak: {clients} streaming clients for {seconds:g} s through the memory path on 127.0.0.1, "
          f"{think:g} s mean pause between a client's turns, {token_ms:g} ms between streamed events; "
          f"machine load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(f"  CPU cores busy during the load: proxy {cpu[0]:.2f}, upstream {cpu[1]:.2f}, clients {cpu[2]:.2f} "
          f"(of {os.cpu_count()})")
    return report(elapsed, tally, rss, listed, checked, warnings)


def report(elapsed: float, tally: Tally, rss: RssSeries, listed: int, checked: dict[str, int],
           warnings: Counter[str]) -> int:
    sent = sum(map(len, tally.sent.values()))
    start = rss.samples[0][1]
    half = len(rss.samples) // 2
    first, second = max(r for _, r in rss.samples[1:half + 1]), max(r for _, r in rss.samples[half:])
    print(f"  turns {tally.turns} ({tally.turns / elapsed:.0f}/s), errors {sum(tally.errors.values())} "
          f"{dict(tally.errors) or ''}")
    if tally.latencies:
        print(f"  turn latency p50 {ms(percentile(tally.latencies, 50))} ms, p99 {ms(percentile(tally.latencies, 99))}"
              f" ms, max {ms(max(tally.latencies))} ms")
    print(f"  recall fail-open (x-memory-error): {dict(tally.memory_errors) or 'none'}")
    series = ", ".join(f"{rss.at(tenth / 10):.0f}" for tenth in range(1, 11))
    print(f"  proxy RSS MiB: before load {start:.0f}; each tenth of the run {series}; peak of the first half "
          f"{first:.0f}, of the second {second:.0f}")
    print(f"  facts sent {sent}, listed by the API after draining {listed}; in the store: {checked}")
    for message, count in warnings.most_common(8):
        print(f"  proxy log x{count}: {message}")
    # RSS moves with the allocator and with the caches filling (vectors of users with more memories each turn):
    # flat means the second half peaks within 20% of the first, not that it stands still.
    flat = second <= first * 1.20
    exact = checked.get("stored once", 0) == sent and not checked.get("unexpected") and checked.get("integrity ok")
    ok = not tally.errors and flat and bool(exact)
    print(f"  verdict: errors {'0' if not tally.errors else 'NOT 0'}, RSS {'flat' if flat else 'GREW'}, "
          f"every fact stored exactly once: {'yes' if exact else 'NO'} -> {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--think", type=float, default=10.0,
                        help="mean seconds a client pauses between turns (0: back to back, the hardest case)")
    parser.add_argument("--token-ms", type=float, default=50.0, help="ms between the upstream's streamed events")
    parser.add_argument("--serve-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_upstream:
        import uvicorn

        global token_gap
        token_gap = args.token_ms / 1000

        uvicorn.run(echo_app, host="127.0.0.1", port=args.serve_upstream, log_level="warning", access_log=False,
                    loop="uvloop", http="httptools", backlog=4096)
        return 0
    return run(args.clients, args.seconds, args.think, args.token_ms)


if __name__ == "__main__":
    sys.exit(main())
