"""Logging: one configuration for the supervisor and every worker, and the request each line belongs to.

    config(settings)    the `logging.config.dictConfig` dict that `serve` applies, and hands uvicorn to apply in
                        each worker (so every process logs in the same format at the same level)
    RequestContext      per request: its id, the end user once known, the time spent waiting for the upstream;
                        held in a context variable, so every log line written while serving the request (the
                        memory writer's too) carries the id and the user without passing them around
    request_id()        the client's `X-Request-ID` when it is sane, else a new one

What never reaches a log: credentials (headers, keys, tokens, the password of a database URL), and, unless
`log_content` is set and the level is debug, memory texts and message content (`content()` shows their length).
"""

from __future__ import annotations

import logging
import re
import secrets
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter as BaseJsonFormatter

from proxy.models import TENANT_SEPARATOR

if TYPE_CHECKING:
    from proxy.config import Settings

log = logging.getLogger("memory_proxy")
# RFC 9110 token characters and a few more that ids use (UUIDs, `req_...`, base64); nothing that could break a
# log line or a header.
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._~:/+=@-]{1,128}")
PASSWORD_PARAMETER = re.compile(r"(?i)([?&](?:ssl)?password=)[^&#]*")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process)d]%(context)s: %(message)s"
_show_content = False


@dataclass(slots=True)
class RequestContext:
    id: str
    user: str | None = None
    tenant: str | None = None
    upstream_wait: float = 0.0  # seconds spent waiting on the upstream so far (proxy/instrumentation.py)


CURRENT: ContextVar[RequestContext | None] = ContextVar("memory_proxy_request", default=None)


def current() -> RequestContext | None:
    """The request being served by this task, if any."""
    return CURRENT.get()


def request_id(sent: bytes | None) -> str:
    """The client's `X-Request-ID` if it is 1-128 characters of `A-Z a-z 0-9 . _ ~ : / + = @ -`, else 16 new
    random hex digits."""
    if sent:
        text = sent.decode("latin-1")
        if SANE_REQUEST_ID.fullmatch(text):
            return text
    return secrets.token_hex(8)


def identified(user: str) -> None:
    """Note the store's id of the request's end user (`tenant<US>user`) for the request's log lines."""
    context = CURRENT.get()
    if context is not None:
        tenant, _, context.user = user.rpartition(TENANT_SEPARATOR)
        context.tenant = tenant or None


def show_content(enabled: bool) -> None:
    """Whether `content()` shows texts (the `log_content` setting; per process)."""
    global _show_content
    _show_content = enabled


def content(text: str) -> str:
    """A memory text or message content for a debug line: itself with `log_content`, else only its length."""
    return repr(text) if _show_content else f"<{len(text)} characters>"


def redact_url(url: str) -> str:
    """A URL fit for a log line: no password in its authority, no `password=` in its query; else unchanged."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    cut = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:cut], rest[cut:]
    if "@" in authority:
        credentials, _, host = authority.rpartition("@")
        user, colon, _ = credentials.partition(":")
        authority = f"{user}{':***' if colon else ''}@{host}"
    return scheme + sep + authority + PASSWORD_PARAMETER.sub(r"\1***", tail)


class RequestFilter(logging.Filter):
    """Adds `request_id`, `user` and `tenant` to the records written while serving a request."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = CURRENT.get()
        if context is not None:
            record.request_id = context.id
            if context.user is not None:
                record.user = context.user
            if context.tenant is not None:
                record.tenant = context.tenant
        return True


class TextFormatter(logging.Formatter):
    """`time LEVEL logger [pid] request=… tenant=… user=…: message`; the request part only within a request."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        parts = [f" request={record.request_id}"] if hasattr(record, "request_id") else []
        if hasattr(record, "tenant"):
            parts.append(f" tenant={record.tenant!r}")
        if hasattr(record, "user"):
            parts.append(f" user={record.user!r}")
        record.context = "".join(parts)
        return super().format(record)


class JsonFormatter(BaseJsonFormatter):
    """One JSON object a line: `time` (ISO 8601, UTC), `level`, `logger`, `pid`, `message`, and within a request
    `request_id`, `tenant`, `user`; lines with extra fields (the access log, the start-up line) carry them too."""

    def __init__(self) -> None:
        super().__init__("{levelname}{name}{process}{message}", style="{", timestamp="time",
                         rename_fields={"levelname": "level", "name": "logger", "process": "pid"},
                         reserved_attrs=[*RESERVED_ATTRS, "color_message"],  # uvicorn's, with terminal colours
                         json_ensure_ascii=False)


def config(settings: Settings) -> dict[str, Any]:
    """The `logging.config.dictConfig` configuration for the settings: every line to standard error in
    `log_format` at `log_level`, uvicorn's loggers included; httpx only from warnings up (it logs each request)."""
    level = settings.log_level.upper()
    formatter = "proxy.logs.JsonFormatter" if settings.log_format == "json" else "proxy.logs.TextFormatter"
    quiet = {"level": "WARNING", "handlers": [], "propagate": True}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request": {"()": "proxy.logs.RequestFilter"}},
        "formatters": {"default": {"()": formatter}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr",
                                "formatter": "default", "filters": ["request"]}},
        "root": {"level": level, "handlers": ["stderr"]},
        "loggers": {
            **{name: {"level": level, "handlers": [], "propagate": True}
               for name in ("uvicorn", "uvicorn.error", "uvicorn.access")},
            "httpx": quiet, "httpcore": quiet,
        },
    }


def describe_store(db: str) -> str:
    """The store as a log line names it: a SQLite path as is, a URL without its password."""
    return redact_url(db) if "://" in db else db


def startup(settings: Settings, model: str) -> None:
    """The one line that says what this proxy runs on: store, upstream, model, data directory, extraction."""
    extraction = getattr(settings, "extraction", "inline")  # a setting once background extraction exists
    fields = {"store": describe_store(settings.db), "upstream": redact_url(settings.upstream),
              "embedding_model": model, "data_dir": settings.data_dir, "extraction": extraction,
              "workers": settings.workers, "listen": f"http://{settings.host}:{settings.port}"}
    log.info("memory-proxy: " + ", ".join(f"{key.replace('_', ' ')} {value}" for key, value in fields.items()),
             extra=fields)
