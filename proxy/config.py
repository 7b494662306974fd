"""Settings: one frozen object, loaded as defaults < TOML file < MEMORY_PROXY_* environment < flags.

`load()` takes the environment as an argument, so tests pass a dict instead of patching `os.environ`.
Every setting is declared once, in `Settings`, with its help text; the README table and the commented
`config/memory-proxy.toml` are checked against this one declaration by the tests.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from proxy.errors import ConfigError

ENV_PREFIX = "MEMORY_PROXY_"


def setting(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True, slots=True)
class Settings:
    # Server
    host: str = setting("127.0.0.1", "Address to listen on. Keep 127.0.0.1 unless clients must reach it remotely.")
    port: int = setting(8080, "Port to listen on.")
    workers: int = setting(1, "Worker processes (`serve --workers`). SQLite works with several; PostgreSQL scales.")
    log_level: str = setting("info", "Log level: debug, info, warning, error.")
    # Upstream
    upstream: str = setting("https://api.openai.com/v1", "Upstream base URL, exactly as an OpenAI client takes it.")
    upstream_key: str = setting("", "If set, sent upstream as `Authorization: Bearer …` instead of the client's.")
    connect_timeout: float = setting(5.0, "Seconds to connect to the upstream (502 after that).")
    read_timeout: float = setting(600.0, "Seconds to wait for upstream bytes, long enough for slow models (504).")
    write_timeout: float = setting(600.0, "Seconds to send the request body upstream.")
    pool_timeout: float = setting(10.0, "Seconds to wait for a free upstream connection from the pool.")
    max_connections: int = setting(1000, "Upstream connection pool size.")
    max_keepalive: int = setting(200, "Idle upstream connections kept open for reuse.")
    max_body_bytes: int = setting(32 * 1024 * 1024, "Largest request body accepted (413 above it).")
    # Memory
    data_dir: str = setting("", "Data directory; default $XDG_DATA_HOME/memory-proxy or ~/.local/share/memory-proxy.")
    db: str = setting("", "Memory store: a SQLite path or sqlite:///path, or a postgresql:// URL. "
                          "Default <data_dir>/memory.db.")
    model: str = setting("use-multilingual", "Embedding model: use-multilingual (Universal Sentence Encoder "
                                             "multilingual v3, 16 languages) or minilm-l6 (all-MiniLM-L6-v2, English); "
                                             "changing it needs `memory-proxy reembed`.")
    model_dir: str = setting("", "An ONNX sentence-transformers model directory (model.onnx + tokenizer.json) used "
                                 "instead of `model`.")
    embed_threads: int = setting(1, "onnxruntime intra-op threads for the embedding model.")
    embed_batch: int = setting(32, "Most texts embedded in one model run (concurrent queries are batched).")
    embed_cache: int = setting(2048, "Recent query vectors kept in an LRU cache (0 disables it).")
    user_header: str = setting("X-Memory-User", "Request header that names the end user (else the body's `user`).")
    recall_k: int = setting(5, "Most memories injected into one request.")
    min_similarity: float = setting(0.15, "Least score for recall: the cosine similarity, plus lexical_weight x the "
                                          "share of the question's rare words a memory holds (README: Recall).")
    lexical_weight: float = setting(0.5, "Weight of keyword (BM25) matches in recall's score beside the cosine "
                                         "similarity (0: vectors only).")
    profile_max: int = setting(5, "Most profile memories (category `profile`) injected into every request, ahead of "
                                  "the recalled ones (0: none).")
    profile_max_chars: int = setting(600, "Most characters of profile memories injected into one request.")
    dedupe_similarity: float = setting(0.9, "Cosine similarity at or above which a new memory updates an old one.")
    recall_budget_ms: float = setting(50.0, "Time allowed for recall; past it the request goes on without memory.")
    inject_max_chars: int = setting(2000, "Most characters of recalled memories injected into one request.")
    memory_max_chars: int = setting(500, "Longest memory text stored; longer texts are cut.")
    write_queue: int = setting(1000, "Pending memory writes held off the request path before new ones are dropped.")
    admin_token: str = setting("", "If set, `/memories` and `/sessions` require `Authorization: Bearer <token>`.")
    proxy_keys: str = setting("", "`tenant:key,...`: clients must send a proxy key (memory is kept per tenant "
                                  "+ user); needs upstream_key.")
    user_signing_secret: str = setting("", "If set, the user header counts only with a valid "
                                           "`X-Memory-User-Signature` (hex HMAC-SHA256 of the user id).")
    max_messages: int = setting(2048, "Most messages accepted in one chat request (400 above it).")
    # Conversation memory
    session_history: str = setting("off", "Sessions (`X-Memory-Session` header or `metadata.session_id`): off, "
                                          "store (turns kept and searchable), prepend (the stored turns go in front "
                                          "of the client's new messages).")
    session_max_messages: int = setting(200, "Most messages kept per session; the oldest go first.")
    session_ttl_seconds: float = setting(2592000.0, "Seconds a session lives after its last turn (0: forever); "
                                                    "expired sessions are purged, their chunks stay for recall.")
    context_window: int = setting(0, "Most non-system messages sent upstream, newest whole turns first (0: no limit).")
    context_budgets: str = setting("", "`model=tokens,...` (wildcards, first match wins, 0: none), e.g. "
                                       "`gpt-4o-mini=8000,*=0`: the oldest turns are left out until a request fits.")
    summary_model: str = setting("", "Model (a cheaper one) that folds older session turns into a rolling summary, "
                                     "off the request path; empty: no summaries.")
    summary_keep_messages: int = setting(20, "Newest session messages kept verbatim, out of the summary; older "
                                             "ones are summarised.")
    recall_conversations: bool = setting(False, "Also inject excerpts of the user's other conversations that match "
                                                "the question.")
    conversation_min_similarity: float = setting(0.4, "Least cosine similarity for recalling a conversation excerpt.")

    @property
    def upstream_base(self) -> str:
        return self.upstream.rstrip("/")


def _default_data_dir(environ: Mapping[str, str]) -> str:
    base = environ.get("XDG_DATA_HOME") or str(Path(environ.get("HOME") or Path.home()) / ".local" / "share")
    return str(Path(base) / "memory-proxy")


def settings_help() -> list[tuple[str, str, Any, str]]:
    """(name, type, default, help) for every setting, in declaration order."""
    rows = []
    for f in fields(Settings):
        default = f.default if f.default is not MISSING else None
        rows.append((f.name, _type_name(f.type), default, f.metadata["help"]))
    return rows


def _type_name(annotation: Any) -> str:
    return annotation if isinstance(annotation, str) else annotation.__name__


_TYPES = {f.name: _type_name(f.type) for f in fields(Settings)}


def _coerce(name: str, value: Any, origin: str) -> Any:
    kind = _TYPES[name]
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            lowered = str(value).strip().lower()
            if lowered in {"1", "true", "yes", "on"}:
                return True
            if lowered in {"0", "false", "no", "off", ""}:
                return False
            raise ValueError(value)
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if not isinstance(value, str):
            raise ValueError(value)
        return value
    except (TypeError, ValueError):
        raise ConfigError(f"{origin}: setting {name!r} must be {kind}, got {value!r}") from None


def load(path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None,
         overrides: Mapping[str, Any] | None = None) -> Settings:
    """Build the settings. `path` falls back to $MEMORY_PROXY_CONFIG; `overrides` are command-line flags
    (None values are ignored, so argparse defaults of None never mask the file or the environment)."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    path = path or environ.get(ENV_PREFIX + "CONFIG") or None
    if path:
        values.update(_read_file(Path(path)))
    for name in _TYPES:
        key = ENV_PREFIX + name.upper()
        if key in environ:
            values[name] = _coerce(name, environ[key], f"environment {key}")
    for name, value in (overrides or {}).items():
        if value is None:
            continue
        if name not in _TYPES:
            raise ConfigError(f"unknown setting {name!r}")
        values[name] = _coerce(name, value, "command line")
    if not values.get("data_dir"):
        values["data_dir"] = _default_data_dir(environ)
    values["data_dir"] = str(Path(values["data_dir"]).expanduser())
    if not values.get("db"):
        values["db"] = str(Path(values["data_dir"]) / "memory.db")
    settings = replace(Settings(), **values)
    _validate(settings)
    return settings


def _read_file(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    values = {}
    for name, value in data.items():
        if name not in _TYPES:
            raise ConfigError(f"{path}: unknown setting {name!r}")
        values[name] = _coerce(name, value, str(path))
    return values


def _validate(s: Settings) -> None:
    if not s.upstream.startswith(("http://", "https://")):
        raise ConfigError(f"upstream must be an http:// or https:// URL, got {s.upstream!r}")
    positive = ["port", "workers", "max_connections", "embed_threads", "embed_batch", "recall_k",
                "max_body_bytes", "write_queue", "memory_max_chars", "max_messages", "session_max_messages",
                "summary_keep_messages"]
    for name in positive:
        if getattr(s, name) < 1:
            raise ConfigError(f"setting {name!r} must be at least 1")
    for name in ("profile_max", "profile_max_chars"):
        if getattr(s, name) < 0:
            raise ConfigError(f"setting {name!r} must not be negative")
    if not 0.0 <= s.lexical_weight <= 2.0:
        raise ConfigError("setting 'lexical_weight' must be between 0 and 2")
    for name in ("min_similarity", "dedupe_similarity", "conversation_min_similarity"):
        if not -1.0 <= getattr(s, name) <= 1.0:
            raise ConfigError(f"setting {name!r} must be a cosine similarity between -1 and 1")
    if s.model not in ("use-multilingual", "minilm-l6"):
        raise ConfigError(f"model must be use-multilingual or minilm-l6 (or set model_dir), got {s.model!r}")
    if s.log_level.lower() not in {"debug", "info", "warning", "error", "critical"}:
        raise ConfigError(f"log_level must be debug, info, warning or error, got {s.log_level!r}")
    _validate_sessions(s)


def _validate_sessions(s: Settings) -> None:
    from proxy.context import parse_budgets  # not at import: it loads the tokenizer library

    if s.session_history not in ("off", "store", "prepend"):
        raise ConfigError(f"session_history must be off, store or prepend, got {s.session_history!r}")
    for name in ("session_ttl_seconds", "context_window"):
        if getattr(s, name) < 0:
            raise ConfigError(f"setting {name!r} must not be negative")
    if s.summary_keep_messages >= s.session_max_messages:
        raise ConfigError("summary_keep_messages must be below session_max_messages (older messages are summarised "
                          "before they are dropped)")
    try:
        parse_budgets(s.context_budgets)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def render_toml() -> str:
    """The commented default settings file, `config/memory-proxy.toml`; a test keeps the two equal."""
    lines = ["# memory-proxy settings. Every setting is shown with its default, commented out.",
             "# Precedence: built-in defaults < this file < MEMORY_PROXY_<NAME> environment < command-line flags.",
             "# Use it with `memory-proxy serve --config FILE` or MEMORY_PROXY_CONFIG=FILE.", ""]
    for name, _kind, default, help_text in settings_help():
        lines.append(f"# {help_text}")
        lines.append(f"# {name} = {_toml_value(default)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def render_markdown_table() -> str:
    """The settings table of the README; a test keeps the two equal."""
    rows = ["| setting | environment | type | default | what it does |", "|---|---|---|---|---|"]
    for name, kind, default, help_text in settings_help():
        shown = f"`{default}`" if default != "" else ""
        rows.append(f"| `{name}` | `{ENV_PREFIX}{name.upper()}` | {kind} | {shown} | {help_text} |")
    return "\n".join(rows)
