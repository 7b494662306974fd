"""Added latency of the proxy over calling the upstream directly, measured side by side in one run.

Each iteration calls the upstream directly, then through the proxy (interleaved, so machine drift hits both
alike); the figure that matters is the difference of the two distributions at each percentile. Concurrency 1.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx
import orjson

from bench.harness import ms, percentile
from bench.seed import question

CHAT = {"model": "bench", "messages": [{"role": "user", "content": "What is the capital of Portugal?"}]}
Timing = tuple[float, float]  # (first byte, complete) in seconds
Call = Callable[[int], Timing]


# One counter for the whole run: rows reusing question(i) would find the last row's vectors in the query cache.
ASKED = itertools.count(10_000_000)


def chat_body(i: int, memory: bool, stream: bool) -> bytes:
    text = question(next(ASKED)) if memory else CHAT["messages"][0]["content"]
    return orjson.dumps({"model": "bench", "messages": [{"role": "user", "content": text}], "stream": stream})


def responses_body(i: int, memory: bool, stream: bool) -> bytes:
    """A Responses API request (`POST /v1/responses`) with the same question as chat_body."""
    text = question(next(ASKED)) if memory else CHAT["messages"][0]["content"]
    return orjson.dumps({"model": "bench", "input": text, "stream": stream})


def timed(client: httpx.Client, method: str, url: str, body: bytes | None = None,
          headers: dict[str, str] | None = None) -> Timing:
    start = time.perf_counter()
    with client.stream(method, url, content=body, headers=headers) as response:
        first = 0.0
        for _ in response.iter_raw():
            first = first or time.perf_counter() - start
        response.raise_for_status()
    return first, time.perf_counter() - start


def get(client: httpx.Client, url: str) -> Call:
    return lambda i: timed(client, "GET", url)


def chat(client: httpx.Client, url: str, *, stream: bool, user: Callable[[int], str] | None = None,
         body: Callable[[int, bool, bool], bytes] = chat_body) -> Call:
    """POST a chat (or, with `body=responses_body`, a Responses API call); with `user`, as that user (the memory
    path) and with a new question each time."""
    def call(i: int) -> Timing:
        headers = {"content-type": "application/json"}
        if user:
            headers["x-memory-user"] = user(i)
        return timed(client, "POST", url, body(i, user is not None, stream), headers)
    return call


@dataclass
class Samples:
    direct: list[Timing]
    proxied: list[Timing]


def interleave(direct: Call, proxied: Call, n: int, warmup: int) -> Samples:
    for i in range(warmup):  # warm pools, caches and the model alike
        direct(-1 - i)
        proxied(-1 - i)
    samples = Samples([], [])
    for i in range(n):
        samples.direct.append(direct(i))
        samples.proxied.append(proxied(i))
    return samples


def row(name: str, direct: Sequence[float], proxied: Sequence[float]) -> list[object]:
    cells: list[object] = [name]
    for q in (50, 95, 99):
        cells += [ms(percentile(direct, q)), ms(percentile(proxied, q))]
    cells += [ms(percentile(proxied, q) - percentile(direct, q)) for q in (50, 95, 99)]
    return cells


def rows(name: str, samples: Samples, stream: bool) -> list[list[object]]:
    complete = row(name + (", full stream" if stream else ""), [t[1] for t in samples.direct],
                   [t[1] for t in samples.proxied])
    if not stream:
        return [complete]
    first = row(name + ", first byte", [t[0] for t in samples.direct], [t[0] for t in samples.proxied])
    return [first, complete]


HEADER = ["scenario", "direct p50", "proxy p50", "direct p95", "proxy p95", "direct p99", "proxy p99",
          "added p50", "added p95", "added p99"]


def passthrough_rows(client: httpx.Client, upstream: str, proxy: str, n: int) -> list[list[object]]:
    warm = min(200, n)
    out = rows("pass-through GET /v1/models", interleave(get(client, upstream + "/models"),
                                                         get(client, proxy + "/models"), n, warm), False)
    for stream in (False, True):
        samples = interleave(chat(client, upstream + "/chat/completions", stream=stream),
                             chat(client, proxy + "/chat/completions", stream=stream), n, warm)
        out += rows("chat, no user" + (" (stream)" if stream else ""), samples, stream)
    return out


def memory_rows(client: httpx.Client, upstream: str, proxy: str, n: int, label: str,
                user: Callable[[int], str]) -> list[list[object]]:
    """The memory path: recall (a new question each time, so no cache helps), inject, forward, filter, store."""
    out = []
    for stream in (False, True):
        samples = interleave(chat(client, upstream + "/chat/completions", stream=stream, user=user),
                             chat(client, proxy + "/chat/completions", stream=stream, user=user), n, min(50, n))
        out += rows(f"memory, {label}" + (" (stream)" if stream else ""), samples, stream)
    return out


def responses_rows(client: httpx.Client, upstream: str, proxy: str, n: int, label: str,
                   user: Callable[[int], str]) -> list[list[object]]:
    """`POST /v1/responses`: without a user (forwarded as it came), and on the memory path (recall, inject, the
    Responses stream filter, store)."""
    out = []
    for who, name in ((None, "Responses API, no user"), (user, f"Responses API, memory, {label}")):
        for stream in (False, True):
            samples = interleave(chat(client, upstream + "/responses", stream=stream, user=who, body=responses_body),
                                 chat(client, proxy + "/responses", stream=stream, user=who, body=responses_body),
                                 n, min(50, n))
            out += rows(name + (" (stream)" if stream else ""), samples, stream)
    return out
