"""The proxy's upstream client, side by side: our HTTP/1.1 transport (proxy/h1.py) against well-kept candidates,
each in a proxy process of its own in front of the same instant upstream, on pass-through requests.

    python -m bench.transports                                 h1, aiohttp, httpcore; 3 rounds
    python -m bench.transports --candidates h1,aiohttp --rounds 5 --requests 3000 --seconds 10

Latency: every round calls the upstream directly, then each proxy, interleaved request by request (so the shared
machine's drift hits all alike); *added* is proxy minus direct at the same percentile. Throughput: wrk (one
thread, keep-alive) for each proxy in turn, the order rotating every round. The medians over the rounds close the
report. Candidates: `h1` (what ships), `aiohttp` (bench/aiohttp_transport.py; `pip install aiohttp`), `httpcore`
(httpx's own AsyncHTTPTransport). Targets (README, Speed): pass-through <= 1 ms added at p50, >= 1,000 req/s at
32 connections.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Callable
from contextlib import ExitStack

import httpx

from bench import latency, throughput
from bench.harness import Server, fake_upstream, free_port, ms, percentile, process, table
from bench.load import have_wrk

CANDIDATES = ("h1", "aiohttp", "httpcore")


def transport(name: str, limits: httpx.Limits, timeout: httpx.Timeout) -> httpx.AsyncBaseTransport | None:
    if name == "h1":
        return None  # the proxy's own default
    if name == "httpcore":
        return httpx.AsyncHTTPTransport(limits=limits, trust_env=False)
    if name == "aiohttp":
        from bench.aiohttp_transport import AiohttpTransport

        return AiohttpTransport(limits, timeout)
    raise SystemExit(f"unknown candidate {name!r}: choose from {', '.join(CANDIDATES)}")


def serve(name: str, port: int, upstream: str, data_dir: str) -> None:
    """One proxy worker (uvloop + httptools, as `serve` runs it) with the candidate as its upstream client."""
    import uvicorn

    from proxy import config
    from proxy.app import create_app

    settings = config.load(environ={}, overrides={"upstream": upstream, "port": port, "data_dir": data_dir,
                                                  "log_level": "warning"})
    limits = httpx.Limits(max_connections=settings.max_connections, max_keepalive_connections=settings.max_keepalive)
    timeout = httpx.Timeout(connect=settings.connect_timeout, read=settings.read_timeout,
                            write=settings.write_timeout, pool=settings.pool_timeout)
    app = create_app(settings, transport=transport(name, limits, timeout), environ={})
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="on",
                server_header=False)


def latency_round(direct: str, proxies: dict[str, str], n: int) -> list[list[object]]:
    rows: list[list[object]] = []
    with httpx.Client(timeout=60) as client:
        for label, make in (("GET /v1/models", lambda base: latency.get(client, base + "/models")),
                            ("chat, no user", lambda base: latency.chat(client, base + "/chat/completions",
                                                                        stream=False))):
            calls: dict[str, Callable[[int], latency.Timing]] = {"direct": make(direct)}
            calls |= {name: make(url) for name, url in proxies.items()}
            for i in range(min(200, n)):  # warm pools alike
                for call in calls.values():
                    call(-1 - i)
            samples: dict[str, list[float]] = {name: [] for name in calls}
            for i in range(n):
                for name, call in calls.items():
                    samples[name].append(call(i)[1])
            for name in proxies:
                added = [percentile(samples[name], q) - percentile(samples["direct"], q) for q in (50, 95, 99)]
                rows.append([label, name, ms(percentile(samples["direct"], 50)), *map(ms, added)])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.transports", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", default=",".join(CANDIDATES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=2000, help="interleaved requests per latency row")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each wrk run")
    parser.add_argument("--connections", default="1,32")
    parser.add_argument("--serve", nargs=4, metavar=("NAME", "PORT", "UPSTREAM", "DATA"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        name, port, upstream, data = args.serve
        serve(name, int(port), upstream, data)
        return
    if not have_wrk():
        sys.exit("wrk is not installed: `apt-get install -y wrk`")
    names = [n for n in args.candidates.split(",") if n]
    connections = [int(c) for c in args.connections.split(",")]
    added: dict[tuple[str, str], list[float]] = {}
    rates: dict[tuple[str, str, int], list[float]] = {}
    with ExitStack() as stack:
        direct = stack.enter_context(fake_upstream())
        proxies: dict[str, Server] = {}
        for name in names:
            port, data = free_port(), stack.enter_context(tempfile.TemporaryDirectory())
            proc = stack.enter_context(process([sys.executable, "-m", "bench.transports", "--serve", name, str(port),
                                                direct, data], f"http://127.0.0.1:{port}/readyz", timeout=120))
            proxies[name] = Server(f"http://127.0.0.1:{port}/v1", proc)
        for r in range(args.rounds):
            rows = latency_round(direct, {n: s.url for n, s in proxies.items()}, args.requests)
            for row in rows:
                added.setdefault((str(row[0]), str(row[1])), []).append(float(str(row[3])))
            print(f"### Round {r + 1}: added latency, concurrency 1 ({args.requests} interleaved requests a row, ms)\n")
            print(table(["request", "client", "direct p50", "added p50", "added p95", "added p99"], rows) + "\n")
            measured: list[list[object]] = []
            order = names[r % len(names):] + names[:r % len(names)]
            for c in connections:
                for name in order:
                    for label, load in (("GET /v1/models", throughput.models(proxies[name].url)),
                                        ("chat, no user", throughput.chat(proxies[name].url))):
                        m = throughput.measure(throughput.Target(name, load, proxies[name].proc.pid), c, args.seconds,
                                               "wrk")
                        rates.setdefault((label, name, c), []).append(m.result.rate)
                        measured.append([label, name, c, f"{m.result.rate:,.0f}", ms(m.result.p50), ms(m.result.p99),
                                         m.result.errors])
            print(f"### Round {r + 1}: throughput ({args.seconds:.0f} s a row, wrk)\n")
            print(table(["request", "client", "connections", "req/s", "p50 ms", "p99 ms", "errors"], measured) + "\n")
    summary = [[label, name, f"{statistics.median(values):.2f}", f"{min(values):.2f}-{max(values):.2f}"]
               for (label, name), values in added.items()]
    print(f"### Medians over {args.rounds} rounds\n")
    print(table(["request", "client", "added p50 ms (median)", "range"], summary) + "\n")
    print(table(["request", "client", "connections", "req/s (median)", "range"],
                [[label, name, c, f"{statistics.median(v):,.0f}", f"{min(v):,.0f}-{max(v):,.0f}"]
                 for (label, name, c), v in sorted(rates.items(), key=lambda kv: (kv[0][2], kv[0][0]))]))


if __name__ == "__main__":
    main()
