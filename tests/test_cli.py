"""The CLI works on the store directly, with the real model."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from bench.seed import sentences
from proxy.cli import main
from proxy.store import open_store
from proxy.store.sessions import NewMessage, open_session_store
from proxy.use import DIMENSION  # the default model's


def run(capsys: pytest.CaptureFixture[str], db: Path, *argv: str) -> tuple[int, str]:
    code = main([*argv, "--db", str(db)], environ={"HOME": str(db.parent)})
    return code, capsys.readouterr().out


def test_add_list_search_delete_erase(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "m.db"
    code, out = run(capsys, db, "memories", "add", "--user", "alice", "Alice is vegetarian", "--json")
    assert code == 0
    memory = orjson.loads(out)[0]
    assert memory["text"] == "Alice is vegetarian" and memory["source"] == "cli"
    run(capsys, db, "memories", "add", "--user", "alice", "Alice works as a nurse in Porto",
        "--category", "context")
    run(capsys, db, "memories", "add", "--user", "bob", "Bob is a vegetarian too")

    code, out = run(capsys, db, "memories", "list", "--user", "alice")
    assert code == 0 and out.index("nurse") < out.index("vegetarian") and "Bob" not in out

    _, out = run(capsys, db, "memories", "search", "--user", "alice", "what food should I cook?", "--json")
    hits = orjson.loads(out)
    assert hits[0]["text"] == "Alice is vegetarian" and all(h["user"] == "alice" for h in hits)

    code, _ = run(capsys, db, "memories", "delete", "--user", "alice", memory["id"])
    assert code == 0
    code, _ = run(capsys, db, "memories", "delete", "--user", "alice", memory["id"])
    assert code == 2  # no such memory: a clear message, not a traceback
    _, out = run(capsys, db, "memories", "erase", "--user", "alice", "--yes", "--json")
    assert orjson.loads(out) == [{"user": "alice", "deleted": 1, "sessions_deleted": 0}]
    _, out = run(capsys, db, "memories", "list", "--user", "bob", "--json")
    assert len(orjson.loads(out)) == 1


def test_export_import(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "m.db"
    run(capsys, db, "memories", "add", "--user", "u", "Likes jazz")
    run(capsys, db, "memories", "add", "--user", "u", "Has a dog named Rex")
    _, exported = run(capsys, db, "memories", "export", "--user", "u")
    dump = tmp_path / "u.jsonl"
    dump.write_text(exported)
    code, out = run(capsys, db, "memories", "import", "--user", "v", str(dump), "--json")
    assert code == 0 and sorted(m["text"] for m in orjson.loads(out)) == ["Has a dog named Rex", "Likes jazz"]
    code = main(["memories", "import", "--user", "v", str(dump), "--db", str(db)], environ={"HOME": str(tmp_path)})
    again = capsys.readouterr()
    assert code == 0 and len(again.out.splitlines()) == 2  # the rows on stdout, the summary on stderr
    assert again.err == f"memory-proxy: read 2 memories from {dump}: 0 created, 0 updated, 2 unchanged\n"
    for empty in ("", "\n\n", "[]"):
        (tmp_path / "empty.jsonl").write_text(empty)
        code = main(["memories", "import", "--user", "v", str(tmp_path / "empty.jsonl"), "--db", str(db)],
                    environ={"HOME": str(tmp_path)})
        said = capsys.readouterr()
        assert code == 0 and said.out == ""
        assert said.err == f"memory-proxy: nothing imported: {tmp_path / 'empty.jsonl'} holds no memories\n"


def test_import_skips_a_byte_order_mark_and_says_a_refusal_imported_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file an editor saved with a UTF-8 byte order mark imports (RFC 8259 lets a parser ignore it); a line that
    is refused says that nothing was imported, which is so: every line is checked before any is written."""
    db = tmp_path / "m.db"
    marked = tmp_path / "bom.jsonl"
    marked.write_bytes(b"\xef\xbb\xbf" + b'{"text": "Likes jazz"}\n')
    joined = tmp_path / "joined.jsonl"  # `cat a.jsonl b.jsonl` of two such files: a mark before a later line too
    joined.write_bytes(b"\xef\xbb\xbf" + b'{"text": "Likes jazz"}\n' + b"\xef\xbb\xbf" + b'{"text": "Likes jazz"}\n')
    assert main(["memories", "import", "--user", "w", str(joined), "--db", str(db)],
                environ={"HOME": str(tmp_path)}) == 0
    capsys.readouterr()
    code = main(["memories", "import", "--user", "u", str(marked), "--db", str(db)], environ={"HOME": str(tmp_path)})
    assert code == 0 and capsys.readouterr().err.endswith("read 1 memory from " + str(marked) + ": 1 created, "
                                                          "0 updated, 0 unchanged\n")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "Has a cat"}\nnot json\n')
    code = main(["memories", "import", "--user", "u", str(broken), "--db", str(db)], environ={"HOME": str(tmp_path)})
    err = capsys.readouterr().err
    assert code == 2 and "line 2 is not valid JSON (nothing was imported)" in err
    _, listed = run(capsys, db, "memories", "list", "--user", "u", "--json")
    assert [m["text"] for m in orjson.loads(listed)] == ["Likes jazz"]


def test_import_with_stderr_closed_keeps_stdout_json(tmp_path: Path) -> None:
    """With stderr closed, Python's print would write the summary to stdout and spoil the JSON there."""
    dump = tmp_path / "u.jsonl"
    dump.write_text('{"text": "Likes jazz"}\n')
    done = subprocess.run(f"{sys.executable} -m proxy memories import --user u {dump} --json --db {tmp_path / 'm.db'} "
                          "2>&-", shell=True, capture_output=True, env={**os.environ, "HOME": str(tmp_path)},
                          cwd=Path(__file__).parent.parent, timeout=300)
    assert done.returncode == 0 and [m["text"] for m in orjson.loads(done.stdout)] == ["Likes jazz"]
    (tmp_path / "bad.jsonl").write_text("not json\n")
    for redirect in ("2>&-", "2>/dev/full"):  # an error, too, stays off stdout, and its exit status is kept
        refused = subprocess.run(f"{sys.executable} -m proxy memories import --user u {tmp_path / 'bad.jsonl'} "
                                 f"--db {tmp_path / 'm.db'} {redirect}", shell=True, capture_output=True,
                                 env={**os.environ, "HOME": str(tmp_path)}, cwd=Path(__file__).parent.parent,
                                 timeout=300)
        assert (refused.returncode, refused.stdout) == (2, b""), redirect


def test_bad_user_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["memories", "list", "--user", "", "--db", str(tmp_path / "m.db")], environ={})
    assert code == 2 and "empty" in capsys.readouterr().err


async def sessions_of(db: Path, *users: str) -> dict[str, bool]:
    """Start a session "s1" for each of `users`; returns which users have one afterwards (alice, bob)."""
    store = await open_store(str(db), dimension=DIMENSION)
    try:
        sessions = await open_session_store(store)
        assert sessions is not None
        for user in users:
            await sessions.append(user, "s1", [NewMessage({"role": "user", "content": "hi"}, 1)], max_messages=10,
                                  ttl_seconds=None)
        return {user: await sessions.get(user, "s1") is not None for user in ("alice", "bob")}
    finally:
        await store.close()


def test_erase_takes_the_users_stored_conversations_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "m.db"
    assert asyncio.run(sessions_of(db, "alice", "bob")) == {"alice": True, "bob": True}
    _, out = run(capsys, db, "memories", "erase", "--user", "alice", "--yes", "--json")
    assert orjson.loads(out) == [{"user": "alice", "deleted": 0, "sessions_deleted": 1}]
    assert asyncio.run(sessions_of(db)) == {"alice": False, "bob": True}


@pytest.mark.parametrize("argv", [["list", "--limit", "0"], ["list", "--limit", "1001"], ["list", "--limit", "-3"],
                                  ["search", "bees", "-k", "0"], ["search", "bees", "-k", "-3"],
                                  ["search", "bees", "-k", "101"], ["search", "bees", "-k", "\u0665"],
                                  ["list", "--limit", "\u00b2"], ["add", "x", "--happened-at", "last May"],
                                  ["add", "x", "--happened-at", "2024-13"]])
def test_the_cli_bounds_what_the_rest_api_bounds(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 argv: list[str]) -> None:
    """The CLI takes what `GET /memories/{user}?limit=`, `/search?k=` and `happened_at` take, no more: a usage
    error (exit 2) that names the bound, and nothing written."""
    db = tmp_path / "m.db"
    run(capsys, db, "memories", "add", "--user", "alice", "Alice keeps bees")
    with pytest.raises(SystemExit) as stopped:
        run(capsys, db, "memories", argv[0], "--user", "alice", *argv[1:])
    error = capsys.readouterr().err
    assert stopped.value.code == 2 and ("whole number from" in error or "ISO 8601" in error)
    _, out = run(capsys, db, "memories", "list", "--user", "alice", "--json")
    assert [m["text"] for m in orjson.loads(out)] == ["Alice keeps bees"]


def test_add_takes_when_it_happened(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "m.db"
    code, out = run(capsys, db, "memories", "add", "--user", "alice", "Alice ran the Porto marathon",
                    "--category", "event", "--happened-at", "2024-05", "--json")
    assert code == 0 and orjson.loads(out)[0]["happened_at"] == "2024-05"


def test_import_of_a_file_that_is_not_there_is_a_clear_error(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["memories", "import", "--user", "alice", str(tmp_path / "nope.jsonl"), "--db",
                 str(tmp_path / "m.db")], environ={"HOME": str(tmp_path)})
    error = capsys.readouterr().err
    assert code == 2 and error.startswith("memory-proxy: cannot read") and "Traceback" not in error


def test_export_into_a_pipe_closed_early_ends_quietly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`memory-proxy memories export ... | head -c 300`: the reader leaves; no traceback, exit 141 (as SIGPIPE)."""
    db = tmp_path / "m.db"
    # Distinct sentences (near-duplicates would merge into a few memories): ~200 KB exported, far more than a pipe
    # holds, so the export must meet the close.
    notes = [{"text": text} for text in sentences(600)]
    (tmp_path / "notes.json").write_bytes(orjson.dumps(notes))
    assert run(capsys, db, "memories", "import", "--user", "alice", str(tmp_path / "notes.json"))[0] == 0
    _, exported = run(capsys, db, "memories", "export", "--user", "alice")
    assert len(exported.encode()) > 3 * 65536
    env = {**os.environ, "HOME": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    exporter = subprocess.Popen([sys.executable, "-m", "proxy", "memories", "export", "--user", "alice", "--db",
                                 str(db)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert exporter.stdout is not None and exporter.stderr is not None
    assert exporter.stdout.read(300)
    exporter.stdout.close()  # as `head` does once it has its bytes
    stderr = exporter.stderr.read().decode()
    assert exporter.wait(60) == 141 and "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


@pytest.mark.parametrize("case", ["stdout to a full disk", "import from a closed stdin"])
def test_what_the_machine_refuses_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    """`memories export ... > /dev/full` and `memories import - <&-`: one line on stderr, no traceback."""
    db = tmp_path / "m.db"
    run(capsys, db, "memories", "add", "--user", "alice", "Alice keeps bees")
    env = {**os.environ, "HOME": str(tmp_path)}
    verb = ["export"] if case.startswith("stdout") else ["import", "-"]
    with open("/dev/full", "wb") as full:
        done = subprocess.run([sys.executable, "-m", "proxy", "memories", *verb, "--user", "alice", "--db", str(db)],
                              stdout=full if case.startswith("stdout") else None,
                              stdin=subprocess.DEVNULL if case.startswith("stdout") else None,
                              stderr=subprocess.PIPE, env=env, timeout=60,
                              preexec_fn=None if case.startswith("stdout") else (lambda: os.close(0)))
    stderr = done.stderr.decode()
    assert done.returncode in (1, 2) and stderr.startswith("memory-proxy: ") and stderr.count("\n") == 1, stderr
    assert "Traceback" not in stderr
