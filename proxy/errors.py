"""Everything that can go wrong, and how it looks to an OpenAI client.

    ProxyError                      base; carries status, OpenAI error type and code
    ├── BadRequest                  400 invalid_request_error: malformed JSON, wrong types, bad user id
    │   └── PayloadTooLarge         413 the body is over max_body_bytes
    ├── Unauthorized                401 missing or wrong admin token / proxy key
    ├── NotFound                    404 no such memory, session or route
    ├── UpstreamError               502 the upstream could not be reached or broke the protocol
    │   └── UpstreamTimeout         504 the upstream did not answer in time
    ├── ClientGone                  499 the client hung up while the upstream was still thinking
    ├── ConfigError                 bad settings; raised at start, never on a request
    ├── ModelError                  the embedding model is missing or corrupt; raised at start
    └── StoreError                  503 the memory store failed; the chat path answers without memory
        └── StoreUnavailable        503 it is down for now (locked, full, read-only, unreachable, its file gone):
                                    memories that chats produce wait in the write queue and are retried

Errors a client sees are always `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response


class ProxyError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def response(self, headers: dict[str, str] | None = None) -> Response:
        return error_response(self.status, self.message, self.type, param=self.param, code=self.code,
                              headers=headers)


class BadRequest(ProxyError):
    status = 400
    type = "invalid_request_error"


class PayloadTooLarge(BadRequest):
    status = 413
    code = "payload_too_large"


class Unauthorized(ProxyError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class NotFound(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class UpstreamError(ProxyError):
    status = 502
    type = "upstream_error"
    code = "upstream_unreachable"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class ClientGone(ProxyError):
    """The client hung up before the answer came: nobody reads this (nginx's 499), it only ends the request."""

    status = 499
    type = "invalid_request_error"
    code = "client_closed_request"


class ConfigError(ProxyError):
    pass


class ModelError(ProxyError):
    pass


class StoreError(ProxyError):
    status = 503  # the store is down (locked, read-only, full), not the request wrong: worth a retry later
    code = "memory_store_error"


class StoreUnavailable(StoreError):
    """A fault that passes when the store comes back: the same write will succeed later, so queued writes are
    kept and retried rather than dropped (proxy/memories.py)."""


def error_body(message: str, type: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status: int, message: str, type: str, *, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> Response:
    body = orjson.dumps(error_body(message, type, param=param, code=code))
    return Response(body, status_code=status, headers=headers, media_type="application/json")
