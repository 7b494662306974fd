"""`memory-proxy reembed`: re-embed every stored memory and conversation excerpt for another embedding model.

Vectors of two models must never meet in one store: recall would compare one model's question with the other's
memories and answer garbage without an error. So each store records the model and dimension its vectors were
made with (`model`, `dimension` in its meta table) and refuses to open for another (proxy/store `vector_meta`).
Changing the model is this command, run with the proxies stopped and the new model configured:

    memory-proxy reembed --db postgresql://…        (model_dir as `serve` would use it)

It works in place, in (user, id) order, a batch per transaction, and records in the store how far it got
(`reembed_model`, `reembed_after`): stopped or crashed, it carries on where it was when run again; meanwhile
every start of a proxy on that store is refused. At the end the store records the new model and dimension and
every user's generation changes, so no cache anywhere keeps an old vector.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
import psycopg

from proxy.errors import ConfigError, StoreError
from proxy.store import locate
from proxy.store.postgres_db import VectorDumper, describe
from proxy.store.postgres_db import migrate as migrate_postgres
from proxy.store.sqlite_db import connect, db
from proxy.store.sqlite_db import migrate as migrate_sqlite
from proxy.store.vectors import unit

if TYPE_CHECKING:
    from proxy.config import Settings
    from proxy.embed import Embedder

TABLES = ("memories", "conversation_chunks")  # every table that holds vectors, in the order they are done
Row = tuple[str, str, str]  # user, id, text


@dataclass
class Progress:
    done: int = 0
    total: int = 0
    model: str = ""
    resumed: bool = False

    def __str__(self) -> str:
        return f"{self.done} of {self.total} texts re-embedded for {self.model}"


class SqliteVectors:
    """The vector tables of a SQLite store, on its write connection (blocking: run in a thread)."""

    def __init__(self, path: str) -> None:
        self.conn = connect(path, 5.0, writer=True)
        self.meta = migrate_sqlite(self.conn, None)
        self.tables = [t for t in TABLES if self.conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (t,)).fetchone()]

    def set_meta(self, entries: dict[str, str], drop: tuple[str, ...] = ()) -> None:
        with self.transaction():
            self.put_meta(entries, drop)

    def put_meta(self, entries: dict[str, str], drop: tuple[str, ...] = ()) -> None:
        self.conn.executemany("DELETE FROM meta WHERE key = ?", [(key,) for key in drop])
        self.conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET "
                              "value = excluded.value", entries.items())

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise

    def count(self, table: str) -> int:
        return int(self.conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])

    def rows(self, table: str, after: tuple[str, str], limit: int) -> list[Row]:
        return [tuple(r) for r in self.conn.execute(f"SELECT user, id, text FROM {table} WHERE (user, id) > (?, ?) "
                                                    "ORDER BY user, id LIMIT ?", (*after, limit))]

    def write(self, table: str, rows: list[Row], vectors: np.ndarray[Any, Any], cursor: str) -> None:
        with self.transaction():
            self.conn.executemany(f"UPDATE {table} SET embedding = ? WHERE user = ? AND id = ?",
                                  [(v.astype(np.float32).tobytes(), u, i) for (u, i, _), v in
                                   zip(rows, vectors, strict=True)])
            self.put_meta({"reembed_after": cursor})

    def finish(self, entries: dict[str, str]) -> None:
        with self.transaction():
            self.put_meta(entries, ("reembed_model", "reembed_dimension", "reembed_after"))
            # Every process's cache keys on the user's generation: a new one for everyone drops them all.
            self.conn.execute("UPDATE users SET generation = abs(random() >> 1)")

    def close(self) -> None:
        self.conn.close()


class PostgresVectors:
    """The vector tables of a PostgreSQL store, on one connection."""

    def __init__(self, conn: psycopg.AsyncConnection[Any], meta: dict[str, str], tables: list[str]) -> None:
        self.conn, self.meta, self.tables = conn, meta, tables

    @classmethod
    async def open(cls, url: str) -> PostgresVectors:
        conn = await psycopg.AsyncConnection.connect(url, autocommit=True, connect_timeout=10)
        oid = await migrate_postgres(conn, None)
        conn.adapters.register_dumper(np.ndarray, type("BoundVectorDumper", (VectorDumper,), {"oid": oid}))
        meta: dict[str, str] = dict(await (await conn.execute("SELECT key, value FROM memory_meta")).fetchall())
        tables = [t for t in TABLES if (await (await conn.execute("SELECT to_regclass(%s) IS NOT NULL",
                                                                  (t,))).fetchone() or [False])[0]]
        return cls(conn, meta, tables)

    async def set_meta(self, entries: dict[str, str], drop: tuple[str, ...] = ()) -> None:
        async with self.conn.transaction():
            await self.put_meta(entries, drop)

    async def put_meta(self, entries: dict[str, str], drop: tuple[str, ...] = ()) -> None:
        for key in drop:
            await self.conn.execute("DELETE FROM memory_meta WHERE key = %s", (key,))
        for key, value in entries.items():
            await self.conn.execute("INSERT INTO memory_meta (key, value) VALUES (%s, %s) ON CONFLICT (key) "
                                    "DO UPDATE SET value = excluded.value", (key, value))

    async def count(self, table: str) -> int:
        row = await (await self.conn.execute(f"SELECT count(*) FROM {table}")).fetchone()
        return int(row[0]) if row else 0

    async def rows(self, table: str, after: tuple[str, str], limit: int) -> list[Row]:
        cursor = await self.conn.execute(f'SELECT "user", id, text FROM {table} WHERE ("user", id) > (%s, %s) '
                                         'ORDER BY "user", id LIMIT %s', (*after, limit))
        return [tuple(r) for r in await cursor.fetchall()]

    async def write(self, table: str, rows: list[Row], vectors: np.ndarray[Any, Any], cursor: str) -> None:
        async with self.conn.transaction(), self.conn.cursor() as sql:
            await sql.executemany(f'UPDATE {table} SET embedding = %b WHERE "user" = %s AND id = %s',
                                  [(v, u, i) for (u, i, _), v in zip(rows, unit(vectors), strict=True)])
            await self.put_meta({"reembed_after": cursor})

    async def finish(self, entries: dict[str, str]) -> None:
        async with self.conn.transaction():
            await self.put_meta(entries, ("reembed_model", "reembed_dimension", "reembed_after"))
            await self.conn.execute("UPDATE memory_users SET generation = (random() * 9.2e18)::bigint")

    async def close(self) -> None:
        await self.conn.close()


async def call(target: Any, name: str, *args: Any) -> Any:
    """A method of either target: SQLite's block (so they run in a thread), PostgreSQL's are coroutines."""
    method = getattr(target, name)
    if isinstance(target, SqliteVectors):
        return await asyncio.to_thread(method, *args)
    return await method(*args)


async def reembed_command(settings: Settings, batch: int) -> int:
    """The CLI's `reembed`: the configured store, for the configured model, progress on stderr."""
    from dataclasses import replace

    from proxy.embed import MODELS, load_configured

    # Re-embedding is for a model other than the store's: with `model` unset, the default one.
    target = settings if settings.model or settings.model_dir else replace(settings, model=MODELS[0])
    embedder = await asyncio.to_thread(load_configured, target, cache_size=0)

    def show(done: Progress) -> None:
        print(f"\r{done}", end="", file=sys.stderr, flush=True)

    try:
        done = await reembed(settings.db, embedder, batch=batch, progress=show)
    finally:
        await embedder.close()
    print(file=sys.stderr)
    print(f"{done}{' (resumed)' if done.resumed else ''}; the store now holds {embedder.name} vectors.")
    return 0


async def reembed(url: str, embedder: Embedder, *, batch: int = 256,
                  progress: Callable[[Progress], None] = lambda done: None) -> Progress:
    """Re-embed every text of the store at `url` with `embedder`, resuming an interrupted run (module docstring).
    ConfigError when another model's re-embedding is under way; StoreError for the store's own faults."""
    target: Any
    try:
        kind, location = locate(url)
        if kind == "postgresql":
            target = await PostgresVectors.open(location)
        elif not await asyncio.to_thread(Path(location).is_file):
            raise StoreError(f"no SQLite memory store at {location!r}")
        else:
            target = await asyncio.to_thread(SqliteVectors, location)
    except psycopg.Error as exc:
        raise describe(url, exc) from exc
    except db.Error as exc:
        raise ConfigError(f"cannot open the SQLite store {url!r}: {exc}") from exc
    try:
        return await run(target, embedder, max(1, batch), progress)
    finally:
        await call(target, "close")


async def run(target: Any, embedder: Embedder, batch: int, progress: Callable[[Progress], None]) -> Progress:
    meta, model = target.meta, embedder.name
    underway = meta.get("reembed_model")
    if underway and underway != model:
        raise ConfigError(f"a re-embedding for model {underway!r} is under way: finish it with that model first")
    done = Progress(model=model, resumed=bool(underway))
    for table in target.tables:
        done.total += await call(target, "count", table)
    if not underway:
        if meta.get("model") == model and int(meta.get("dimension", -1)) == embedder.dimension:
            done.done = done.total
            return done  # already this model's vectors: nothing to do
        await call(target, "set_meta", {"reembed_model": model, "reembed_dimension": str(embedder.dimension),
                                        "reembed_after": orjson.dumps([target.tables[0], "", ""]).decode()})
        meta = {**meta, "reembed_after": orjson.dumps([target.tables[0], "", ""]).decode()}
    table, after_user, after_id = orjson.loads(meta["reembed_after"])
    start = target.tables.index(table) if table in target.tables else 0
    for earlier in target.tables[:start]:
        done.done += await call(target, "count", earlier)
    for name in target.tables[start:]:
        position = (after_user, after_id) if name == table else ("", "")
        if position != ("", ""):
            done.done += await count_before(target, name, position)
        while rows := await call(target, "rows", name, position, batch):
            vectors = await embedder.embed([text for _, _, text in rows])
            position = (rows[-1][0], rows[-1][1])
            await call(target, "write", name, rows, vectors, orjson.dumps([name, *position]).decode())
            done.done += len(rows)
            progress(done)
    await call(target, "finish", {"model": model, "dimension": str(embedder.dimension)})
    return done


async def count_before(target: Any, table: str, position: tuple[str, str]) -> int:
    """How many rows of `table` an interrupted run already did (for the progress figures only)."""
    if isinstance(target, SqliteVectors):
        return await asyncio.to_thread(lambda: int(target.conn.execute(
            f"SELECT count(*) FROM {table} WHERE (user, id) <= (?, ?)", position).fetchone()[0]))
    row = await (await target.conn.execute(f'SELECT count(*) FROM {table} WHERE ("user", id) <= (%s, %s)',
                                           position)).fetchone()
    return int(row[0]) if row else 0

