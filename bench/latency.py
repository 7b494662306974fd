"""Added latency of the proxy over calling the upstream directly, measured side by side in one run.

    python -m bench.latency [--requests 2000]

Each iteration calls the upstream directly, then through the proxy (interleaved, so machine drift hits both
alike); the figure that matters is the difference of the two distributions at each percentile.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable

import httpx

from bench.harness import fake_upstream, memory_proxy, ms, percentile, table

CHAT = {"model": "bench", "messages": [{"role": "user", "content": "What is the capital of Portugal?"}]}


def timed_get(client: httpx.Client, url: str) -> float:
    start = time.perf_counter()
    client.get(url).raise_for_status()
    return time.perf_counter() - start


def timed_chat(client: httpx.Client, url: str, headers: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    client.post(url, json=CHAT, headers=headers).raise_for_status()
    return time.perf_counter() - start


def timed_first_byte(client: httpx.Client, url: str, headers: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    with client.stream("POST", url, json={**CHAT, "stream": True}, headers=headers) as response:
        chunks = response.iter_raw()
        next(chunks)
        first = time.perf_counter() - start
        for _ in chunks:
            pass
    return first


def compare(name: str, direct: Callable[[], float], proxied: Callable[[], float], n: int) -> list[object]:
    for _ in range(min(200, n)):  # warm pools, caches and the JIT-less interpreter's branch predictors alike
        direct()
        proxied()
    a, b = [], []
    for _ in range(n):
        a.append(direct())
        b.append(proxied())
    row: list[object] = [name]
    for q in (50, 95, 99):
        row += [ms(percentile(a, q)), ms(percentile(b, q))]
    row += [ms(percentile(b, 50) - percentile(a, 50)), ms(percentile(b, 95) - percentile(a, 95))]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data, fake_upstream() as up, memory_proxy(up, data) as px, \
            httpx.Client(timeout=30) as client:
        rows = [
            compare("pass-through GET /v1/models", lambda: timed_get(client, up + "/models"),
                    lambda: timed_get(client, px + "/models"), args.requests),
            compare("chat, no user (non-stream)", lambda: timed_chat(client, up + "/chat/completions"),
                    lambda: timed_chat(client, px + "/chat/completions"), args.requests),
            compare("chat, no user (stream first byte)", lambda: timed_first_byte(client, up + "/chat/completions"),
                    lambda: timed_first_byte(client, px + "/chat/completions"), args.requests),
        ]
    print(f"{args.requests} interleaved requests per row, concurrency 1, times in ms\n")
    print(table(["scenario", "direct p50", "proxy p50", "direct p95", "proxy p95", "direct p99", "proxy p99",
                 "added p50", "added p95"], rows))


if __name__ == "__main__":
    main()
