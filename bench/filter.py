"""The block filter under pathological answers: its cost must stay linear in what the model emits.

    python -m bench.filter [--scale 0.1]

Two tables:
1. Throughput of the whole chat-stream filter (SSE decode + per-choice block filter + re-encode), MB/s of SSE in,
   for ordinary and pathological answers, beside the SSE decoder alone on the same bytes (what any SSE-aware
   proxy must do) as the baseline.
2. A pathological stream (20,000 one-newline deltas, a model stuck in a loop) through a real proxy vs straight to
   the upstream, and /healthz latency on the proxy while that stream runs vs while it is idle (the event loop
   must stay free).
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from collections.abc import Callable

import httpx
import orjson

from bench.harness import fake_upstream, memory_proxy, ms, percentile, table
from bench.upstream import deltas_events
from proxy.sse import SSEDecoder
from proxy.stream import ChatStreamFilter


def answers(scale: float) -> dict[str, list[str]]:
    n = max(100, int(20_000 * scale))
    prose = ("The quick brown fox jumps over the lazy dog while the model explains, at length, how proxies "
             "work and why streams matter. ") * max(1, n // 40)
    return {
        "prose in 4-character deltas, block at the end": [prose[i:i + 4] for i in range(0, len(prose), 4)]
        + ['\n<memory>[{"text": "User likes foxes"}]</memory>'],
        f"{n:,} one-newline deltas (a model in a loop)": ["\n"] * n,
        f"{n:,} deltas of 'a<b '": ["a<b "] * n,
        f"{n:,} deltas of inline code '`x` '": ["`x` "] * n,
        f"{n:,} code-fence lines": ["```\n", "x = 1\n"] * (n // 2),
        "one 4 MB line in one delta": ["word " * (800_000)],
        "a block that never closes (past the 64 KiB cap)": ["<memory>["] + ["1, "] * n,
    }


def sse(deltas: list[str]) -> list[bytes]:
    return deltas_events("m", deltas)


def rate(events: list[bytes], run: Callable[[list[bytes]], None], repeat: int = 3) -> float:
    """MB/s of SSE through `run`, best of `repeat`."""
    size = sum(map(len, events)) / 1e6
    best = min(_timed(run, events) for _ in range(repeat))
    return size / best


def _timed(run: Callable[[list[bytes]], None], events: list[bytes]) -> float:
    start = time.perf_counter()
    run(events)
    return time.perf_counter() - start


def decode_only(events: list[bytes]) -> None:
    decoder = SSEDecoder()
    for event in events:
        decoder.decode(event)
    decoder.flush()


def filtered(events: list[bytes]) -> None:
    stream = ChatStreamFilter()
    for event in events:
        stream.decode(event)
    stream.flush()


def filter_table(scale: float) -> str:
    rows = []
    for name, deltas in answers(scale).items():
        events = sse(deltas)
        rows.append([name, f"{sum(map(len, events)) / 1e6:.2f}", f"{rate(events, decode_only):.1f}",
                     f"{rate(events, filtered):.1f}"])
    return table(["answer", "SSE MB", "SSE decode alone, MB/s", "chat-stream filter, MB/s"], rows)


def healthz(client: httpx.Client, url: str, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        client.get(url).raise_for_status()
        samples.append(time.perf_counter() - start)
        time.sleep(0.005)
    return samples


def stream_seconds(client: httpx.Client, base: str, user: str | None) -> float:
    body = orjson.dumps({"model": "newlines", "stream": True, "messages": [{"role": "user", "content": "loop"}]})
    headers = {"content-type": "application/json", **({"x-memory-user": user} if user else {})}
    start = time.perf_counter()
    with client.stream("POST", base + "/chat/completions", content=body, headers=headers) as response:
        for _ in response.iter_bytes():
            pass
    return time.perf_counter() - start


def proxy_table(n: int) -> str:
    with fake_upstream() as upstream, tempfile.TemporaryDirectory() as data, \
            memory_proxy(upstream, data) as proxy, httpx.Client(timeout=120) as client:
        idle = healthz(client, proxy.root + "/healthz", n)
        direct = min(stream_seconds(client, upstream, None) for _ in range(3))
        through = min(stream_seconds(client, proxy.url, "bench-user") for _ in range(3))
        busy: list[float] = []
        runner = threading.Thread(target=lambda: [stream_seconds(client, proxy.url, "bench-user") for _ in range(3)])
        runner.start()
        with httpx.Client(timeout=30) as probe:
            while runner.is_alive() and len(busy) < 10 * n:
                busy += healthz(probe, proxy.root + "/healthz", 1)
        runner.join()
    rows = [["20,000 one-newline deltas, whole stream", "-", ms(direct), ms(through)],
            ["/healthz while idle (p50 / p99)", len(idle), "-", f"{ms(percentile(idle, 50))} / "
             f"{ms(percentile(idle, 99))}"],
            ["/healthz while the stream runs (p50 / p99)", len(busy), "-",
             f"{ms(percentile(busy, 50))} / {ms(percentile(busy, 99))}"]]
    return table(["measure (ms)", "samples", "direct", "through the proxy"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="fewer deltas and samples for a quick pass")
    args = parser.parse_args()
    print(filter_table(args.scale))
    print()
    print(proxy_table(max(20, int(200 * args.scale))))


if __name__ == "__main__":
    main()
