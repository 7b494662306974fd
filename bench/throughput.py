"""Throughput at fixed concurrency: req/s and p50/p99 latency from a real load generator, with the peak RSS
of the server under test sampled while the load runs. The bare upstream's figure is the ceiling."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import orjson

from bench.harness import RssSampler, ms
from bench.latency import CHAT
from bench.load import Load, Result, run
from bench.seed import question

JSON = (("Content-Type", "application/json"),)
VARY = "I need it for note 0."  # the counter goes here: every memory-path request asks a new question


def models(base: str, headers: tuple[tuple[str, str], ...] = ()) -> Load:
    return Load("GET", base + "/models", headers=headers)


def chat(base: str, headers: tuple[tuple[str, str], ...] = ()) -> Load:
    return Load("POST", base + "/chat/completions", orjson.dumps(CHAT), JSON + headers)


def memory_chat(base: str, user: str) -> Load:
    body = orjson.dumps({"model": "bench", "messages": [{"role": "user", "content": question(0)}]})
    assert VARY.encode() in body
    return Load("POST", base + "/chat/completions", body, (*JSON, ("X-Memory-User", user)), vary=VARY)


@dataclass
class Target:
    name: str
    load: Load
    pid: int | None = None  # the server whose RSS is sampled


@dataclass
class Measured:
    target: Target
    connections: int
    result: Result
    rss_peak: float | None


def measure(target: Target, connections: int, seconds: float, tool: str) -> Measured:
    run(target.load, connections, min(2.0, seconds / 2), tool)  # warm-up: pools fill, first-time costs paid
    if target.pid is None:
        return Measured(target, connections, run(target.load, connections, seconds, tool), None)
    with RssSampler(target.pid) as rss:
        result = run(target.load, connections, seconds, tool)
    return Measured(target, connections, result, rss.peak)


def rows(measured: Sequence[Measured]) -> list[list[object]]:
    out: list[list[object]] = []
    for m in measured:
        r = m.result
        ratio = f"{r.p99 / r.p50:.1f}x" if r.p50 else "-"
        rss = f"{m.rss_peak:.0f}" if m.rss_peak is not None else "-"
        out.append([m.target.name, m.connections, f"{r.rate:,.0f}", ms(r.p50), ms(r.p99), ratio, r.errors, rss])
    return out


HEADER = ["target", "connections", "req/s", "p50 ms", "p99 ms", "p99/p50", "errors", "peak RSS MiB"]


def versus(ours: Sequence[Measured], theirs: Sequence[Measured]) -> list[list[object]]:
    """memory-proxy against LiteLLM on the same request and concurrency."""
    out: list[list[object]] = []
    for a in ours:
        for b in theirs:
            if a.connections == b.connections and b.result.rate:
                out.append([a.target.name, a.connections, f"{a.result.rate:,.0f}", f"{b.result.rate:,.0f}",
                            f"{a.result.rate / b.result.rate:.1f}x", ms(a.result.p50), ms(b.result.p50),
                            ms(a.result.p99), ms(b.result.p99)])
    return out


VERSUS_HEADER = ["request", "connections", "memory-proxy req/s", "LiteLLM req/s", "ratio", "ours p50 ms",
                 "LiteLLM p50 ms", "ours p99 ms", "LiteLLM p99 ms"]
