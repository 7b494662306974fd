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
from typing import TYPE_CHECKING, Any

from proxy import __version__, config, memories_cli
from proxy.config import Settings
from proxy.errors import ProxyError
from proxy.reembed import reembed_command
from proxy.store import check_creatable

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

    memories_cli.add_parser(commands)
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


def main(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> int:
    if sys.stderr is None:  # started with stderr closed: Python's print and argparse would write to stdout instead
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
    args = build_parser().parse_args(argv)
    args.environ = environ
    try:
        result: int = args.run(args)
        return result
    except ProxyError as exc:
        memories_cli.say(exc.message)  # an unwritable stderr must not turn the exit status into another
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader left (`... | head`): what it read is what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit must not fail too
        return 141  # 128 + SIGPIPE, as a shell reports a command its pipe stopped
    except OSError as exc:  # the machine's refusal (a full disk for the output, say): one line
        memories_cli.say(f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""))
        return 1
