"""The app factory: wiring only. Each route's story lives in its own module."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from proxy import api, chat, config, health, inspector, logs, metrics, openapi, responses, sessions_api, users_api
from proxy.auth import Gate
from proxy.chains import Chains
from proxy.config import Settings
from proxy.egress import Egress
from proxy.embed import Embedder
from proxy.errors import ProxyError, error_response
from proxy.extraction import open_extractor
from proxy.instrumentation import Instrumentation
from proxy.limits import BODY_REFUSED, HEAD_TIMEOUT_STATE, RequestLimits
from proxy.memories import open_memories
from proxy.passthrough import passthrough
from proxy.server import DateHeader
from proxy.sessions import open_sessions
from proxy.store import Store
from proxy.upstream import Upstream

log = logging.getLogger("memory_proxy")
ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def create_app(settings: Settings | None = None, *, store: Store | None = None, embedder: Embedder | None = None,
               transport: httpx.AsyncBaseTransport | None = None,
               environ: Mapping[str, str] | None = None) -> Starlette:
    """Build the proxy. A given `store` or `embedder` is used instead of the configured one (and left open for
    its owner to close); `transport` replaces the network to the upstream. `environ` (default os.environ) is
    where the settings came from: the forward proxy and CA variables are read from it (proxy/egress.py)."""
    environ = os.environ if environ is None else environ
    settings = settings or config.load(environ=environ)
    gate = Gate.from_settings(settings)  # a bad proxy_keys setting stops the start, not the first request
    egress = Egress.from_environ(environ, settings.upstream)  # so does a bad proxy or CA variable
    logs.show_content(settings.log_content)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, float]]:
        app.state.parts = {"model": False, "store": False}  # the upstream's part is checked by /readyz
        if gate.open:
            log.warning("no admin_token or proxy_keys set: anyone who can reach this proxy can read and change "
                        "every user's memories through /memories; keep it on 127.0.0.1 or set one")
        app.state.upstream = Upstream(settings, transport, egress=egress)
        async with AsyncExitStack() as stack:
            stack.callback(metrics.worker_stopped)  # last, after the queues have drained
            stack.push_async_callback(app.state.upstream.aclose)
            app.state.memories = await stack.enter_async_context(open_memories(
                settings, store=store, embedder=embedder, ready=lambda part: app.state.parts.__setitem__(part, True)))
            app.state.sessions = await stack.enter_async_context(open_sessions(settings, app.state.memories,
                                                                               app.state.upstream))
            app.state.extractor = await stack.enter_async_context(open_extractor(settings, app.state.memories,
                                                                                 app.state.upstream, transport,
                                                                                 environ))
            # The first model run is the slow one: take it now, not on a user's request.
            await app.state.memories.embedder.embed(["warm up"])
            try:
                yield {HEAD_TIMEOUT_STATE: settings.request_head_timeout}  # read by each connection (limits.py)
            finally:
                app.state.parts = {}

    routes = [
        Route("/healthz", health.healthz, methods=["GET", "HEAD"]),
        Route("/readyz", health.readyz, methods=["GET", "HEAD"]),
        Route("/openapi.json", openapi.openapi_json, methods=["GET", "HEAD"]),
        Route("/metrics", metrics.metrics_endpoint, methods=["GET", "HEAD"]),
        Route("/v1/chat/completions", chat.chat_completions, methods=["POST"]),
        # Azure OpenAI clients: /openai/deployments/... (its classic routes), or /v1/deployments/... (base_url /v1)
        Route("/openai/deployments/{deployment}/chat/completions", chat.chat_completions, methods=["POST"]),
        Route("/v1/deployments/{deployment}/chat/completions", chat.chat_completions, methods=["POST"]),
        Route("/v1/responses", responses.create_response, methods=["POST"]),
        Route("/openai/responses", responses.create_response, methods=["POST"]),  # Azure OpenAI
        Route("/openai/v1/responses", responses.create_response, methods=["POST"]),
        Route("/v1/responses/{response_id}", responses.retrieve_response, methods=["GET"]),
        *api.routes,
        *sessions_api.routes,
        *users_api.routes,
        *inspector.routes,
        Route("/v1/{path:path}", passthrough, methods=ALL_METHODS),
        Route("/openai/{path:path}", passthrough, methods=ALL_METHODS),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, middleware=[
        Middleware(DateHeader), Middleware(Instrumentation, access_log=settings.access_log),
        Middleware(RequestLimits, body_timeout=settings.request_body_timeout),
    ], exception_handlers={
        ProxyError: _proxy_error, HTTPException: _http_error, ClientDisconnect: _client_gone,
        Exception: _unexpected_error,
    })
    app.state.settings = settings
    app.state.gate = gate
    app.state.chains = Chains()
    return app


async def _proxy_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProxyError)
    if exc.status >= 500:
        log.warning("%s %s: %s", request.method, request.url.path, exc.message)
    return exc.response()


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    message = {404: f"no route for {request.method} {request.url.path}",
               405: f"method {request.method} not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
    return error_response(exc.status_code, message, kind, code="not_found" if exc.status_code == 404 else None)


async def _client_gone(request: Request, exc: Exception) -> Response:
    """The client closed the connection before its request body was read: nobody to answer, and not our fault.
    Counted and logged as 499, nginx's "client closed request", not 500; a body the parser refused as the 400
    the client got from it (proxy/limits.py). Either way nothing is written: the connection is gone."""
    if request.scope.get(BODY_REFUSED):
        log.info("%s %s: the request's body is not valid HTTP/1.1: answered 400", request.method, request.url.path)
        return Response(status_code=400)
    log.info("%s %s: the client left before its request was read", request.method, request.url.path)
    return Response(status_code=499)


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return error_response(500, "internal error in memory-proxy; the details are in its log", "server_error")
