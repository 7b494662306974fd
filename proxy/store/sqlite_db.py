"""The SQLite file: its schema (numbered migrations), its connections and the one writer thread.

proxy/store/sqlite.py builds the store on these; proxy/store/sqlite_sessions.py adds its tables through the same
migrations.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from queue import SimpleQueue
from types import ModuleType
from typing import Any, TypeVar, cast

from proxy import metrics
from proxy.errors import StoreError, StoreUnavailable
from proxy.models import Memory
from proxy.store import vector_meta

T = TypeVar("T")
Row = tuple[Any, ...]
PAGE_SIZE = 16384  # a memory row (~1.7 KB) must fit on its leaf page: 4 KiB pages would spill it to overflow
COLUMNS = ("id, user, text, category, source, created_at, updated_at, expires_at, supersedes, superseded_by, "
           "happened_at, valid_until")
LIVE = "superseded_by IS NULL AND (expires_at IS NULL OR expires_at > ?)"

# Numbered schema steps; PRAGMA user_version is the number applied. Append, never edit a released step.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
        """CREATE TABLE memories (
            user TEXT NOT NULL, id TEXT NOT NULL, text TEXT NOT NULL, category TEXT NOT NULL,
            source TEXT NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL, expires_at REAL,
            supersedes TEXT, superseded_by TEXT, embedding BLOB NOT NULL,
            PRIMARY KEY (user, id)) WITHOUT ROWID""",
        "CREATE INDEX memories_expiry ON memories (expires_at) WHERE expires_at IS NOT NULL",
        "CREATE INDEX memories_live ON memories (expires_at) WHERE superseded_by IS NULL",
        "CREATE TABLE users (user TEXT PRIMARY KEY, generation INTEGER NOT NULL) WITHOUT ROWID",
    ),
    (  # conversation memory: proxy/store/sqlite_sessions.py
        """CREATE TABLE sessions (
            user TEXT NOT NULL, session TEXT NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL,
            expires_at REAL, first_seq INTEGER NOT NULL, last_seq INTEGER NOT NULL, summary TEXT NOT NULL,
            summarized_through INTEGER NOT NULL, summary_tokens INTEGER NOT NULL, chunked_through INTEGER NOT NULL,
            PRIMARY KEY (user, session)) WITHOUT ROWID""",
        "CREATE INDEX sessions_recent ON sessions (user, updated_at)",
        "CREATE INDEX sessions_expiry ON sessions (expires_at) WHERE expires_at IS NOT NULL",
        """CREATE TABLE session_messages (
            user TEXT NOT NULL, session TEXT NOT NULL, seq INTEGER NOT NULL, message TEXT NOT NULL,
            tokens INTEGER NOT NULL, created_at REAL NOT NULL,
            PRIMARY KEY (user, session, seq)) WITHOUT ROWID""",
        """CREATE TABLE conversation_chunks (
            user TEXT NOT NULL, id TEXT NOT NULL, session TEXT NOT NULL, first_seq INTEGER NOT NULL,
            last_seq INTEGER NOT NULL, text TEXT NOT NULL, created_at REAL NOT NULL, embedding BLOB NOT NULL,
            PRIMARY KEY (user, id)) WITHOUT ROWID""",
        "CREATE INDEX conversation_chunks_session ON conversation_chunks (user, session)",
    ),
    (  # time: when it happened (as the user said it) and when a replaced memory stopped being current
        "ALTER TABLE memories ADD COLUMN happened_at TEXT",
        "ALTER TABLE memories ADD COLUMN valid_until REAL",
        """UPDATE memories SET valid_until = (SELECT newer.created_at FROM memories AS newer
            WHERE newer.user = memories.user AND newer.id = memories.superseded_by)
           WHERE superseded_by IS NOT NULL""",
    ),
)


def sqlite_module() -> ModuleType:
    """The stdlib sqlite3 when it can load extensions, else sqlean (the same API, SQLite 3.50, extensions on)."""
    if hasattr(sqlite3.Connection, "enable_load_extension"):
        return sqlite3
    import sqlean

    return cast(ModuleType, sqlean)


db = sqlite_module()


def describe(path: str, exc: Exception, busy_timeout: float) -> StoreError:
    """The fault in one line; StoreUnavailable when it passes (the same write succeeds once the lock, the disk or
    the file is back), so that queued writes wait for it rather than being dropped."""
    metrics.store_error("sqlite")
    message = str(exc)
    lowered = message.lower()
    down: type[StoreError] = StoreUnavailable
    if "locked" in lowered or "busy" in lowered:
        why = f"the database is locked by another connection past the busy timeout ({busy_timeout:g} s)"
    elif "not a database" in lowered or "malformed" in lowered or "corrupt" in lowered:
        why, down = "the file is corrupt or not a SQLite database", StoreError
    elif "readonly" in lowered or "read-only" in lowered:
        why = "the database (or its directory, which holds the -wal and -shm files) is read-only"
    elif "unable to open" in lowered:
        why = "the database file cannot be opened (missing directory or no permission?)"
    elif "full" in lowered:
        why = "the disk (or the database's max_page_count) is full"
    elif "disk i/o" in lowered:
        why = "the disk failed a read or a write"
    else:
        why, down = "the memory store failed", StoreError
    return down(f"SQLite memory store {path!r}: {why} ({message})")


def connect(path: str, busy_timeout: float, *, writer: bool) -> sqlite3.Connection:
    conn = cast(sqlite3.Connection, db.connect(path, timeout=busy_timeout, isolation_level=None,
                                               check_same_thread=False))
    try:
        conn.enable_load_extension(True)
        import sqlite_vec

        sqlite_vec.load(conn)
        conn.enable_load_extension(False)
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        if writer:
            conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")  # takes effect only on a new, empty file
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise db.OperationalError(f"journal_mode is {mode!r}, not wal: read-only database")
        # WAL + NORMAL: a commit is durable once in the WAL, so a crash of the process loses nothing; only an OS
        # crash or power cut can drop the last commits (never corrupt the file). FULL would fsync every commit on
        # the single writer's path, for memories a user states again anyway.
        conn.execute("PRAGMA synchronous = NORMAL")
        if not writer:
            conn.execute("PRAGMA query_only = 1")
    except BaseException:
        conn.close()
        raise
    return conn


def migrate(conn: sqlite3.Connection, dimension: int | None, model: str | None = None) -> dict[str, str]:
    """Apply the pending numbered steps and record (or check: proxy/store `vector_meta`) the vectors' dimension
    and model, in one transaction; returns the meta entries. `dimension` None checks nothing (re-embedding)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > len(MIGRATIONS):
            raise StoreError(f"the database schema is version {version}, newer than this memory-proxy knows "
                             f"({len(MIGRATIONS)}): upgrade memory-proxy")
        for number, steps in enumerate(MIGRATIONS[version:], start=version + 1):
            for statement in steps:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number}")
        found = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        new = vector_meta(found, dimension, model)
        conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", new.items())
        conn.execute("COMMIT")
        return {**found, **new}
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def to_memory(row: Row) -> Memory:
    return Memory(*row)


def random_generation() -> int:
    return int.from_bytes(os.urandom(8), "big") >> 1  # fits SQLite's signed 64-bit integer


class Writer(threading.Thread):
    """Owns the write connection; runs each submitted job in its own transaction and commits before answering.
    A job may append to `after_commit`: callables run in this thread once its COMMIT succeeded, holding
    `published` with the COMMIT (a reader that takes it sees both or neither), before the next job starts; they
    are dropped if it rolls back."""

    def __init__(self, conn: sqlite3.Connection, on_error: Callable[[Exception], StoreError]) -> None:
        super().__init__(name="memory-store-writer", daemon=True)
        self.conn = conn
        self.on_error = on_error
        self.jobs: SimpleQueue[tuple[Callable[[sqlite3.Connection], Any], Future[Any]] | None] = SimpleQueue()
        self.after_commit: list[Callable[[], None]] = []
        self.published = threading.Lock()

    def submit(self, job: Callable[[sqlite3.Connection], T]) -> Future[T]:
        future: Future[T] = Future()
        self.jobs.put((job, future))
        return future

    def run(self) -> None:
        while (item := self.jobs.get()) is not None:
            job, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                self.conn.execute("BEGIN IMMEDIATE")
                try:
                    result = job(self.conn)
                    with self.published:
                        self.conn.execute("COMMIT")
                        actions, self.after_commit = self.after_commit, []
                        for action in actions:
                            action()
                except BaseException:
                    self.after_commit.clear()
                    if self.conn.in_transaction:
                        self.conn.execute("ROLLBACK")
                    raise
            except db.Error as exc:
                future.set_exception(self.on_error(exc))
            except Exception as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)

    def stop(self) -> None:
        self.jobs.put(None)
        self.join()


def stored_vectors(path: str) -> tuple[int, str | None]:
    """The vector dimension the SQLite store at `path` was made for, and the model that made its vectors (None
    when unrecorded); StoreError if there is no store there (the file is opened read-only: nothing is created)."""
    if not Path(path).expanduser().is_file():
        raise StoreError(f"no SQLite memory store at {path!r}")
    try:
        conn = db.connect(Path(path).expanduser().resolve().as_uri() + "?mode=ro", uri=True)
        try:
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        finally:
            conn.close()
    except db.Error as exc:
        raise StoreError(f"{path!r} is not a memory-proxy SQLite store ({exc})") from exc
    if "dimension" not in meta:
        raise StoreError(f"{path!r} holds no memories yet (no vector dimension recorded)")
    return int(meta["dimension"]), meta.get("model")
