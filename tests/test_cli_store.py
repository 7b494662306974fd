"""Which store a command opens, and whose memories: unknown schemes are refused, commands that only read never
create a store, and `--tenant` reaches the memories the chat path keeps per tenant. The real model and SQLite
(and PostgreSQL from the wheel), the CLI called as `main`, a real proxy where the chat path must fill the store."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import httpx
import orjson
import psycopg
import pytest

from proxy import config
from proxy.cli import main
from proxy.config import Settings
from proxy.errors import ConfigError
from tests.fakeupstream import FakeUpstream
from tests.pgserver import postgres_databases, postgres_location, postgres_server  # noqa: F401

Upstream = tuple[FakeUpstream, str]
READS = [["list"], ["search", "bees"], ["export"], ["delete", "0123456789abcdef0123"], ["erase", "--yes"]]
KEY = "pk-acme-0123456789abcdef"


def cli(capsys: pytest.CaptureFixture[str], home: Path, *argv: str,
        env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run a command in this process, as its own process would: `serve` configures logging for the process, so
    the logging it found is put back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        code = main(list(argv), environ={"HOME": str(home), **(env or {})})
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("verb", READS, ids=lambda verb: verb[0])
def test_a_command_that_only_reads_never_creates_a_store(verb: list[str], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    typo = tmp_path / "typo.db"
    code, out, err = cli(capsys, tmp_path, "memories", *verb, "--user", "u1", "--db", str(typo))
    assert code == 2 and out == ""
    assert f"no SQLite memory store at {str(typo)!r}" in err
    code, _, err = cli(capsys, tmp_path, "memories", *verb, "--user", "u1")  # the default store, never made yet
    assert code == 2 and "no SQLite memory store at" in err and "memory.db" in err
    assert files(tmp_path) == []


@pytest.mark.parametrize("location", ["mysql://host/db", "postgresql+psycopg://u@h/db", "sqlite3:///x.db",
                                      "file:///tmp/x.db", "MySQL://root:hunter2@db/app"])
def test_an_unknown_scheme_is_refused_everywhere(location: str, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for argv in (["memories", "add", "--user", "u1", "text", "--db", location],
                 ["memories", "list", "--user", "u1", "--db", location],
                 ["serve", "--db", location],
                 ["migrate", "--from", location, "--to", str(tmp_path / "to.db")],
                 ["migrate", "--from", str(tmp_path / "from.db"), "--to", location]):
        code, _, err = cli(capsys, tmp_path, *argv)
        assert code == 2, argv
        assert "unknown memory store" in err, (argv, err)
        assert "hunter2" not in err
    with pytest.raises(ConfigError, match="unknown memory store"):
        config.load(environ={"HOME": str(tmp_path), "MEMORY_PROXY_DB": location})
    assert files(tmp_path) == []


def test_a_command_that_adds_creates_a_store_only_where_a_directory_exists(tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture[str]) -> None:
    nowhere = tmp_path / "no" / "such" / "dir" / "m.db"
    for argv in (["memories", "add", "--user", "u1", "User keeps bees", "--db", str(nowhere)],
                 ["serve", "--db", str(nowhere)]):
        code, _, err = cli(capsys, tmp_path, *argv)
        assert code == 2 and f"its directory {str(nowhere.parent)!r} does not exist" in err
    assert files(tmp_path) == []

    fresh = tmp_path / "fresh.db"
    code, _, err = cli(capsys, tmp_path, "memories", "add", "--user", "u1", "User keeps bees", "--db", str(fresh))
    assert code == 0 and f"created a new memory store at {fresh!s}" in err
    code, out, err = cli(capsys, tmp_path, "memories", "list", "--user", "u1", "--db", str(fresh))
    assert code == 0 and "User keeps bees" in out and err == ""
    code, _, err = cli(capsys, tmp_path, "memories", "add", "--user", "u1", "User rides a bike", "--db", str(fresh))
    assert code == 0 and "created" not in err  # said once, when it was made

    code, _, err = cli(capsys, tmp_path, "memories", "add", "--user", "u1", "User keeps bees")  # the default store
    default = Path(config.default_db(str(tmp_path / ".local" / "share" / "memory-proxy")))
    assert code == 0 and default.is_file() and f"created a new memory store at {default}" in err


def test_reading_an_empty_postgresql_database_creates_nothing(postgres_location: str, tmp_path: Path,  # noqa: F811
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, tmp_path, "memories", "list", "--user", "u1", "--db", postgres_location)
    assert code == 2 and "holds no memory-proxy store" in err
    with psycopg.connect(postgres_location) as conn:
        tables = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()
    assert tables == (0,)
    code, _, _ = cli(capsys, tmp_path, "memories", "add", "--user", "u1", "User keeps bees", "--db",
                     postgres_location, "--tenant", "acme")
    assert code == 0
    code, out, err = cli(capsys, tmp_path, "memories", "list", "--user", "u1", "--db", postgres_location)
    assert code == 0 and out == "" and "tenant(s) acme have memories of this user: pass --tenant" in err
    code, out, _ = cli(capsys, tmp_path, "memories", "list", "--user", "u1", "--db", postgres_location,
                       "--tenant", "acme")
    assert code == 0 and "User keeps bees" in out


def test_the_tenant_reaches_what_the_chat_path_stored_for_a_proxy_key(
        upstream: Upstream, settings_for: Callable[..., Settings], start_proxy: Callable[..., str],
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = {"proxy_keys": f"acme:{KEY}", "upstream_key": "sk-upstream"}
    proxy = start_proxy(settings_for(upstream[1], **keys))
    db = str(tmp_path / "data" / "memory.db")
    upstream[0].reply('Noted.\n<memory>\n["User keeps bees"]\n</memory>')
    answer = httpx.post(proxy + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}",
                                                                 "X-Memory-User": "u1"},
                        json={"model": "m", "messages": [{"role": "user", "content": "I keep bees"}]})
    assert answer.status_code == 200
    env = {"MEMORY_PROXY_" + name.upper(): value for name, value in keys.items()}
    for _ in range(500):  # stored off the request path
        code, out, err = cli(capsys, tmp_path, "memories", "list", "--user", "u1", "--db", db, "--tenant", "acme",
                             "--json", env=env)
        if code != 0 or orjson.loads(out):
            break
    assert code == 0 and err == ""
    assert [(m["user"], m["text"]) for m in orjson.loads(out)] == [("u1", "User keeps bees")]

    code, out, err = cli(capsys, tmp_path, "memories", "list", "--user", "u1", "--db", db, env=env)
    assert code == 0 and out == ""
    assert "proxy_keys is set, so the proxy keeps memories per tenant (acme)" in err
    assert "tenant(s) acme have memories of this user: pass --tenant" in err
    code, _, err = cli(capsys, tmp_path, "memories", "list", "--user", "u1", "--db", db, "--tenant", "acne", env=env)
    assert code == 0 and "tenant 'acne' has no key in proxy_keys (acme)" in err

    code, out, _ = cli(capsys, tmp_path, "memories", "export", "--user", "u1", "--db", db, "--tenant", "acme")
    assert [orjson.loads(line)["text"] for line in out.splitlines()] == ["User keeps bees"]
    code, out, _ = cli(capsys, tmp_path, "memories", "erase", "--user", "u1", "--db", db, "--tenant", "acme",
                       "--yes", "--json")
    assert code == 0 and orjson.loads(out) == [{"user": "u1", "deleted": 1, "sessions_deleted": 0}]
    listed = httpx.get(proxy + "/memories/u1", headers={"Authorization": f"Bearer {KEY}"}).json()["data"]
    assert listed == []  # the proxy sees the erasure: same namespace


def test_a_bad_tenant_name_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, tmp_path, "memories", "add", "--user", "u1", "x", "--tenant", "a\x1fb",
                       "--db", str(tmp_path / "m.db"))
    assert code == 2 and "the tenant contains control characters" in err
    assert not os.path.exists(tmp_path / "m.db")
