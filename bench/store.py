"""Per-user vector search in SQLite: latency and disk cost of the candidate layouts, side by side.

    python -m bench.store [--total 1000000] [--queries 200] [--dir DIR]

A user with 1k memories and one with 10k share a file with --total memories in all (384-d float32, random unit
vectors); every other memory belongs to a user with 10 (100k users at the default --total), written interleaved
as real traffic would be, with time-sortable ids. Queries are random unit vectors, top 5. Disk is the file's
size (after a WAL checkpoint) divided by the memories in it. Exceptions, said again in the output:
- vec0 with a partition key reserves a 1,024-vector chunk per user, so 100k small users would need ~150 GB: its
  search file is filled with users of 1,000 memories written user by user, and its disk cost is measured on
  200 users x 10 memories and extrapolated (the per-user chunk is a fixed cost).
- The int8 layout is the clustered table plus a side table of int8 vectors (each scaled to +-127, cosine does
  not care about scale); it scans the side table for 10*k candidates and re-ranks them in float32.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import sqlite_vec

from bench.harness import percentile, table
from proxy.config import Settings
from proxy.search import DENSE, Fusion
from proxy.store.sqlite import SqliteStore, db

DIM = 384
K = 5
BIG = {"1k": ("big-1k", 1_000), "10k": ("big-10k", 10_000)}
TEXT = "The user mentioned that they prefer short answers and live near the sea (memory #{})."
Floats = npt.NDArray[np.float32]


class Data:
    """Every row's user, id and unit vector, in the order they are written."""

    def __init__(self, total: int, seed: int = 1) -> None:
        rng = np.random.default_rng(seed)
        owners = [name for name, count in BIG.values() for _ in range(count)]
        small = total - len(owners)
        owners += [f"user-{n // 10:06d}" for n in range(small)]
        order = rng.permutation(total)
        self.users = [owners[i] for i in order]
        self.ids = [f"{n:020x}" for n in range(total)]  # increasing in write order, like new_id()
        self.vectors = rng.standard_normal((total, DIM), dtype=np.float32)
        self.vectors /= np.linalg.norm(self.vectors, axis=1, keepdims=True)
        self.small_users = small // 10
        self.queries = rng.standard_normal((1000, DIM), dtype=np.float32)
        self.queries /= np.linalg.norm(self.queries, axis=1, keepdims=True)

    def __len__(self) -> int:
        return len(self.ids)


def bulk(path: Path, page_size: int = 16384) -> sqlite3.Connection:
    """A connection for loading: sqlite-vec, WAL, a 2 GB page cache and no fsync (the layout is what we measure)."""
    conn: sqlite3.Connection = db.connect(str(path), isolation_level=None)
    conn.enable_load_extension(True)
    sqlite_vec.load(conn)
    conn.execute(f"PRAGMA page_size = {page_size}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("PRAGMA cache_size = -2000000")
    return conn


def load(conn: sqlite3.Connection, sql: str, rows: Iterable[tuple[Any, ...]], batch: int = 20_000) -> None:
    pending: list[tuple[Any, ...]] = []
    for row in rows:
        pending.append(row)
        if len(pending) == batch:
            conn.execute("BEGIN")
            conn.executemany(sql, pending)
            conn.execute("COMMIT")
            pending.clear()
    if pending:
        conn.execute("BEGIN")
        conn.executemany(sql, pending)
        conn.execute("COMMIT")


def bytes_per_memory(conn: sqlite3.Connection, path: Path, memories: int) -> float:
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return os.path.getsize(path) / memories


def timed(search: Callable[[Floats], object], queries: Floats, count: int, budget: float = 10.0) -> list[float]:
    """Latencies of up to `count` searches (at least 5, at most ~budget seconds)."""
    samples: list[float] = []
    deadline = time.perf_counter() + budget
    for query in queries[:count]:
        start = time.perf_counter()
        search(query)
        samples.append(time.perf_counter() - start)
        if len(samples) >= 5 and time.perf_counter() > deadline:
            break
    return samples


def figures(samples: list[float]) -> list[str]:
    return [f"{percentile(samples, 50) * 1000:.2f}", f"{percentile(samples, 95) * 1000:.2f}", str(len(samples))]


def memory_rows(data: Data, indexes: Iterable[int]) -> Iterator[tuple[Any, ...]]:
    for i in indexes:
        yield (data.users[i], data.ids[i], TEXT.format(i), "fact", "chat", 1.7e9, 1.7e9, None, None, None,
               data.vectors[i].tobytes())


COLUMNS = "user, id, text, category, source, created_at, updated_at, expires_at, supersedes, superseded_by, embedding"
INSERT = f"INSERT INTO {{}} ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"


def reader(path: Path) -> sqlite3.Connection:
    conn: sqlite3.Connection = db.connect(str(path), isolation_level=None)
    conn.enable_load_extension(True)
    sqlite_vec.load(conn)
    return conn


Latency = dict[str, list[float]]  # "10" / "1k" / "10k" memories → seconds per search
TARGETS = {"10": "user-000000", "1k": "big-1k", "10k": "big-10k"}


def sql_latency(conn: sqlite3.Connection, sql: str, data: Data, count: int) -> Latency:
    def search(user: str) -> Callable[[Floats], object]:
        return lambda query: conn.execute(sql, (query.tobytes(), user)).fetchall()
    return {label: timed(search(user), data.queries, count) for label, user in TARGETS.items()}


VEC0_SEARCH = f"SELECT rowid, distance FROM v WHERE embedding MATCH ? AND k = {K} AND user = ?"


def measured_then_removed(path: Path, sql: str, data: Data, count: int) -> Latency:
    """The search latency of `sql` on the file, read through a fresh reader; the file is deleted afterwards."""
    conn = reader(path)
    try:
        return sql_latency(conn, sql, data, count)
    finally:
        conn.close()
        path.unlink()


def rowid_layout(data: Data, folder: Path, count: int) -> tuple[Latency, float, float]:
    path = folder / "rowid.db"
    conn = bulk(path)
    conn.execute("CREATE TABLE m (user TEXT, id TEXT, text TEXT, category TEXT, source TEXT, created_at REAL, "
                 "updated_at REAL, expires_at REAL, supersedes TEXT, superseded_by TEXT, embedding BLOB)")
    conn.execute("CREATE UNIQUE INDEX m_user ON m (user, id)")
    start = time.perf_counter()
    load(conn, INSERT.format("m"), memory_rows(data, range(len(data))))
    seconds = time.perf_counter() - start
    disk = bytes_per_memory(conn, path, len(data))
    conn.close()
    sql = "SELECT id, vec_distance_cosine(embedding, ?) AS d FROM m WHERE user = ? ORDER BY d LIMIT 5"
    return measured_then_removed(path, sql, data, count), disk, seconds


def clustered_file(data: Data, path: Path) -> tuple[float, float]:
    """The store's own schema (made by SqliteStore), bulk-loaded; returns (bytes per memory, load seconds)."""
    asyncio.run(close_after_open(path))
    conn = bulk(path)
    start = time.perf_counter()
    load(conn, INSERT.format("memories"), memory_rows(data, range(len(data))))
    conn.execute("BEGIN")
    conn.execute("INSERT INTO users (user, generation) SELECT DISTINCT user, 1 FROM memories")
    conn.execute("COMMIT")
    seconds = time.perf_counter() - start
    disk = bytes_per_memory(conn, path, len(data))
    conn.close()
    return disk, seconds


async def close_after_open(path: Path) -> None:
    await (await SqliteStore.open(str(path), dimension=DIM, dedupe_similarity=0.9)).close()


def quantised(vector: Floats) -> bytes:
    scale = 127 / max(float(np.abs(vector).max()), 1e-12)
    return bytes(np.round(vector * scale).astype(np.int8).tobytes())


def int8_layout(data: Data, path: Path, count: int) -> tuple[Latency, float, float, float]:
    """A side table of int8 vectors on the clustered file: candidates in int8, re-ranked in float32."""
    conn = bulk(path)
    conn.execute("CREATE TABLE q8 (user TEXT, id TEXT, q BLOB, PRIMARY KEY (user, id)) WITHOUT ROWID")
    start = time.perf_counter()
    load(conn, "INSERT INTO q8 VALUES (?, ?, ?)",
         ((data.users[i], data.ids[i], quantised(data.vectors[i])) for i in range(len(data))))
    seconds = time.perf_counter() - start
    disk = bytes_per_memory(conn, path, len(data))
    conn.close()
    conn = reader(path)
    candidates = ("SELECT id FROM q8 WHERE user = ? "
                  f"ORDER BY vec_distance_cosine(vec_int8(q), vec_int8(?)) LIMIT {10 * K}")

    def search(user: str, query: Floats) -> list[str]:
        ids = [row[0] for row in conn.execute(candidates, (user, quantised(query)))]
        rerank = (f"SELECT id FROM memories WHERE user = ? AND id IN ({', '.join('?' * len(ids))}) "
                  f"ORDER BY vec_distance_cosine(embedding, ?) LIMIT {K}")
        return [row[0] for row in conn.execute(rerank, (user, *ids, query.tobytes()))]

    latency = {label: timed(lambda q, u=user: search(u, q), data.queries, count) for label, user in TARGETS.items()}
    exact = ("SELECT id FROM memories WHERE user = ? ORDER BY vec_distance_cosine(embedding, ?) LIMIT 5")
    found = [len(set(search("big-10k", q)) & {r[0] for r in conn.execute(exact, ("big-10k", q.tobytes()))})
             for q in data.queries[:50]]
    conn.execute("PRAGMA query_only = 0")
    conn.close()
    return latency, disk, seconds, sum(found) / (K * len(found))


QUESTION = "What did I say about living near the sea, in memory #{}?"  # the memories' words: hybrid's work


async def store_latency(path: Path, data: Data, count: int) -> dict[str, Latency]:
    """SqliteStore.search end to end (thread hop, generation check, rows fetched), see `searched`."""
    store = await SqliteStore.open(str(path), dimension=DIM, dedupe_similarity=0.9)
    uncached = await SqliteStore.open(str(path), dimension=DIM, dedupe_similarity=0.9, cache_bytes=0)
    try:
        return await searched(store, uncached, data, count)
    finally:
        await store.close()
        await uncached.close()


async def searched(store: Any, uncached: Any, data: Data, count: int) -> dict[str, Latency]:
    """A store's search end to end: warm cache, hybrid (vectors + the question's words, proxy/search.py) and
    vectors only; the first search (cache emptied before each); and with the cache off (scored in SQL, as for
    users too big to cache, vectors only)."""
    fusion = Fusion(lexical_weight=Settings().lexical_weight)
    modes = (("warm, hybrid", store, False, fusion), ("warm, vectors only", store, False, DENSE),
             ("first, hybrid", store, True, fusion), ("sql", uncached, False, DENSE))
    results: dict[str, Latency] = {mode: {} for mode, *_ in modes}
    for label, user in TARGETS.items():
        for mode, target, evict, chosen in modes:
            await target.search(user, data.queries[-1], K, text=QUESTION.format(0), fusion=chosen)
            samples: list[float] = []
            deadline = time.perf_counter() + 10
            for n, query in enumerate(data.queries[: count if not evict else min(count, 30)]):
                if evict:
                    target.cache.discard(user)
                start = time.perf_counter()
                await target.search(user, query, K, text=QUESTION.format(n * 7919 % len(data)), fusion=chosen)
                samples.append(time.perf_counter() - start)
                if len(samples) >= 5 and time.perf_counter() > deadline:
                    break
            results[mode][label] = samples
    return results


def vec0_metadata_layout(data: Data, folder: Path, count: int) -> tuple[Latency, float, float]:
    """vec0 without a partition key, the user as a metadata column filtered inside the KNN query."""
    path = folder / "vec0-metadata.db"
    conn = bulk(path, page_size=4096)
    conn.execute(f"CREATE VIRTUAL TABLE v USING vec0(embedding float[{DIM}] distance_metric=cosine, user text)")
    start = time.perf_counter()
    load(conn, "INSERT INTO v (rowid, embedding, user) VALUES (?, ?, ?)",
         ((i + 1, data.vectors[i].tobytes(), data.users[i]) for i in range(len(data))))
    seconds = time.perf_counter() - start
    disk = bytes_per_memory(conn, path, len(data))
    conn.close()
    return measured_then_removed(path, VEC0_SEARCH, data, count), disk, seconds


def vec0_partition_layout(data: Data, folder: Path, count: int) -> tuple[Latency, float, float]:
    """vec0 partitioned by user. The search file holds the same number of vectors, in users of 1,000 written user
    by user; the disk cost per memory at 10 per user is measured on 200 such users."""
    ddl = f"CREATE VIRTUAL TABLE v USING vec0(user text partition key, embedding float[{DIM}] distance_metric=cosine)"
    sql = "INSERT INTO v (rowid, user, embedding) VALUES (?, ?, ?)"
    sample = folder / "vec0-partition-sample.db"
    conn = bulk(sample, page_size=4096)
    conn.execute(ddl)
    load(conn, sql, ((i + 1, f"user-{i // 10:06d}", data.vectors[i].tobytes()) for i in range(2000)))
    disk = bytes_per_memory(conn, sample, 2000)
    conn.close()
    sample.unlink()
    path = folder / "vec0-partition.db"
    conn = bulk(path, page_size=4096)
    conn.execute(ddl)
    owners = [name for name, size in BIG.values() for _ in range(size)] + ["user-000000"] * 10
    owners += [f"filler-{n // 1000:04d}" for n in range(len(data) - len(owners))]
    start = time.perf_counter()
    load(conn, sql, ((i + 1, owner, data.vectors[i].tobytes()) for i, owner in enumerate(owners)))
    seconds = time.perf_counter() - start
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return measured_then_removed(path, VEC0_SEARCH, data, count), disk, seconds


def latency_row(name: str, latency: Latency) -> list[str]:
    cells = [name, f"{percentile(latency['10'], 50) * 1000:.2f}"]
    for label in ("1k", "10k"):
        cells += figures(latency[label])[:2]
    return [*cells, str(min(len(s) for s in latency.values()))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--total", type=int, default=1_000_000, help="memories in the file (>= 20,000)")
    parser.add_argument("--queries", type=int, default=200, help="searches per user and layout (~10 s at most)")
    parser.add_argument("--dir", help="where to build the files (default: a temporary directory, removed)")
    args = parser.parse_args()
    total, count = max(args.total, 20_000), min(args.queries, 1000)
    folder = Path(args.dir or tempfile.mkdtemp(prefix="bench-store-"))
    folder.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    try:
        data = Data(total)
        print(f"{total:,} memories ({DIM}-d float32): users of 10 x {data.small_users:,}, plus one of 1k and "
              f"one of 10k; top {K}, random queries; {time.perf_counter() - began:.0f} s to generate", flush=True)
        latencies: list[list[str]] = []
        disks: list[list[str]] = []
        clustered = folder / "clustered.db"
        disk, seconds = clustered_file(data, clustered)
        disks.append(["clustered WITHOUT ROWID (user, id), 16 KiB pages", f"{disk:,.0f}", f"{seconds:.0f}", "measured"])
        conn = reader(clustered)
        scan = "SELECT id, vec_distance_cosine(embedding, ?) AS d FROM memories WHERE user = ? ORDER BY d LIMIT 5"
        latencies.append(latency_row("clustered, SQL vec_distance_cosine", sql_latency(conn, scan, data, count)))
        conn.close()
        by_store = asyncio.run(store_latency(clustered, data, count))
        latencies.append(latency_row("SqliteStore: numpy cache, warm, hybrid", by_store["warm, hybrid"]))
        latencies.append(latency_row("SqliteStore: numpy cache, warm, vectors only", by_store["warm, vectors only"]))
        latencies.append(latency_row("SqliteStore: first search (loads cache), hybrid", by_store["first, hybrid"]))
        latencies.append(latency_row("SqliteStore: cache off (SQL scoring)", by_store["sql"]))
        print("clustered done", flush=True)
        latency, disk, seconds, recall = int8_layout(data, clustered, count)
        latencies.append(latency_row(f"clustered + int8 side table, re-rank (recall@5 {recall:.2f})", latency))
        disks.append(["clustered + int8 side table", f"{disk:,.0f}", f"{seconds:.0f}", "measured"])
        clustered.unlink()
        latency, disk, seconds = rowid_layout(data, folder, count)
        latencies.append(latency_row("rowid table + index (user, id), SQL", latency))
        disks.append(["rowid table + index (user, id), 16 KiB pages", f"{disk:,.0f}", f"{seconds:.0f}", "measured"])
        print("rowid done", flush=True)
        latency, disk, seconds = vec0_partition_layout(data, folder, count)
        latencies.append(latency_row("vec0, partition key = user (*)", latency))
        disks.append(["vec0, partition key = user", f"{disk:,.0f}", f"{seconds:.0f}",
                      "measured on 200 users x 10, per-user chunk cost extrapolates"])
        latency, disk, seconds = vec0_metadata_layout(data, folder, count)
        latencies.append(latency_row("vec0, user as metadata filter", latency))
        disks.append(["vec0, user as metadata column", f"{disk:,.0f}", f"{seconds:.0f}", "measured"])
        print(f"\nSearch latency, ms (one user's top {K}, {total:,} memories in the file)")
        print(table(["layout", "10: p50", "1k: p50", "1k: p95", "10k: p50", "10k: p95", "queries"], latencies))
        print(f"(*) its file holds users of 1,000 memories written user by user (10-memory users would need "
              f"~{total // 10 * 1.6 / 1000:,.0f} GB)")
        print(f"\nDisk, bytes per memory ({data.small_users:,} users x 10 memories; a float32 vector is {4 * DIM:,})")
        print(table(["layout", "bytes per memory", "load s", "how"], disks))
        print(f"\n{time.perf_counter() - began:.0f} s in all")
    finally:
        if not args.dir:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
