"""What is measured around each request, at the two boundaries where it can be seen whole.

    Instrumentation   the ASGI middleware: gives the request its id (logs, `x-memory-request-id`), counts it by
                      route and status, takes the proxy's added latency, reads the injected count and any
                      fail-open reason from the response headers the pipeline sets (`x-memory-recalled`,
                      `x-memory-error`), and writes the access-log line
    TimedTransport    wraps the transport to the upstream: the time spent waiting on it (so that it can be taken
                      out of the added latency), and its failures by kind

Neither touches a body: they see the response head, the time of the first body byte, and exceptions.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy import metrics
from proxy.logs import CURRENT, RequestContext, request_id

access = logging.getLogger("memory_proxy.access")
REQUEST_ID_HEADER = b"x-memory-request-id"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
PASSED = ("/v1/{path:path}", "/v1/responses/{response_id}")  # /v1 routes that are no model call
FAIL_OPEN_REASONS = 32  # distinct x-memory-error values counted; more would be a bug, not a label set to grow
_reasons: set[str] = set()


class Instrumentation:
    """ASGI middleware; see the module's docstring. `access_log` writes one info line per request."""

    def __init__(self, app: ASGIApp, *, access_log: bool = False) -> None:
        self.app = app
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        sent_id = next((value for name, value in scope["headers"] if name == b"x-request-id"), None)
        context = RequestContext(request_id(sent_id))
        token = CURRENT.set(context)
        head: dict[bytes, bytes] = {}
        status = 500  # what the client gets if the app raises before answering (the error middleware's 500)
        first_byte: float | None = None
        waited = 0.0
        recorded = False

        def record() -> None:
            nonlocal recorded
            if not recorded:
                recorded = True
                self.record(scope, context, status, head, started, first_byte, waited)

        async def send_with_id(message: Message) -> None:
            nonlocal status, first_byte, waited
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", ()))
                head.update((name.lower(), value) for name, value in headers
                            if name.lower() in (b"content-type", b"x-memory-recalled", b"x-memory-error"))
                headers.append((REQUEST_ID_HEADER, context.id.encode()))
                message["headers"] = headers
            elif message["type"] == "http.response.body":
                if first_byte is None and (message.get("body") or not message.get("more_body", False)):
                    first_byte = time.perf_counter()
                    waited = context.upstream_wait
                if not message.get("more_body", False):
                    record()  # before the client has it all: a scrape that follows already counts it
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            record()
            CURRENT.reset(token)

    def record(self, scope: Scope, context: RequestContext, status: int, head: dict[bytes, bytes], started: float,
               first_byte: float | None, waited: float) -> None:
        route = scope.get("route")
        template: str = getattr(route, "path", "unmatched")
        method = scope["method"] if scope["method"] in METHODS else "other"
        metrics.request_answered(template, method, status)
        if template.startswith("/v1/"):
            memory = b"x-memory-recalled" in head
            path = "memory" if memory else "passthrough" if template in PASSED else "chat"
            stream = head.get(b"content-type", b"").startswith(b"text/event-stream")
            end = first_byte if first_byte is not None else time.perf_counter()
            metrics.added_latency(path, stream, end - started - (waited if first_byte is not None
                                                                  else context.upstream_wait))
            if memory:
                recalled = head[b"x-memory-recalled"]
                metrics.injected(int(recalled) if recalled.isdigit() else 0)
            if b"x-memory-error" in head:
                reason = head[b"x-memory-error"].decode("latin-1")
                if reason in _reasons or len(_reasons) < FAIL_OPEN_REASONS:
                    _reasons.add(reason)
                    metrics.failed_open(reason)
        if self.access_log:
            path_sent = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
            duration_ms = round((time.perf_counter() - started) * 1000, 2)
            client = scope.get("client")
            fields: dict[str, Any] = {"method": scope["method"], "path": path_sent, "status": status,
                                      "duration_ms": duration_ms, "client": f"{client[0]}:{client[1]}" if client
                                      else None, "request_id": context.id}
            if context.user is not None:
                fields["user"] = context.user
            if context.tenant is not None:
                fields["tenant"] = context.tenant
            access.info('"%s %s" %d %.2f ms', scope["method"], path_sent, status, duration_ms, extra=fields)


class TimedTransport(httpx.AsyncBaseTransport):
    """Wraps the upstream transport: adds the time spent waiting on it to the current request's
    `upstream_wait`, and counts its failures (`memory_proxy_upstream_errors_total`), also those that come
    midway through an answer's body."""

    def __init__(self, transport: httpx.AsyncBaseTransport) -> None:
        self.transport = transport

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        context = CURRENT.get()
        started = time.perf_counter()
        try:
            response = await self.transport.handle_async_request(request)
        except httpx.TransportError as exc:
            metrics.upstream_error(error_kind(exc))
            raise
        finally:
            if context is not None:
                context.upstream_wait += time.perf_counter() - started
        if response.status_code == 429 or response.status_code >= 500:
            metrics.upstream_error("http_429" if response.status_code == 429 else "http_5xx")
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = TimedBody(response.stream, context)
        return response

    async def aclose(self) -> None:
        await self.transport.aclose()


class TimedBody(httpx.AsyncByteStream):
    def __init__(self, stream: httpx.AsyncByteStream, context: RequestContext | None) -> None:
        self.stream = stream
        self.context = context

    async def __aiter__(self) -> AsyncIterator[bytes]:
        chunks = self.stream.__aiter__()
        while True:
            started = time.perf_counter()
            try:
                chunk = await chunks.__anext__()
            except StopAsyncIteration:
                return
            except httpx.TransportError as exc:
                metrics.upstream_error("broken_off" if not isinstance(exc, httpx.TimeoutException)
                                       else error_kind(exc))
                raise
            finally:
                if self.context is not None:
                    self.context.upstream_wait += time.perf_counter() - started
            yield chunk

    async def aclose(self) -> None:
        await self.stream.aclose()


def error_kind(exc: httpx.TransportError) -> str:
    """The label of a transport failure."""
    for kind, types in (("connect_timeout", httpx.ConnectTimeout), ("read_timeout", httpx.ReadTimeout),
                        ("write_timeout", httpx.WriteTimeout), ("pool_timeout", httpx.PoolTimeout),
                        ("connect_error", httpx.ConnectError), ("protocol_error", httpx.ProtocolError)):
        if isinstance(exc, types):
            return kind
    return "network_error"
