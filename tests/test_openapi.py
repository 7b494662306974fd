"""The HTTP API under schemathesis, generated from the OpenAPI document the proxy serves at /openapi.json.

A real proxy (real model, real SQLite) on a real server, in front of an upstream that answers any chat request.
For every described operation, valid and invalid requests (bounded: MAX_EXAMPLES each): no 5xx, only documented
statuses and content types, bodies that match the document, and every error in OpenAI's shape.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from proxy import config
from proxy.app import create_app
from proxy.openapi import document
from tests.servers import running

MAX_EXAMPLES = 50
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
COMPLETION = orjson.dumps({"id": "c1", "object": "chat.completion", "created": 1, "model": "m", "choices": [
    {"index": 0, "message": {"role": "assistant", "content": 'Fine.\n<memory>["User fuzzes APIs"]</memory>'},
     "finish_reason": "stop"}]})
EVENTS = b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,' \
         b'"delta":{"content":"Fine."},"finish_reason":null}]}\n\ndata: [DONE]\n\n'


async def upstream(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers every chat request, whatever it holds, as a lenient model API would (streamed when asked)."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    stream = b'"stream":true' in body.replace(b" ", b"")
    content, kind = (EVENTS, b"text/event-stream") if stream else (COMPLETION, b"application/json")
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", kind)]})
    await send({"type": "http.response.body", "body": content})


SETTINGS = config.load(environ={})  # the document depends on limits only, which the proxy below shares
schema = schemathesis.openapi.from_dict(document(SETTINGS))
schema.config.generation.update(max_examples=MAX_EXAMPLES, modes=["positive", "negative"], deterministic=True)


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    home: Path = tmp_path_factory.mktemp("openapi")
    with running(upstream) as upstream_url:
        settings = config.load(environ={"HOME": str(home)},
                               overrides={"upstream": upstream_url + "/v1", "data_dir": str(home / "data"),
                                          "session_history": "store"})
        with running(create_app(settings)) as url:
            yield url


def test_the_document_is_served_and_names_every_route(proxy: str) -> None:
    served = httpx.get(proxy + "/openapi.json").json()
    assert served == orjson.loads(orjson.dumps(document(SETTINGS)))  # what the fuzzer below was built from
    assert served["openapi"] == "3.1.0"
    assert {"/healthz", "/readyz", "/metrics", "/v1/chat/completions", "/v1/responses", "/memories/{user}",
            "/memories/{user}/search", "/memories/{user}/export", "/memories/{user}/import", "/memories/{user}/{id}",
            "/sessions/{user}", "/sessions/{user}/{session}"} <= set(served["paths"])


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_api(case: Any, proxy: str) -> None:
    response = case.call(base_url=proxy, timeout=30)
    case.validate_response(response, checks=CHECKS)
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, response.text
        assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
