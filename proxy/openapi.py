"""The proxy's own HTTP API as an OpenAPI 3.1 document, served at GET /openapi.json.

For client generators, and for the fuzzer: tests/test_openapi.py points schemathesis at this document and checks
that nothing it can send gets a 5xx, an undocumented status or a body that breaks the schemas here. Described:
the management API (/memories/{user}/…, proxy/api.py), /healthz, /readyz, /metrics, and the request shapes of
/v1/chat/completions and /v1/responses, loosely: the rest of /v1 is the upstream's API, passed through, not ours
to describe.
Limits in the document (memory text length, messages per request, the user header) come from the settings.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from proxy import __version__
from proxy.api import MAX_LIST
from proxy.config import Settings
from proxy.models import INVISIBLE_RANGES, MAX_USER_ID, char_class

Schema = dict[str, Any]
# What check_name accepts (a path's user, a session): no control characters. What check_user_id accepts (an id new
# memories are filed under): that, and none of the INVISIBLE format characters (those of the Basic Multilingual
# Plane: a JSON Schema pattern is ECMA-262's, which has no escape for the others; where joiners and variation
# selectors belong, and no whitespace at the ends, are beyond a pattern). In a path the id is one percent-encoded
# segment.
CONTROLS = r"\u0000-\u001f\u007f-\u009f"
NAME_PATTERN = f"^[^{CONTROLS}]+$"
USER_PATTERN = (f"^[^{CONTROLS}"
                + char_class([r for r in INVISIBLE_RANGES if r[1] <= 0xFFFF], lambda point: f"\\u{point:04x}") + "]+$")
SEGMENT = ("One percent-encoded path segment: any id the chat path accepts, `/` sent as `%2F`, `%` as `%25`, "
           "non-ASCII as UTF-8 (`team/alice` → `team%2Falice`).")
ID_PART_PATTERN = f"^[^{CONTROLS}]*$"  # empty, or a user id without the path's limits
MEMORY_ID_PATTERN = r"^[0-9a-f]{20}$"  # proxy.models.new_id
NOT_BLANK = r"\S"
# One server-sent event: its data is a chat.completion.chunk, "[DONE]", or {"error": …} when the upstream broke off.
SSE_EVENT = {"type": "object", "properties": {"data": {"type": "string"}, "event": {"type": "string"},
                                              "id": {"type": "string"}, "retry": {"type": "integer"}}}


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def json_content(schema: Schema) -> Schema:
    return {"application/json": {"schema": schema}}


def error(description: str) -> Schema:
    return {"description": description, "content": json_content(ref("Error"))}


def nullable(kind: str) -> Schema:
    return {"type": [kind, "null"]}


def listing(item: Schema) -> Schema:
    return {"type": "object", "required": ["object", "data"],
            "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": item}}}


def schemas(settings: Settings) -> dict[str, Schema]:
    text = {"type": "string", "minLength": 1, "maxLength": settings.memory_max_chars, "pattern": NOT_BLANK,
            "description": "Stored cleaned: control characters removed, whitespace folded. Obvious secrets "
                           "(keys, card numbers, passwords) are refused with a 400."}
    category = {"type": "string", "minLength": 1, "maxLength": 64, "pattern": NOT_BLANK,
                "description": "preference, fact, context… (stored lower-cased)"}
    ttl = {"type": ["number", "null"], "exclusiveMinimum": 0, "description": "Seconds until it expires."}
    happened = {"type": ["string", "null"], "maxLength": 40,
                "description": "When it happened, ISO 8601 as precise as known: 2024, 2024-05, 2024-05-12, "
                               "2024-05-12T18:30Z (anything else is a 400)."}
    memory_fields = {"id": {"type": "string"}, "user": {"type": "string"}, "text": {"type": "string"},
                     "category": {"type": "string"}, "source": {"type": "string"},
                     "created_at": {"type": "number"}, "updated_at": {"type": "number"},
                     "expires_at": nullable("number"), "supersedes": nullable("string"),
                     "superseded_by": nullable("string"), "happened_at": nullable("string"),
                     "valid_until": nullable("number")}
    end_user = {"type": "string", "minLength": 1, "maxLength": MAX_USER_ID, "pattern": USER_PATTERN,
                "description": "Names the end user when the user header does not."}
    session_name = {"type": "string", "minLength": 1, "maxLength": MAX_USER_ID, "pattern": NAME_PATTERN,
                    "description": "The conversation this turn belongs to (sessions are named after it)."}
    return {
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["message", "type", "param", "code"],
            "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                           "param": nullable("string"), "code": nullable("string")}}}},
        "Memory": {"type": "object", "required": list(memory_fields), "properties": memory_fields},
        "StoredMemory": {"allOf": [ref("Memory"), {"type": "object", "required": ["status"], "properties": {
            "status": {"enum": ["created", "updated", "unchanged"], "description": "created: a new memory; "
                       "updated: an existing one (a near-duplicate, or the same id with a newer updated_at); "
                       "unchanged: an import line the user already had as it is"}}}]},
        "Hit": {"allOf": [ref("Memory"), {"type": "object", "required": ["score"],
                                          "properties": {"score": {"type": "number"}}}]},
        "NewMemory": {"type": "object", "required": ["text"],
                      "properties": {"text": text, "category": category, "ttl_seconds": ttl, "happened_at": happened}},
        "MemoryPatch": {"type": "object", "properties": {"text": text, "category": category, "ttl_seconds": ttl,
                                                         "happened_at": happened},
                        "anyOf": [{"required": ["text"]}, {"required": ["category"]}, {"required": ["ttl_seconds"]},
                                  {"required": ["happened_at"]}]},
        "Session": {"type": "object", "required": ["object", "id", "user", "messages"], "properties": {
            "object": {"const": "session"}, "id": {"type": "string"}, "user": {"type": "string"},
            "created_at": {"type": "number"}, "updated_at": {"type": "number"}, "expires_at": nullable("number"),
            "messages": {"type": "integer", "minimum": 0}, "first_seq": {"type": "integer"},
            "last_seq": {"type": "integer"}, "summary": {"type": "string"},
            "summarized_through": {"type": "integer"}}},
        "MemoryList": {"allOf": [listing(ref("Memory")), {"type": "object", "required": ["has_more", "last_id"],
                                                          "properties": {"has_more": {"type": "boolean"},
                                                                         "last_id": nullable("string")}}]},
        "Message": {"type": "object", "required": ["role"], "properties": {
            "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
            "content": {"type": ["string", "array", "null"]}}},
        "ChatRequest": {
            "type": "object", "required": ["model", "messages"],
            "description": "An OpenAI chat completion request; fields not listed here go upstream as they came.",
            "properties": {"model": {"type": "string"}, "stream": {"type": "boolean"},
                           "messages": {"type": "array", "maxItems": settings.max_messages, "items": ref("Message")},
                           "user": end_user}},
        "ResponseRequest": {
            "type": "object", "required": ["model"],
            "description": "An OpenAI Responses API request; fields not listed here go upstream as they came.",
            "properties": {"model": {"type": "string"}, "stream": {"type": "boolean"},
                           "input": {"oneOf": [{"type": "string"}, {"type": "array", "maxItems": settings.max_messages,
                                                                    "items": {"type": "object"}}]},
                           "instructions": {"type": ["string", "null"]},
                           "previous_response_id": session_name, "conversation": session_name, "user": end_user}},
    }


def with_memory(summary: str, request: str, user_header: str) -> Schema:
    """A model call on the memory path: the user header, the request's schema, the answers it can have."""
    return {
        "summary": summary,
        "parameters": [{"name": user_header, "in": "header", "required": False,
                        "description": "The end user (else the body's user; neither: forwarded untouched)",
                        "schema": {"type": "string", "minLength": 1, "maxLength": MAX_USER_ID,
                                   "pattern": r"^[\u0020-\u007e]+$"}}],
        "requestBody": {"required": True, "content": json_content(ref(request))},
        "responses": {
            "200": {"description": "The upstream's answer without the block: JSON, or SSE when streamed",
                    "content": {"application/json": {"schema": {"type": "object"}},
                                "text/event-stream": {"schema": SSE_EVENT}}},
            "400": error("Malformed request or user id"), "401": error("A proxy key is required"),
            "413": error("The body is over max_body_bytes"),
            "502": error("The upstream could not be reached"), "504": error("The upstream did not answer in time"),
            "default": error("An error the upstream answered, passed on unchanged")},
        "security": [{}, {"bearer": []}]}


def user_param() -> Schema:
    return {"name": "user", "in": "path", "required": True,
            "description": "The end user whose memories these are. " + SEGMENT + " New memories are filed only "
                           "under an id that shows as itself (no invisible format characters or line breaks, "
                           "something visible, no whitespace at the ends); one an earlier release stored can still "
                           "be read, exported and erased.",
            "schema": {"type": "string", "minLength": 1, "maxLength": MAX_USER_ID, "pattern": NAME_PATTERN}}


def query(name: str, schema: Schema, description: str, required: bool = False) -> Schema:
    return {"name": name, "in": "query", "required": required, "description": description, "schema": schema}


def memory_operation(summary: str, ok: Schema, *, status: str = "200", params: list[Schema] | None = None,
                     body: Schema | None = None, found: bool = False) -> Schema:
    """An operation of the management API: the user in the path, the errors every one of them can answer."""
    responses: Schema = {status: ok, "400": error("Malformed request or user id"),
                         "401": error("The admin token or a proxy key is required"),
                         "404": error("No such memory" if found else "Memory is not enabled on this proxy"),
                         "503": error("The memory store is unavailable (locked, read-only, full)")}
    operation: Schema = {"summary": summary, "parameters": [user_param(), *(params or [])], "responses": responses,
                         "security": [{}, {"bearer": []}]}
    if body is not None:
        operation["requestBody"] = {"required": True, "content": json_content(body)}
        responses["413"] = error("The body is over max_body_bytes")
    return operation


def users_operation() -> Schema:
    """GET /users (proxy/users_api.py): guarded like the rest, but no user in the path."""
    user = {"type": "object", "required": ["object", "id"],
            "properties": {"object": {"const": "user"}, "id": {"type": "string"}}}
    part = {"type": "string", "maxLength": MAX_USER_ID, "pattern": ID_PART_PATTERN}
    listed = {"allOf": [listing(user), {"type": "object", "required": ["has_more", "last_id"], "properties": {
        "has_more": {"type": "boolean"}, "last_id": nullable("string")}}]}
    return {"summary": "The users the store holds memories, sessions or conversation excerpts of, in the store's "
                       "text order (a proxy key: its tenant's; the admin token: X-Memory-Tenant's, or those of no "
                       "tenant)",
            "parameters": [query("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIST}, "At most this many"),
                           query("after", part, "The last id of the previous page"),
                           query("prefix", part, "Only ids that start with this")],
            "responses": {"200": ok("The users", listed), "400": error("Malformed query"),
                          "401": error("The admin token or a proxy key is required"),
                          "404": error("Memory is not enabled on this proxy"),
                          "503": error("The memory store is unavailable (locked, read-only, full)")},
            "security": [{}, {"bearer": []}]}


def with_ok(operation: Schema, response: Schema) -> Schema:
    operation["responses"]["200"] = response
    return operation


def one_session(summary: str, ok: Schema, params: list[Schema] | None = None) -> Schema:
    operation = memory_operation(summary, ok, found=True, params=params)
    operation["responses"]["404"] = error("No such session, or conversation memory is not available")
    operation["parameters"].append({"name": "session", "in": "path", "required": True, "description": SEGMENT,
                                    "schema": {"type": "string", "minLength": 1, "maxLength": MAX_USER_ID,
                                               "pattern": NAME_PATTERN}})
    return operation


def one_memory(summary: str, ok: Schema, **options: Any) -> Schema:
    operation = memory_operation(summary, ok, found=True, **options)
    operation["parameters"].append({"name": "id", "in": "path", "required": True,
                                    "schema": {"type": "string", "pattern": MEMORY_ID_PATTERN}})
    return operation


def ok(description: str, schema: Schema, media_type: str = "application/json") -> Schema:
    return {"description": description, "content": {media_type: {"schema": schema}}}


def document(settings: Settings) -> Schema:
    listed = ok("The memories, newest first", ref("MemoryList"))
    stored = ok("What was stored, each with its status: at least one memory was created", listing(ref("StoredMemory")))
    updated = ok("Nothing was created: every item updated (or already was) a memory of the user",
                 listing(ref("StoredMemory")))
    new_memories = {"oneOf": [ref("NewMemory"), {"type": "array", "minItems": 1, "items": ref("NewMemory")}]}
    health = {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}}
    ready = {"type": "object", "required": ["status", "parts"], "properties": {
        "status": {"enum": ["ready", "starting", "upstream-unreachable"]},
        "parts": {"type": "object", "additionalProperties": {"type": "boolean"},
                  "description": "model, store, and upstream: whether its last exchange got an HTTP answer"},
        "upstream": {"type": ["object", "null"], "properties": {
            "reachable": nullable("boolean"), "error": nullable("string"),
            "checked_seconds_ago": nullable("number")}}}}
    paths = {
        "/healthz": {"get": {"summary": "Liveness", "responses": {"200": ok("The process serves", health)}}},
        "/readyz": {"get": {
            "summary": "Readiness: this process's model and store; the upstream reported (required with "
                       "require=upstream), known from the last exchange or a probe at most every "
                       "upstream_check_seconds",
            "parameters": [query("require", {"enum": ["upstream"]}, "Also require the upstream to be reachable")],
            "responses": {"200": ok("Ready", ready), "503": ok("Starting, stopping, or the required upstream is "
                                                               "unreachable", ready)}}},
        "/openapi.json": {"get": {"summary": "This document",
                                  "responses": {"200": ok("OpenAPI 3.1", {"type": "object"})}}},
        "/metrics": {"get": {
            "summary": "Prometheus metrics (text format 0.0.4; OpenMetrics when Accept asks for it)",
            "responses": {"200": ok("Every memory_proxy_* family, merged across workers", {"type": "string"},
                                    "text/plain"),
                          "401": error("The admin token or the metrics token is required")},
            "security": [{}, {"bearer": []}]}},
        "/v1/chat/completions": {"post": with_memory(
            "Chat with memory: recall, inject, forward, strip the <memory> block, remember", "ChatRequest",
            settings.user_header)},
        "/v1/responses": {"post": with_memory(
            "The Responses API with memory: recall, inject, forward, strip the <memory> block from every event, "
            "remember", "ResponseRequest", settings.user_header)},
        "/memories/{user}": {
            "get": memory_operation("List the user's memories", listed, params=[
                query("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIST}, "At most this many"),
                query("after", {"type": "string", "pattern": MEMORY_ID_PATTERN}, "The last id of the previous page"),
                query("include_history", {"type": "boolean"}, "Superseded memories too")]),
            "post": with_ok(memory_operation("Add memories (a near-duplicate updates the memory it repeats)", stored,
                                             status="201", body=new_memories), updated),
            "delete": memory_operation("Erase every memory of the user", ok("Erased", {
                "type": "object", "required": ["object", "user", "deleted"],
                "properties": {"object": {"const": "user.erased"}, "user": {"type": "string"},
                               "deleted": {"type": "integer", "minimum": 0},
                               "sessions_deleted": {"type": "integer", "minimum": 0}}}))},
        "/memories/{user}/search": {"get": memory_operation("The memories closest in meaning to a text", ok(
            "Best first, with their cosine score", listing({"type": "object"})), params=[
                query("q", {"type": "string", "minLength": 1, "pattern": NOT_BLANK}, "The text", required=True),
                query("k", {"type": "integer", "minimum": 1, "maximum": 100}, "At most this many"),
                query("kind", {"type": "string", "enum": ["memory", "conversation"]},
                      "Memories (default), or excerpts of past conversations")])},
        "/memories/{user}/export": {"get": memory_operation("Every memory of the user, history included", ok(
            "JSON Lines, one memory a line", {"type": "string"}, "application/x-ndjson"))},
        "/memories/{user}/import": {"post": with_ok(memory_operation(
            "Put back memories as exported, ids, dates and history kept (lines without an id are added like POST); "
            "importing twice changes nothing", stored, status="201",
            body={"type": "array", "items": {"anyOf": [ref("Memory"), ref("NewMemory")]}}), updated)},
        "/memories/{user}/{id}": {
            "get": one_memory("One memory", ok("The memory", ref("Memory"))),
            "patch": one_memory("Change a memory's text, category or expiry", ok("The memory", ref("Memory")),
                                body=ref("MemoryPatch")),
            "delete": one_memory("Remove one memory", ok("Removed", {
                "type": "object", "required": ["id", "object", "deleted"],
                "properties": {"id": {"type": "string"}, "object": {"const": "memory.deleted"},
                               "deleted": {"const": True}}}))},
        "/users": {"get": users_operation()},
        "/sessions/{user}": {"get": memory_operation("The user's stored conversations, newest first", ok(
            "The sessions", {"allOf": [listing(ref("Session")), {"type": "object", "required": ["has_more"]}]}),
            params=[query("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIST}, "At most this many"),
                    query("after", {"type": "string"}, "The last id of the previous page")])},
        "/sessions/{user}/{session}": {
            "get": one_session("One session and its newest stored messages, oldest first", ok("The session", {
                "allOf": [ref("Session"), {"type": "object", "required": ["data"], "properties": {
                    "data": {"type": "array", "items": {"type": "object"}}}}]}), params=[
                query("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIST}, "At most this many messages")]),
            "delete": one_session("Forget one session, its messages and its conversation chunks", ok("Forgotten", {
                "type": "object", "required": ["id", "object", "deleted"],
                "properties": {"id": {"type": "string"}, "object": {"const": "session.deleted"},
                               "deleted": {"const": True}}}))},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "memory-proxy", "version": __version__,
                 "description": "Long-term, per-user memory for any OpenAI-compatible chat app. Every error the "
                                "proxy itself raises is {\"error\": {\"message\", \"type\", \"param\", \"code\"}}."},
        "paths": paths,
        "components": {"schemas": schemas(settings), "securitySchemes": {"bearer": {
            "type": "http", "scheme": "bearer", "description": "The admin token, or a proxy key (its tenant only); "
                                                               "needed only when either is configured"}}},
    }


@lru_cache(maxsize=8)
def encoded(settings: Settings) -> bytes:
    return orjson.dumps(document(settings))


async def openapi_json(request: Request) -> Response:
    return Response(encoded(request.app.state.settings), media_type="application/json")
