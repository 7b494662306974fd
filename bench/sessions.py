"""Added cost of conversation memory: each session mode side by side in one run.

    python -m bench.sessions [--requests 400] [--turns 20]

One instant upstream (bench/upstream.py) and one proxy (`memory-proxy serve`) per mode, all on 127.0.0.1:

    off       session_history = off: the memory path as it is (recall, inject, forward, filter, remember)
    store     + every turn stored after the answer, and chunked and embedded for recall when the proxy is quiet
    prepend   + the stored turns put in front of each new message
    budget    + context_budgets = "*=600" and a summary model: older turns summarised, the rest trimmed to fit

Every iteration sends one new message (a new question each time, so no cache answers it; a new session every
--turns messages, so prepend's history grows from 0 to 2 x (turns - 1) messages) to the upstream directly, then to
each proxy in turn, interleaved so that machine drift hits all alike. The table gives each mode's added latency
over the direct call at p50 and p95, and its p50 over the `off` mode: the cost of the mode itself. Concurrency 1,
so the client sends its next message the moment it has an answer: the worst case for `prepend`, which then waits
for the previous turn's write, and for the background indexing, which then seldom finds a quiet moment. All the
proxies share the machine's cores, so one proxy's background embedding also shows in the others' p95.
"""

from __future__ import annotations

import argparse
import tempfile
from contextlib import ExitStack

import httpx
import orjson

from bench.harness import Server, fake_upstream, memory_proxy, ms, percentile, table
from bench.latency import timed
from bench.seed import question

MODES: dict[str, dict[str, str]] = {
    "off": {},
    "store": {"MEMORY_PROXY_SESSION_HISTORY": "store"},
    "prepend": {"MEMORY_PROXY_SESSION_HISTORY": "prepend"},
    "budget": {"MEMORY_PROXY_SESSION_HISTORY": "prepend", "MEMORY_PROXY_CONTEXT_BUDGETS": "*=600",
               "MEMORY_PROXY_SUMMARY_MODEL": "bench-cheap", "MEMORY_PROXY_SUMMARY_KEEP_MESSAGES": "8"},
}
HEADER = ["mode", "direct p50", "proxy p50", "added p50", "added p95", "p50 over off"]


def chat(client: httpx.Client, base: str, i: int, turns: int, mode: str) -> float:
    """One new message of session i // turns; seconds until the whole answer is in."""
    body = orjson.dumps({"model": "bench", "messages": [{"role": "user", "content": question(i)}]})
    headers = {"content-type": "application/json", "x-memory-user": f"bench-{mode}",
               "x-memory-session": f"s{i // turns}"}
    return timed(client, "POST", base + "/chat/completions", body, headers)[1]


def measure(upstream: str, proxies: dict[str, Server], requests: int, turns: int) -> list[list[object]]:
    direct: dict[str, list[float]] = {mode: [] for mode in proxies}
    proxied: dict[str, list[float]] = {mode: [] for mode in proxies}
    with httpx.Client(timeout=60) as client:
        for i in range(-2 * turns, requests):  # two sessions' worth of warm-up (pools, caches, the model)
            for mode, proxy in proxies.items():
                before, after = chat(client, upstream, i, turns, mode), chat(client, proxy.url, i, turns, mode)
                if i >= 0:
                    direct[mode].append(before)
                    proxied[mode].append(after)
    added = {mode: [p - d for p, d in zip(proxied[mode], direct[mode], strict=True)] for mode in proxies}
    base = percentile(proxied["off"], 50)
    return [[mode, ms(percentile(direct[mode], 50)), ms(percentile(proxied[mode], 50)),
             ms(percentile(added[mode], 50)), ms(percentile(added[mode], 95)),
             ms(percentile(proxied[mode], 50) - base)] for mode in proxies]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sessions", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400, help="messages per mode (after the warm-up)")
    parser.add_argument("--turns", type=int, default=20, help="messages per session")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}")
    args = parser.parse_args()
    modes = ["off", *(mode for mode in args.modes.split(",") if mode != "off")]  # off is the baseline
    if unknown := set(modes) - set(MODES):
        parser.error(f"unknown modes: {', '.join(sorted(unknown))}")
    with fake_upstream() as upstream, ExitStack() as stack:
        proxies = {mode: stack.enter_context(memory_proxy(upstream, stack.enter_context(tempfile.TemporaryDirectory()),
                                                          env=MODES[mode])) for mode in modes}
        rows = measure(upstream, proxies, args.requests, args.turns)
    print(f"### Conversation memory: added latency per mode (concurrency 1, {args.requests} messages each, "
          f"sessions of {args.turns})\n")
    print(table(HEADER, rows))


if __name__ == "__main__":
    main()
