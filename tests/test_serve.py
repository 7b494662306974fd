"""`memory-proxy serve --workers 2` as an operator runs it, in a process of its own: the metrics of both workers
add up in one scrape, every worker logs in the same format, and no worker holds a secret in its environment."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.use import NAME as DEFAULT_MODEL
from tests.fakeupstream import FakeUpstream
from tests.servers import free_port, running

ROOT = Path(__file__).resolve().parent.parent
SECRETS = {"admin_token": "admin-secret-4242-abcdef", "upstream_key": "sk-upstream-secret-7777",
           "metrics_token": "scrape-secret-5151"}
SCRAPER = {"Authorization": f"Bearer {SECRETS['metrics_token']}"}


@dataclass
class Serve:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    tmp: Path
    count: int = 2  # workers

    def lines(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.log.read_text().splitlines()]

    def workers(self) -> list[int]:
        """The uvicorn workers: children started by multiprocessing's spawn."""
        found = []
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            with contextlib.suppress(OSError):  # a thread, or a child, that ended meanwhile
                for child in (task / "children").read_text().split():
                    if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                        found.append(int(child))
        return found

    def served(self, path: str) -> dict[int, int]:
        """Requests for `path` per worker pid, from the access log."""
        counts: dict[int, int] = {}
        for line in self.lines():
            if line["logger"] == "memory_proxy.access" and line["path"] == path:
                counts[line["pid"]] = counts.get(line["pid"], 0) + 1
        return counts


@contextlib.contextmanager
def serve(upstream: str, tmp: Path, workers: int = 2) -> Iterator[Serve]:
    """`python -m proxy serve --workers N` (2 unless told), its secrets in a config file and in the environment,
    JSON logs with an access log, its temporary files in `tmp`; stopped (SIGTERM) at the end."""
    config = tmp / "memory-proxy.toml"
    config.write_text(f'upstream_key = "{SECRETS["upstream_key"]}"\nmetrics_token = "{SECRETS["metrics_token"]}"\n')
    config.chmod(0o600)
    (tmp / "tmp").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEMORY_PROXY_", "PROMETHEUS_"))}
    env |= {"HOME": str(tmp), "TMPDIR": str(tmp / "tmp"), "PYTHONPATH": str(ROOT),
            "MEMORY_PROXY_ADMIN_TOKEN": SECRETS["admin_token"], "MEMORY_PROXY_LOG_FORMAT": "json",
            "MEMORY_PROXY_ACCESS_LOG": "true", "MEMORY_PROXY_ACESS_LOG": "true",
            "MEMORY_PROXY_RECALL_BUDGET_MS": "5000"}
    port = free_port()
    log = tmp / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--port", str(port), "--upstream", upstream,
                                 "--workers", str(workers), "--config", str(config)], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    server = Serve(f"http://127.0.0.1:{port}", proc, log, tmp, workers)
    try:
        wait_for(lambda: ready(server), 120, lambda: log.read_text())
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def ready(server: Serve) -> bool:
    """Every worker has started (each says so in the log), and one answers /readyz."""
    assert server.proc.poll() is None, "serve exited"
    started = [line for line in server.log.read_text().splitlines() if "Application startup complete" in line]
    with contextlib.suppress(httpx.HTTPError):
        return len(started) == server.count and httpx.get(server.url + "/readyz", timeout=1).status_code == 200
    return False


def wait_for(condition: Callable[[], bool], seconds: float = 20, explain: Callable[[], str] = lambda: "") -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out {explain()}"
        time.sleep(0.05)


def scrape(url: str) -> Callable[..., float]:
    response = httpx.get(url + "/metrics", headers=SCRAPER, timeout=10)
    assert response.status_code == 200, response.text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(response.text) for s in family.samples}
    return lambda name, **labels: samples.get((name, tuple(sorted(labels.items()))), 0.0)


def spread(server: Serve, path: str, most: int = 400) -> int:
    """GET `path` on new connections until both workers have served some; how many were sent."""
    sent = 0
    while len(server.served(path)) < 2:
        assert sent < most, f"one worker served all {sent} requests"
        for _ in range(10):
            assert httpx.get(server.url + path, timeout=10).status_code == 200
            sent += 1
        wait_for(lambda n=sent: sum(server.served(path).values()) == n)
    return sent


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FakeUpstream, Serve]]:
    fake = FakeUpstream()
    with running(fake.app) as upstream, serve(upstream + "/v1", tmp_path_factory.mktemp("serve")) as server:
        yield fake, server


def test_the_counts_of_both_workers_add_up(two_workers: tuple[FakeUpstream, Serve]) -> None:
    fake, server = two_workers
    sent = spread(server, "/v1/models")
    for n in range(6):
        fake.reply(f"Noted.\n<memory>[\"User {n} collects stamps from country {n}\"]</memory>")
        response = httpx.post(server.url + "/v1/chat/completions", headers={"X-Memory-User": f"collector-{n}"},
                              json={"model": "m", "messages": [{"role": "user", "content": f"I collect stamps {n}"}]},
                              timeout=30)
        assert response.status_code == 200
    chats = server.served("/v1/chat/completions")
    added = {"operation": "added", "extraction": "inline"}
    wait_for(lambda: scrape(server.url)("memory_proxy_memory_operations_total", **added) == 6)
    for _ in range(6):  # whichever worker answers the scrape, it answers for both
        sample = scrape(server.url)
        assert sample("memory_proxy_requests_total", route="/v1/{path:path}", method="GET", status="200") == sent
        assert sample("memory_proxy_requests_total", route="/v1/chat/completions", method="POST",
                      status="200") == sum(chats.values()) == 6
        assert sample("memory_proxy_added_latency_seconds_count", path="passthrough", stream="false") == sent
        assert sample("memory_proxy_memories_injected_count") == 6
        assert sample("memory_proxy_memory_operations_total", **added) == 6
        assert sample("memory_proxy_write_queue_depth", queue="memories") == 0
    assert httpx.get(server.url + "/metrics", timeout=10).status_code == 401  # the admin token is set


def test_no_worker_holds_a_secret_in_its_environment(two_workers: tuple[FakeUpstream, Serve]) -> None:
    _, server = two_workers
    workers = server.workers()
    assert len(workers) == 2
    for pid in workers:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        names = [entry.partition(b"=")[0] for entry in environ.split(b"\0")]
        assert not [name for name in names if name.startswith(b"MEMORY_PROXY_")]
        for secret in SECRETS.values():
            assert secret.encode() not in environ and secret.encode() not in cmdline
        directory = next(entry for entry in environ.split(b"\0") if entry.startswith(b"PROMETHEUS_MULTIPROC_DIR="))
        assert directory.partition(b"=")[2].startswith(str(server.tmp / "tmp").encode())
    # The supervisor copied nothing in: only what it was started with (the admin token, given that way) is there.
    parent = Path(f"/proc/{server.proc.pid}/environ").read_bytes()
    assert SECRETS["upstream_key"].encode() not in parent and SECRETS["metrics_token"].encode() not in parent


def test_every_process_logs_the_same_json(two_workers: tuple[FakeUpstream, Serve]) -> None:
    _, server = two_workers
    spread(server, "/healthz")
    lines = server.lines()  # each line parsed as JSON, or the test fails here
    pids = {line["pid"] for line in lines}
    assert {server.proc.pid, *server.workers()} <= pids
    for line in lines:
        assert {"time", "level", "logger", "pid", "message"} <= line.keys(), line
    access = [line for line in lines if line["logger"] == "memory_proxy.access"]
    assert len({line["pid"] for line in access}) == 2
    assert len({frozenset(line.keys()) for line in access if line["path"] == "/healthz"}) == 1
    start = [line for line in lines if line["message"].startswith("memory-proxy: store ")]
    assert len(start) == 1 and start[0]["pid"] == server.proc.pid
    assert start[0]["extraction"] == "auto" and start[0]["embedding_model"] == DEFAULT_MODEL
    assert start[0]["data_dir"] == str(server.tmp / ".local" / "share" / "memory-proxy")
    assert any("MEMORY_PROXY_ACESS_LOG" in line["message"] and "MEMORY_PROXY_ACCESS_LOG" in line["message"]
               and line["level"] == "WARNING" for line in lines)
    text = server.log.read_text()
    for secret in SECRETS.values():
        assert secret not in text


def test_a_killed_worker_keeps_its_counts_and_the_metric_files_go_with_serve(tmp_path: Path) -> None:
    fake = FakeUpstream()
    with running(fake.app) as upstream, serve(upstream + "/v1", tmp_path) as server:
        directories = list((tmp_path / "tmp").glob("memory-proxy-metrics-*"))
        assert len(directories) == 1 and directories[0].stat().st_mode & 0o777 == 0o700
        sent = spread(server, "/v1/models")
        chats = 0
        while len(server.served("/v1/chat/completions")) < 2:  # each worker sets its write-queue gauge
            assert chats < 100
            fake.reply("Noted.\n<memory>[\"User is left-handed\"]</memory>")  # new to each user: queued
            httpx.post(server.url + "/v1/chat/completions", headers={"X-Memory-User": f"lefty-{chats}"}, timeout=30,
                       json={"model": "m", "messages": [{"role": "user", "content": "I am left-handed"}]})
            chats += 1
            wait_for(lambda n=chats: sum(server.served("/v1/chat/completions").values()) == n)
        victim = server.workers()[0]
        wait_for(lambda: bool(list(directories[0].glob(f"gauge_live*_{victim}.db"))))  # queued after the answer
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: victim not in server.workers() and len(server.workers()) == 2, 60)
        sample = scrape(server.url)
        assert sample("memory_proxy_requests_total", route="/v1/{path:path}", method="GET", status="200") == sent
        assert not list(directories[0].glob(f"gauge_live*_{victim}.db"))  # its live gauges left the sums
    assert server.proc.returncode == 0
    assert not directories[0].exists()


def test_one_worker_serves_with_the_model_its_start_checked(tmp_path: Path) -> None:
    """With one worker, the model the start loaded to check it is the one that serves (loaded once, not twice:
    ~1 s of start and a model's memory); it learns and recalls with it."""
    fake = FakeUpstream()
    admin = {"Authorization": f"Bearer {SECRETS['admin_token']}"}
    with running(fake.app) as upstream, serve(upstream + "/v1", tmp_path, workers=1) as server:
        fake.reply("Noted.\n<memory>[\"User is left-handed\"]</memory>", "You write with your left hand.")
        chat = {"model": "m", "messages": [{"role": "user", "content": "I am left-handed"}]}
        first = httpx.post(server.url + "/v1/chat/completions", json=chat, headers={"X-Memory-User": "lefty"},
                           timeout=30)
        assert first.json()["choices"][0]["message"]["content"] == "Noted."
        wait_for(lambda: [m["text"] for m in httpx.get(server.url + "/memories/lefty", headers=admin).json()["data"]]
                 == ["User is left-handed"])
        chat["messages"][0]["content"] = "Which hand do I write with?"
        second = httpx.post(server.url + "/v1/chat/completions", json=chat, headers={"X-Memory-User": "lefty"},
                            timeout=30)
        assert second.headers["x-memory-recalled"] == "1"
    loads = [line for line in server.lines() if line["message"].startswith("embedding model")]
    assert len(loads) == 1, loads
