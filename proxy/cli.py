"""The command line: `memory-proxy serve`, and noun-verb commands that work on the store directly."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from proxy import __version__, config
from proxy.config import Settings
from proxy.errors import ProxyError


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
    return parser


def settings_from(args: argparse.Namespace, environ: dict[str, str] | None = None, **extra: Any) -> Settings:
    flags = {name: getattr(args, name, None) for name in ("host", "port", "upstream", "db", "workers", "log_level")}
    return config.load(getattr(args, "config", None), environ, {**flags, **extra})


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    settings = settings_from(args)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every request at INFO: noise in the log and a cost on the hot path.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # Workers are separate processes that load their settings themselves: hand them the resolved ones.
    for name, value in asdict(settings).items():
        os.environ[config.ENV_PREFIX + name.upper()] = str(value)
    uvicorn.run("proxy.app:create_app", factory=True, host=settings.host, port=settings.port,
                workers=settings.workers, log_level=settings.log_level.lower(), access_log=False,
                loop="auto", http="auto", lifespan="on", server_header=False)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.run(args)
        return result
    except ProxyError as exc:
        print(f"memory-proxy: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
