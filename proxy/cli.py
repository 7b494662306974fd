"""The command line: `memory-proxy serve`, and noun-verb commands that work on the store directly."""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import logging.config
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from proxy import __version__, config
from proxy.api import new_memory
from proxy.auth import namespaced, parse_proxy_keys
from proxy.config import Settings
from proxy.errors import BadRequest, NotFound, ProxyError
from proxy.memories import open_memories
from proxy.models import NewMemory, check_user_id
from proxy.reembed import reembed_command
from proxy.restore import parse_lines, restore, shown, with_status
from proxy.store import Store, check_creatable, locate, stored_dimension
from proxy.store.sessions import open_session_store

if TYPE_CHECKING:
    from proxy.embed import Embedder

log = logging.getLogger("memory_proxy")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memory-proxy", description=__doc__)
    parser.add_argument("--version", action="version", version=f"memory-proxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the proxy")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8080)")
    serve.add_argument("--upstream", help="upstream base URL, as an OpenAI client takes it")
    serve.add_argument("--db", help="SQLite path or sqlite:///path, or a postgresql:// URL")
    serve.add_argument("--workers", type=int, help="worker processes")
    serve.add_argument("--config", help="TOML settings file (default $MEMORY_PROXY_CONFIG)")
    serve.add_argument("--log-level", dest="log_level", help="debug, info, warning or error")
    serve.set_defaults(run=run_serve)

    migrate = commands.add_parser("migrate", help="copy every memory from one store to another (run it again to "
                                  "catch up: nothing is copied twice)")
    migrate.add_argument("--from", dest="source", required=True, metavar="URL",
                         help="the store to read: a SQLite path or sqlite:///path, or a postgresql:// URL")
    migrate.add_argument("--to", dest="target", required=True, metavar="URL",
                         help="the store to write (created if need be)")
    migrate.add_argument("--batch", type=int, default=1000, help="rows per transaction")
    migrate.set_defaults(run=run_migrate)

    demo = commands.add_parser("demo-upstream", help="run a stand-in model on 127.0.0.1 that follows the memory "
                               "protocol, to try the proxy without an API key")
    demo.add_argument("--port", type=int, default=9000, help="port to listen on (default 9000)")
    demo.set_defaults(run=run_demo_upstream)
    reembed = commands.add_parser("reembed", help="re-embed every stored memory for the configured model "
                                  "(stop the proxies first; resumable: run it again after an interruption)")
    reembed.add_argument("--db", help="SQLite path or sqlite:///path, or a postgresql:// URL")
    reembed.add_argument("--config", help="TOML settings file (model_dir names the new model)")
    reembed.add_argument("--batch", type=int, default=256, help="texts per model run and transaction")
    reembed.set_defaults(run=lambda args: asyncio.run(reembed_command(settings_from(args), args.batch)))

    memories = commands.add_parser("memories", help="read and change memories in the store directly")
    verbs = memories.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, help: str) -> argparse.ArgumentParser:
        sub = verbs.add_parser(name, help=help)
        sub.add_argument("--user", required=True, help="the end user whose memories these are (an id that "
                         "starts with '-' goes as --user=ID)")
        sub.add_argument("--tenant", help="the tenant (proxy_keys) the user belongs to, as X-Memory-Tenant names "
                         "it in the API; without it, the memories kept outside every tenant")
        sub.add_argument("--db", help="SQLite path or sqlite:///path, or a postgresql:// URL")
        sub.add_argument("--config", help="TOML settings file")
        sub.add_argument("--json", action="store_true", help="print JSON instead of text")
        sub.set_defaults(run=run_memories)
        return sub

    listing = verb("list", "newest first")
    listing.add_argument("--limit", type=int, default=100)
    listing.add_argument("--history", action="store_true", help="include superseded memories")
    search = verb("search", "the memories closest in meaning to a text")
    search.add_argument("query")
    search.add_argument("-k", type=int, default=5)
    add = verb("add", "store a memory (a near-duplicate updates the existing one)")
    add.add_argument("text")
    add.add_argument("--category", default="fact")
    add.add_argument("--ttl", type=float, help="seconds until it expires")
    delete = verb("delete", "remove one memory")
    delete.add_argument("id")
    erase = verb("erase", "remove every memory and stored conversation of the user")
    erase.add_argument("--yes", action="store_true", required=True, help="yes, erase them all")
    verb("export", "write every memory of the user as JSON Lines")
    verb("import", "add memories from JSON Lines (as exported) or a JSON array").add_argument(
        "file", help="a file, or - for standard input")
    return parser


def settings_from(args: argparse.Namespace, environ: dict[str, str] | None = None, **extra: Any) -> Settings:
    names = ("host", "port", "upstream", "db", "workers", "log_level")
    flags = {name: getattr(args, name, None) for name in names}
    return config.load(getattr(args, "config", None), environ or getattr(args, "environ", None), {**flags, **extra})


def preflight(settings: Settings, environ: Mapping[str, str] | None = None) -> Embedder:
    """Load what every worker will load (keys, egress, model, store) once, before serving: a missing or broken
    part stops the start with one line (main prints the ProxyError) instead of a traceback from each worker's
    lifespan. `environ` (default os.environ, what the workers read) holds the proxy and CA variables. Returns the
    embedding model, loaded and running, for its caller to close: a single worker serves with it instead of
    loading it again (~1 s for the default model)."""
    from proxy.auth import Gate
    from proxy.egress import Egress
    from proxy.embed import load_configured
    from proxy.store import open_store

    Gate.from_settings(settings)
    Egress.from_environ(os.environ if environ is None else environ, settings.upstream)
    if settings.db != config.default_db(settings.data_dir):  # the default store's directory is made for it
        check_creatable(settings.db)
    embedder = load_configured(settings)

    async def check_store() -> None:
        store = await open_store(settings.db, dimension=embedder.dimension,
                                 dedupe_similarity=settings.dedupe_similarity, model=embedder.name)
        await store.close()

    try:
        asyncio.run(check_store())
    except BaseException:
        asyncio.run(embedder.close())
        raise
    return embedder


def run_serve(args: argparse.Namespace) -> int:
    """Run uvicorn on the app factory. The workers are handed the resolved settings as the factory's argument,
    pickled through the pipe that starts each one (multiprocessing's spawn), never through the environment,
    where `/proc/PID/environ` would show their secrets for the life of the process."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    from proxy import logs, metrics
    from proxy.app import create_app
    from proxy.server import server_options

    settings = settings_from(args)
    log_config = logs.config(settings)
    logging.config.dictConfig(log_config)
    for message in config.misspelt(args.environ):
        log.warning(message)
    embedder = preflight(settings)
    logs.startup(settings, embedder.name)
    for name in [name for name in os.environ if name.startswith(config.ENV_PREFIX)]:
        del os.environ[name]  # resolved into `settings`: the workers need none of them, secrets least of all
    single = settings.workers == 1
    if not single:
        asyncio.run(embedder.close())  # each worker process loads its own
    factory = functools.partial(create_app, settings, embedder=embedder if single else None)
    server = uvicorn.Config(factory, factory=True, host=settings.host,
                            port=settings.port, workers=settings.workers, log_config=log_config,
                            log_level=settings.log_level.lower(), access_log=False, loop="auto", lifespan="on",
                            **server_options(settings))
    if single:
        try:
            worker = uvicorn.Server(server)
            worker.run()
        finally:
            # After the app's lifespan, which stored its queued writes. (On SIGTERM uvicorn raises the signal again
            # once the lifespan is over, and the process ends there: the model thread is a daemon.)
            asyncio.run(embedder.close())
        return 0 if worker.started else 3  # uvicorn's exit status for a failed start
    with metrics.multiprocess_directory():
        Multiprocess(server, sockets=[server.bind_socket()]).run()
    return 0


def run_demo_upstream(args: argparse.Namespace) -> int:
    import uvicorn

    from proxy.demo import create_demo_app

    print(f"demo upstream on http://127.0.0.1:{args.port}/v1 (not a model: it recognises simple statements "
          f"about the user); point the proxy at it: memory-proxy serve --upstream http://127.0.0.1:{args.port}/v1",
          file=sys.stderr, flush=True)
    uvicorn.run(create_demo_app(), host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
    return 0


def run_migrate(args: argparse.Namespace) -> int:
    from proxy.migrate import copy

    def progress(copied: Any) -> None:
        print(f"\r{copied.read} memories read", end="", file=sys.stderr, flush=True)

    copied = asyncio.run(copy(args.source, args.target, batch=max(1, args.batch), progress=progress))
    print(file=sys.stderr)
    print(f"{copied}.")
    return 0


def run_memories(args: argparse.Namespace) -> int:
    if args.verb == "import":  # read before the event loop starts: a file read would block it
        args.data = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    return asyncio.run(memories_command(args, settings_from(args)))


CREATES = frozenset({"add", "import"})  # the verbs that may start a new store; the others need one that exists


async def memories_command(args: argparse.Namespace, settings: Settings) -> int:
    for value, noun in ((args.user, "user id"), (args.tenant, "tenant")):
        problem = value is not None and check_user_id(value, noun)
        if problem:
            raise BadRequest(problem)
    warn_about_tenants(args, settings)
    new_store = await check_store(args.verb, settings)
    async with open_memories(settings) as memories:
        if new_store:
            print(f"memory-proxy: created a new memory store at {new_store}", file=sys.stderr)
        store, user = memories.store, namespaced(args.tenant, args.user)
        if args.verb == "list":
            rows = [m.to_dict() for m in await store.list(user, args.limit, include_history=args.history)]
            show(args, rows)
            await hint_tenants(args, store, found=bool(rows))
        elif args.verb == "search":
            hits = await memories.recall(user, args.query, k=args.k, min_similarity=-1.0, profile=False)
            show(args, [h.to_dict() for h in hits])
            await hint_tenants(args, store, found=bool(hits))
        elif args.verb == "add":
            item = memories.cleaning.item(NewMemory(args.text, args.category, "cli", args.ttl))  # 400s say why
            show(args, shown(with_status(await memories.add(user, [item]))))
        elif args.verb == "delete":
            if not await store.forget(user, args.id):
                raise NotFound(f"no memory {args.id!r} for user {args.user!r}")
            show(args, [{"id": args.id, "deleted": True}])
        elif args.verb == "erase":  # their stored conversations go with them, as through the API
            sessions = await open_session_store(store)
            erased = await sessions.erase(user) if sessions is not None else 0
            show(args, [{"user": args.user, "deleted": await store.erase(user), "sessions_deleted": erased}])
        elif args.verb == "export":
            before = None
            while page := await store.list(user, 500, before=before, include_history=True):
                for memory in page:
                    sys.stdout.write(orjson.dumps(memory.to_dict()).decode() + "\n")
                before = page[-1].id
            await hint_tenants(args, store, found=before is not None)
        elif args.verb == "import":
            done = await restore(memories, user, parse_lines(args.data),
                                 lambda item, where: new_memory(item, param=where, cleaning=memories.cleaning))
            show(args, shown(done))
    return 0


async def check_store(verb: str, settings: Settings) -> str | None:
    """Refuse what would make a store by mistake: a command that only reads or removes needs an existing store
    (a typo in --db is an error naming the path, not an empty store); one that adds may create it, in a directory
    that exists unless it is the default store in the data directory. Returns the path of a store about to be
    created (to say so), else None."""
    if verb not in CREATES:
        await stored_dimension(settings.db)
        return None
    return await asyncio.to_thread(creating, settings)


def creating(settings: Settings) -> str | None:
    kind, path = locate(settings.db)
    if kind != "sqlite" or path in ("", ":memory:") or Path(path).expanduser().exists():
        return None
    if settings.db != config.default_db(settings.data_dir):
        check_creatable(settings.db)
    return path


def warn_about_tenants(args: argparse.Namespace, settings: Settings) -> None:
    """With proxy keys on, the chat path keeps every memory within a tenant: say so when the command names none,
    and when it names one that no key belongs to."""
    tenants = sorted(set(parse_proxy_keys(settings.proxy_keys).values()))
    if tenants and args.tenant is None:
        print(f"memory-proxy: proxy_keys is set, so the proxy keeps memories per tenant ({', '.join(tenants)}); "
              "without --tenant this works on memories kept outside every tenant", file=sys.stderr)
    elif tenants and args.tenant not in tenants:
        print(f"memory-proxy: tenant {args.tenant!r} has no key in proxy_keys ({', '.join(tenants)})",
              file=sys.stderr)


async def hint_tenants(args: argparse.Namespace, store: Store, *, found: bool) -> None:
    """Nothing found outside a tenant, but the user has memories within some: name them."""
    if found or args.tenant is not None:
        return
    tenants = await store.tenants_of(args.user)
    if tenants:
        print(f"memory-proxy: nothing for {args.user!r} outside a tenant; tenant(s) {', '.join(tenants)} have "
              "memories of this user: pass --tenant", file=sys.stderr)


def show(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    if args.json:
        sys.stdout.write(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    for row in rows:
        if "text" in row:
            score = f"{row['score']:.3f}  " if "score" in row else ""
            old = "  (superseded)" if row.get("superseded_by") else ""
            status = f"  ({row['status']})" if "status" in row else ""
            print(f"{row['id']}  {score}[{row['category']}] {row['text']}{old}{status}")
        else:
            print("  ".join(f"{k}={v}" for k, v in row.items()))


def main(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.environ = environ
    try:
        result: int = args.run(args)
        return result
    except ProxyError as exc:
        print(f"memory-proxy: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
