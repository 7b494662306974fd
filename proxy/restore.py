"""Importing one user's memories as exported (`GET /memories/{user}/export`, `memory-proxy memories export`).

An exported line keeps its id, dates (`happened_at` and `valid_until` too), expiry, source and history links on
import, as `memory-proxy migrate` does between stores: the memory comes back as it was, under the importing user,
with its vector made again by the model. A line whose id the user already has replaces that memory only when it
is newer (`updated_at`) or has since been superseded, so importing the same file twice changes nothing. A line
without an `id` (a hand-written file: `{"text", "category"?, "ttl_seconds"?}`) is added like `POST /memories`: a
new id, and a near-duplicate updates the memory it repeats. Every line is checked before anything is written
(and cleaned as every write path cleans: proxy/memories.py `Cleaning`): one bad line is a 400 naming
it, and nothing is stored.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import orjson

from proxy.errors import BadRequest
from proxy.memories import Cleaning, Memories, clean_text
from proxy.models import Memory, NewMemory, happened_at

MEMORY_ID = re.compile(r"[0-9a-f]{20}")  # proxy.models.new_id
Status = str  # "created", "updated" or "unchanged"


BOM = b"\xef\xbb\xbf"


def parse_lines(body: bytes) -> list[Any]:
    """A JSON array, or JSON Lines; a UTF-8 byte order mark before either, or before any line (files joined with
    `cat`), is skipped (editors on Windows write one; RFC 8259 §8.1 lets a parser ignore it)."""
    body = body.removeprefix(BOM)
    if body.lstrip().startswith(b"["):
        try:
            items = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"the body is not a valid JSON array: {exc}", code="invalid_json") from None
        return list(items)
    items = []
    for number, line in enumerate(body.splitlines(), start=1):
        line = line.removeprefix(BOM)
        if line.strip():
            try:
                items.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                raise BadRequest(f"line {number} is not valid JSON", code="invalid_json") from None
    return items


LATEST = 253402300799  # 9999-12-31T23:59:59Z, the last second a datetime (and the prompt's dates) can hold


def restored(item: dict[str, Any], user: str, max_chars: int, where: str, cleaning: Cleaning) -> Memory:
    """The exported line `item` as the user's memory, fields checked (BadRequest naming `where` and the field)."""
    def fail(field: str, why: str) -> BadRequest:
        return BadRequest(f"{where}: '{field}' {why}", param=field)

    def text_field(name: str, limit: int) -> str:
        value = item.get(name)
        cleaned = clean_text(value, limit) if isinstance(value, str) else ""
        if not cleaned:
            raise fail(name, "must be a non-empty string")
        return cleaned

    def number(name: str, default: float | None) -> float | None:
        value = item.get(name, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= LATEST:
            # a time in milliseconds (as many exporters write it) lands past year 9999, which no date can show
            raise fail(name, "must be a time in seconds since the epoch, at most 253402300799 (9999-12-31)")
        return float(value)

    def link(name: str) -> str | None:
        value = item.get(name)
        if value is not None and not (isinstance(value, str) and MEMORY_ID.fullmatch(value)):
            raise fail(name, "must be a memory id or null")
        return value

    memory_id = item["id"]
    if not isinstance(memory_id, str) or not MEMORY_ID.fullmatch(memory_id):
        raise fail("id", "must be a memory id as exported (20 hex digits)")
    text = text_field("text", max_chars)
    category = item.get("category", "fact")
    try:  # the one cleaning of every write path: secrets in any field, contact details, the category's set
        cleaned = cleaning.item(NewMemory(text, category if isinstance(category, str) else "fact"))
    except BadRequest as exc:
        raise BadRequest(f"{where}: {exc.message}", param=exc.param, code=exc.code) from None
    created_at = number("created_at", None)
    created_at = time.time() if created_at is None else created_at
    updated_at = number("updated_at", None)
    updated_at = created_at if updated_at is None else updated_at
    when = happened_at(item.get("happened_at"))
    if item.get("happened_at") is not None and when is None:
        raise fail("happened_at", "must be an ISO 8601 date or date-time")
    return Memory(memory_id, user, cleaned.text, cleaned.category,
                  text_field("source", 64) if "source" in item else "import", created_at, updated_at,
                  number("expires_at", None), link("supersedes"), link("superseded_by"), when,
                  number("valid_until", None))


async def restore(memories: Memories, user: str, items: list[Any],
                  new_memory: Callable[[Any, str], NewMemory]) -> list[tuple[Memory, Status]]:
    """Import `items` (parsed lines) for the store's `user`; `new_memory(item, where)` reads a line without an id
    (proxy/api.py's reader, so both paths check alike). Returns each memory with what happened to it."""
    def read() -> tuple[list[Memory], list[NewMemory]]:
        kept: list[Memory] = []
        added: list[NewMemory] = []
        for number, item in enumerate(items, start=1):
            where = f"item {number}"
            if isinstance(item, dict) and "id" in item:
                kept.append(restored(item, user, memories.max_chars, where, memories.cleaning))
            else:
                try:
                    added.append(replace(new_memory(item, where), source="import"))
                except BadRequest as exc:
                    raise BadRequest(f"{where}: {exc.message}", param=exc.param, code=exc.code) from None
        return kept, added

    # ~0.25 ms an item (the secret scan above all): thousands of lines must not hold the event loop
    kept, added = await asyncio.to_thread(read)
    out: list[tuple[Memory, Status]] = []
    if kept:
        out += await put_back(memories, user, kept)
    if added:
        out += with_status(await memories.add(user, added))
    return out


async def put_back(memories: Memories, user: str, rows: list[Memory]) -> list[tuple[Memory, Status]]:
    """Write the rows with their ids and dates (newer wins), vectors made by the model in one batch."""
    from proxy.migrate import endpoint_of  # not at import: it loads both engines

    statuses: list[Status] = []
    for row in rows:
        old = await memories.store.get(user, row.id)
        if old is None:
            statuses.append("created")
        elif row.updated_at > old.updated_at or (old.superseded_by is None and row.superseded_by is not None):
            statuses.append("updated")
        else:
            statuses.append("unchanged")
    vectors = await memories.embedder.embed([row.text for row in rows])
    await endpoint_of(memories.store).import_rows(list(zip(rows, vectors, strict=True)))
    return [(row if status != "unchanged" else await memories.store.get(user, row.id) or row, status)
            for row, status in zip(rows, statuses, strict=True)]


def with_status(stored: list[Memory]) -> list[tuple[Memory, Status]]:
    """What an add did to each memory it returns: "updated" when the memory existed before (created earlier than
    this write touched it, or earlier in the same batch), else "created"."""
    seen: set[str] = set()
    out = []
    for memory in stored:
        out.append((memory, "updated" if memory.id in seen or memory.created_at < memory.updated_at else "created"))
        seen.add(memory.id)
    return out


def shown(done: list[tuple[Memory, Status]]) -> list[dict[str, Any]]:
    """Each memory as the API and CLI show it, with its status."""
    return [{**memory.to_dict(), "status": status} for memory, status in done]
