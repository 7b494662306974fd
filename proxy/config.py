"""Settings: one frozen object, loaded as defaults < TOML file < MEMORY_PROXY_* environment < flags.

`load()` takes the environment as an argument, so tests pass a dict instead of patching `os.environ`.
Every setting is declared once, in `Settings`, with its help text; the README table and the commented
`config/memory-proxy.toml` are checked against this one declaration by the tests.
"""

from __future__ import annotations

import difflib
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
    log_format: str = setting("text", "Log lines as `text` (one line each) or `json` (one object a line, for log "
                                      "shippers); the same in every worker.")
    access_log: bool = setting(False, "Log one line per request (method, path without the query, status, "
                                      "duration, request id, user) at info.")
    log_content: bool = setting(False, "At debug level, also log memory texts and the text of unreadable "
                                       "`<memory>` blocks (never at info; credentials never).")
    # Upstream
    upstream: str = setting("https://api.openai.com/v1", "Upstream base URL, exactly as an OpenAI client takes it.")
    upstream_key: str = setting("", "If set, sent upstream as `Authorization: Bearer …` instead of the client's.")
    connect_timeout: float = setting(5.0, "Seconds to connect to the upstream (502 after that).")
    read_timeout: float = setting(600.0, "Seconds to wait for upstream bytes, long enough for slow models (504).")
    write_timeout: float = setting(600.0, "Seconds to send the request body upstream.")
    pool_timeout: float = setting(10.0, "Seconds to wait for a free upstream connection from the pool.")
    upstream_check_seconds: float = setting(10.0, "Seconds /readyz trusts what the last upstream exchange showed "
                                                  "before it checks again (GET <upstream>/models, no credentials).")
    max_connections: int = setting(1000, "Upstream connection pool size.")
    max_keepalive: int = setting(200, "Idle upstream connections kept open for reuse.")
    max_body_bytes: int = setting(32 * 1024 * 1024, "Largest request body accepted (413 above it).")
    max_request_head_bytes: int = setting(64 * 1024, "Largest request head (request line and headers, in bytes) "
                                                     "accepted, at most 1000 header fields; 431 and closed above it.")
    request_head_timeout: float = setting(10.0, "Seconds a client has to send a request's head (line and headers), "
                                                "however slowly the bytes come (408 and closed after it).")
    request_body_timeout: float = setting(120.0, "Seconds a client has to send a request's whole body after its head "
                                                 "(408 and closed after it).")
    max_client_connections: int = setting(1000, "Client connections served at once; a request on a connection past "
                                                "it is answered 503 and the connection closed.")
    keep_alive_timeout: float = setting(5.0, "Seconds an idle kept-alive client connection stays open.")
    # Memory
    data_dir: str = setting("", "Data directory; default $XDG_DATA_HOME/memory-proxy or ~/.local/share/memory-proxy.")
    db: str = setting("", "Memory store: a SQLite path or sqlite:///path, or a postgresql:// URL. "
                          "Default <data_dir>/memory.db.")
    model: str = setting("", "Embedding model: use-multilingual (Universal Sentence Encoder multilingual v3, 16 "
                             "languages) or minilm-l6 (all-MiniLM-L6-v2, English). Empty: the model the store's "
                             "vectors were made with, else use-multilingual. Changing it needs `memory-proxy "
                             "reembed`.")
    model_dir: str = setting("", "An ONNX sentence-transformers model directory (model.onnx + tokenizer.json) used "
                                 "instead of `model`.")
    embed_threads: int = setting(1, "Threads the embedding model computes with: onnxruntime's intra-op threads, "
                                    "and numpy's BLAS threads, process-wide.")
    embed_batch: int = setting(32, "Most texts embedded in one model run (concurrent queries are batched).")
    embed_cache: int = setting(2048, "Recent query vectors kept in an LRU cache (0 disables it).")
    user_header: str = setting("X-Memory-User", "Request header that names the end user (else the body's `user`).")
    recall_k: int = setting(5, "Most memories injected into one request.")
    min_similarity: float = setting(0.1, "Least score for recall: the cosine similarity, plus lexical_weight x the "
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
    contact_info: str = setting("keep", "E-mail addresses and phone numbers in a memory: keep, mask (stored as "
                                        "`[email]` / `[phone]`) or refuse (the API answers 400, a chat drops it).")
    phone_region: str = setting("US", "Region (ISO 3166-1 alpha-2) of phone numbers written without a country code, "
                                      "for `contact_info`.")
    admin_token: str = setting("", "If set, `/memories` and `/sessions` require `Authorization: Bearer <token>`.")
    proxy_keys: str = setting("", "`tenant:key,...`: clients must send a proxy key (memory is kept per tenant "
                                  "+ user); needs upstream_key.")
    user_signing_secret: str = setting("", "If set, the user header counts only with a valid "
                                           "`X-Memory-User-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of "
                                           "\"<t>.<user id>\">`.")
    user_signature_max_age: float = setting(300.0, "Seconds a user signature stays valid either side of its "
                                                   "timestamp (clock skew included).")
    user_signature_legacy: bool = setting(False, "Also accept the old unexpiring signature (hex HMAC of the user id "
                                                 "alone) while gateways move to the timestamped one.")
    max_messages: int = setting(2048, "Most messages memory reads in one chat request (items of a Responses "
                                "`input`); a request with more is forwarded as it came, without memory.")
    memory_placement: str = setting("user", "Where recalled memories go: user (at the start of the last user "
                                            "message; the prompt prefix stays cacheable) or system (in the first "
                                            "system/developer message). No message is ever added.")
    filter_max_bytes: int = setting(16 * 1024 * 1024, "Largest non-streamed answer, or single streamed event, "
                                                      "read whole to take a memory block out; past it the rest "
                                                      "is relayed unfiltered.")
    memory_block_max_chars: int = setting(65536, "Longest memory block body; anything longer is not a block and "
                                                 "reaches the client as text.")
    # Learning facts
    extraction: str = setting("auto", "How facts are learned: inline (the model appends a <memory> block), "
                                      "background (a separate extraction call after the answer), auto (inline "
                                      "where the request allows a block, background where it does not), off "
                                      "(recall only).")
    background_models: str = setting("", "Comma-separated glob patterns of models that do not follow the block "
                                         "instruction: auto learns their facts in the background.")
    extract_model: str = setting("", "Model for background extraction calls; default: the chat request's model.")
    extract_upstream: str = setting("", "Base URL for extraction calls; default: the chat upstream.")
    extract_key: str = setting("", "Key for extraction calls (sent as Bearer); default: the chat request's own "
                                   "credentials, or upstream_key.")
    extract_timeout: float = setting(60.0, "Seconds one extraction call may take.")
    extract_max_tokens: int = setting(1024, "Most tokens one extraction call may answer with (`max_tokens`, or "
                                      "`max_completion_tokens` where the model refuses it); 0: no bound.")
    extract_coalesce_seconds: float = setting(2.0, "Turns of one user within this many seconds go to one "
                                                   "extraction call.")
    extract_queue: int = setting(1000, "Turns waiting for background extraction before new ones are dropped.")
    extract_retries: int = setting(3, "Retries of an extraction call answered 429 or 5xx, with backoff.")
    metrics_token: str = setting("", "If set, `GET /metrics` also accepts `Authorization: Bearer <metrics_token>`: "
                                     "a scraper's token that reads metrics and nothing else.")
    metrics_open: bool = setting(False, "Serve `GET /metrics` to anyone who can reach the port even when "
                                        "admin_token, proxy_keys or metrics_token is set (a scraper on a private "
                                        "network).")
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

    @property
    def background_patterns(self) -> tuple[str, ...]:
        return tuple(filter(None, (part.strip() for part in self.background_models.split(","))))


def _default_data_dir(environ: Mapping[str, str]) -> str:
    base = environ.get("XDG_DATA_HOME") or str(Path(environ.get("HOME") or Path.home()) / ".local" / "share")
    return str(Path(base) / "memory-proxy")


def default_db(data_dir: str) -> str:
    """The store used when `db` is not set: a SQLite file in the data directory (created with it)."""
    return str(Path(data_dir) / "memory.db")


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
        values["db"] = default_db(values["data_dir"])
    settings = replace(Settings(), **values)
    _validate(settings)
    return settings


def misspelt(environ: Mapping[str, str] | None = None) -> list[str]:
    """One message per `MEMORY_PROXY_*` variable that names no setting, with the likeliest one meant. Reported,
    not refused: platforms put variables of their own under the prefix (Kubernetes adds `MEMORY_PROXY_SERVICE_HOST`
    and more for a Service named memory-proxy)."""
    environ = os.environ if environ is None else environ
    known = sorted([name.upper() for name in _TYPES] + ["CONFIG"])
    messages = []
    for key in sorted(environ):
        if key.startswith(ENV_PREFIX) and key.removeprefix(ENV_PREFIX) not in known:
            close = difflib.get_close_matches(key.removeprefix(ENV_PREFIX), known, n=1, cutoff=0.8)
            hint = f"; did you mean {ENV_PREFIX}{close[0]}?" if close else ""
            messages.append(f"environment variable {key} is not a memory-proxy setting and is ignored{hint}")
    return messages


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
            close = difflib.get_close_matches(name, list(_TYPES), n=1, cutoff=0.8)
            raise ConfigError(f"{path}: unknown setting {name!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
        values[name] = _coerce(name, value, str(path))
    return values


def _validate(s: Settings) -> None:
    from proxy.store import locate  # not at import: the store package loads numpy

    if not s.upstream.startswith(("http://", "https://")):
        raise ConfigError(f"upstream must be an http:// or https:// URL, got {s.upstream!r}")
    locate(s.db)  # an unknown scheme (mysql://…) stops here, never becomes a file of that name
    positive = ["port", "workers", "max_connections", "max_client_connections", "embed_threads", "embed_batch",
                "recall_k", "max_body_bytes", "max_request_head_bytes", "write_queue", "memory_max_chars",
                "max_messages", "session_max_messages", "summary_keep_messages", "filter_max_bytes",
                "memory_block_max_chars", "extract_queue"]
    for name in positive:
        if getattr(s, name) < 1:
            raise ConfigError(f"setting {name!r} must be at least 1")
    for name in ("profile_max", "profile_max_chars"):
        if getattr(s, name) < 0:
            raise ConfigError(f"setting {name!r} must not be negative")
    if not 0.0 <= s.lexical_weight <= 2.0:
        raise ConfigError("setting 'lexical_weight' must be between 0 and 2")
    if s.upstream_check_seconds < 0:
        raise ConfigError("setting 'upstream_check_seconds' must not be negative")
    for name in ("min_similarity", "dedupe_similarity", "conversation_min_similarity"):
        if not -1.0 <= getattr(s, name) <= 1.0:
            raise ConfigError(f"setting {name!r} must be a cosine similarity between -1 and 1")
    for name in ("request_head_timeout", "request_body_timeout", "keep_alive_timeout", "user_signature_max_age"):
        if getattr(s, name) <= 0:
            raise ConfigError(f"setting {name!r} must be positive")
    if s.contact_info not in ("keep", "mask", "refuse"):
        raise ConfigError(f"contact_info must be keep, mask or refuse, got {s.contact_info!r}")
    if len(s.phone_region) != 2 or not s.phone_region.isalpha() or not s.phone_region.isupper():
        raise ConfigError(f"phone_region must be a two-letter upper-case region code (ISO 3166-1), got "
                          f"{s.phone_region!r}")
    if s.model not in ("", "use-multilingual", "minilm-l6"):
        raise ConfigError(f"model must be use-multilingual or minilm-l6 (or set model_dir), got {s.model!r}")
    if s.log_level.lower() not in {"debug", "info", "warning", "error", "critical"}:
        raise ConfigError(f"log_level must be debug, info, warning or error, got {s.log_level!r}")
    if s.memory_placement not in ("user", "system"):
        raise ConfigError(f"memory_placement must be user or system, got {s.memory_placement!r}")
    if s.extraction not in ("inline", "background", "auto", "off"):
        raise ConfigError(f"extraction must be inline, background, auto or off, got {s.extraction!r}")
    if s.extract_upstream and not s.extract_upstream.startswith(("http://", "https://")):
        raise ConfigError(f"extract_upstream must be an http:// or https:// URL, got {s.extract_upstream!r}")
    for name in ("extract_timeout", "extract_coalesce_seconds", "extract_retries"):
        if getattr(s, name) < 0:
            raise ConfigError(f"setting {name!r} must not be negative")
    if s.log_format not in ("text", "json"):
        raise ConfigError(f"log_format must be text or json, got {s.log_format!r}")
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
