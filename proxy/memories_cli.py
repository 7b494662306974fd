"""`memory-proxy memories VERB --user U`: read and change one user's memories in the store directly (list, search,
add, delete, erase, export, import), with the bounds and checks the REST API gives the same operations."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from proxy import config
from proxy.api import MAX_LIST, new_memory
from proxy.auth import namespaced, parse_proxy_keys
from proxy.config import Settings
from proxy.errors import BadRequest, NotFound
from proxy.memories import open_memories
from proxy.models import NewMemory, check_name, check_user_id, happened_at, whole_number
from proxy.restore import parse_lines, restore, shown, with_status
from proxy.store import Store, check_creatable, locate, stored_dimension
from proxy.store.sessions import open_session_store


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The `memories` noun and its verbs, on the top parser's subcommands."""
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
    listing.add_argument("--limit", type=whole(1, MAX_LIST), default=100, help=f"1 to {MAX_LIST} (default 100)")
    listing.add_argument("--history", action="store_true", help="include superseded memories")
    search = verb("search", "the memories closest in meaning to a text")
    search.add_argument("query")
    search.add_argument("-k", type=whole(1, 100), default=5, help="how many, 1 to 100 (default 5)")
    add = verb("add", "store a memory (a near-duplicate updates the existing one)")
    add.add_argument("text")
    add.add_argument("--category", default="fact")
    add.add_argument("--ttl", type=float, help="seconds until it expires")
    add.add_argument("--happened-at", dest="happened_at", type=when_it_happened,
                     help="when it happened, ISO 8601 as precise as known: 2024, 2024-05, 2024-05-12")
    delete = verb("delete", "remove one memory")
    delete.add_argument("id")
    erase = verb("erase", "remove every memory and stored conversation of the user")
    erase.add_argument("--yes", action="store_true", required=True, help="yes, erase them all")
    verb("export", "write every memory of the user as JSON Lines")
    verb("import", "add memories from JSON Lines (as exported) or a JSON array").add_argument(
        "file", help="a file, or - for standard input")


def whole(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number from `low` to `high`, the bounds the REST API gives the same parameter."""
    def parse(raw: str) -> int:
        value = whole_number(raw, low, high)
        if value is None:
            raise argparse.ArgumentTypeError(f"must be a whole number from {low} to {high}")
        return value
    return parse


def when_it_happened(raw: str) -> str:
    """An argparse type: `happened_at` as the REST API takes it (proxy/models.py: happened_at)."""
    when = happened_at(raw)
    if when is None:
        raise argparse.ArgumentTypeError("must be an ISO 8601 date or date-time (2024, 2024-05, 2024-05-12, "
                                         "2024-05-12T18:30Z)")
    return when


def run_memories(args: argparse.Namespace) -> int:
    if args.verb == "import":  # read before the event loop starts: a file read would block it
        try:
            if args.file == "-" and sys.stdin is None:
                raise BadRequest("import -: there is no standard input to read (it is closed)")
            args.data = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
        except OSError as exc:
            raise BadRequest(f"cannot read {args.file}: {exc.strerror or exc}") from None
    settings = config.load(args.config, args.environ, {"db": args.db})
    return asyncio.run(memories_command(args, settings))


CREATES = frozenset({"add", "import"})  # the verbs that may start a new store; the others need one that exists


async def memories_command(args: argparse.Namespace, settings: Settings) -> int:
    # An id an earlier release stored can still be listed, exported and erased; new memories need a plain one.
    for value, noun, check in ((args.user, "user id", check_user_id if args.verb in CREATES else check_name),
                               (args.tenant, "tenant", check_name)):
        problem = value is not None and check(value, noun)
        if problem:
            raise BadRequest(problem)
    warn_about_tenants(args, settings)
    new_store = await check_store(args.verb, settings)
    async with open_memories(settings) as memories:
        if new_store:
            say(f"created a new memory store at {new_store}")
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
            item = memories.cleaning.item(NewMemory(args.text, args.category, "cli", args.ttl,  # 400s say why
                                                    happened_at=args.happened_at))
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
            try:
                done = await restore(memories, user, parse_lines(args.data),
                                     lambda item, where: new_memory(item, param=where, cleaning=memories.cleaning))
            except BadRequest as exc:  # every line is read and checked before any is written
                raise BadRequest(f"{exc.message} (nothing was imported)", param=exc.param, code=exc.code) from None
            show(args, shown(done))
            say(imported(done, args.file))
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
        say(f"proxy_keys is set, so the proxy keeps memories per tenant ({', '.join(tenants)}); without --tenant "
            "this works on memories kept outside every tenant")
    elif tenants and args.tenant not in tenants:
        say(f"tenant {args.tenant!r} has no key in proxy_keys ({', '.join(tenants)})")


async def hint_tenants(args: argparse.Namespace, store: Store, *, found: bool) -> None:
    """Nothing found outside a tenant, but the user has memories within some: name them."""
    if found or args.tenant is not None:
        return
    tenants = await store.tenants_of(args.user)
    if tenants:
        say(f"nothing for {args.user!r} outside a tenant; tenant(s) {', '.join(tenants)} have memories of this "
            "user: pass --tenant")


def imported(done: list[tuple[Any, str]], file: str) -> str:
    """What an import did, in one line: what became of each memory it read (created, updated, which includes a
    line merged into a memory as a restatement, and unchanged), or that the input held none (an empty file, an
    empty array: nothing is written, and the user should know)."""
    source = "standard input" if file == "-" else file
    if not done:
        return f"nothing imported: {source} holds no memories"
    counts = {status: sum(1 for _, got in done if got == status) for status in ("created", "updated", "unchanged")}
    return (f"read {len(done)} {'memory' if len(done) == 1 else 'memories'} from {source}: "
            + ", ".join(f"{n} {status}" for status, n in counts.items()))


def say(line: str) -> None:
    """A note for the person at the terminal, on stderr (stdout holds the rows only). Informational: a stderr that
    is closed (proxy/cli.py: main puts /dev/null there), full or gone changes nothing of what was done, nor the
    exit status."""
    with contextlib.suppress(OSError, ValueError):
        print(f"memory-proxy: {line}", file=sys.stderr, flush=True)


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
