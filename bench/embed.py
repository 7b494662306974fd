"""Speed of an embedding model through the proxy's model thread (proxy/batching.py), in this process.

    python -m bench.embed [--model use-multilingual|minilm-l6] [--threads 1] [--rounds 300]

Rows: a short query alone (blocking `encode`, and `embed` with its hop to the model thread), a batch of 32,
a cache hit, and 64 concurrent `embed` calls (micro-batched) against the same 64 awaited one after another.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bench.harness import ms, percentile, table
from proxy.embed import MODELS, load_embedder

QUERY = "What did I say about my sister's wedding?"
TOPICS = ["cats", "tax law", "the moon", "jazz piano", "sourdough", "rust", "marathons", "tulips"]


def texts(n: int, tag: str) -> list[str]:
    """Distinct short texts (so neither the cache nor deduplication skips work)."""
    return [f"{tag} {i}: my notes about {TOPICS[i % len(TOPICS)]} from last week" for i in range(n)]


def sample_sync(run: Callable[[int], object], rounds: int) -> list[float]:
    for i in range(min(20, rounds)):
        run(-1 - i)
    samples = []
    for i in range(rounds):
        start = time.perf_counter()
        run(i)
        samples.append(time.perf_counter() - start)
    return samples


async def sample_async(run: Callable[[int], Awaitable[object]], rounds: int) -> list[float]:
    for i in range(min(20, rounds)):
        await run(-1 - i)
    samples = []
    for i in range(rounds):
        start = time.perf_counter()
        await run(i)
        samples.append(time.perf_counter() - start)
    return samples


def row(name: str, samples: list[float], texts_per_call: int = 1) -> list[object]:
    p50 = percentile(samples, 50)
    return [name, ms(p50), ms(percentile(samples, 95)), f"{texts_per_call / p50:,.0f}"]


async def main(model: str, threads: int, rounds: int) -> None:
    started = time.perf_counter()
    fresh: Any = load_embedder(model=model, threads=threads, cache_size=0)  # every call reaches the model
    load = time.perf_counter() - started
    cached = load_embedder(model=model, threads=threads, cache_size=2048)
    rows = [
        row("short query, encode()", sample_sync(lambda i: fresh.encode([f"{QUERY} {i}"]), rounds)),
        row("short query, embed()", await sample_async(lambda i: fresh.embed([f"{QUERY} {i}"]), rounds)),
        row("batch of 32, embed()", await sample_async(lambda i: fresh.embed(texts(32, str(i))), rounds // 4), 32),
        row("cache hit, embed()", await sample_async(lambda i: cached.embed([QUERY]), rounds)),
    ]

    async def concurrent(i: int) -> None:
        await asyncio.gather(*(fresh.embed([text]) for text in texts(64, f"c{i}")))

    async def sequential(i: int) -> None:
        for text in texts(64, f"s{i}"):
            await fresh.embed([text])

    runs = fresh.model_runs
    concurrent_samples = await sample_async(concurrent, rounds // 20)
    runs_per_round = (fresh.model_runs - runs) / (rounds // 20 + min(20, rounds // 20))
    rows.append(row(f"64 concurrent embed() ({runs_per_round:.1f} model runs)", concurrent_samples, 64))
    rows.append(row("64 sequential embed() (64 model runs)", await sample_async(sequential, rounds // 20), 64))
    await fresh.close()
    await cached.close()
    print(f"{fresh.name}, {threads} thread(s); load incl. sha256 check and probe: {ms(load)} ms")
    print(table(["case", "p50 ms", "p95 ms", "texts/s at p50"], rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default=MODELS[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    asyncio.run(main(args.model, args.threads, args.rounds))
