"""The proxy is invisible: real server, official SDK, fake upstream on a real socket."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import httpx
import openai
import orjson
import pytest

from proxy.config import Settings
from tests.fakeupstream import FakeUpstream, Reply

Upstream = tuple[FakeUpstream, str]


def test_models_list(client: openai.OpenAI, upstream: Upstream) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["fake-model"]
    assert upstream[0].requests[-1].path == "/v1/models"


def test_embeddings(client: openai.OpenAI, upstream: Upstream) -> None:
    result = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert [e.index for e in result.data] == [0, 1]
    assert upstream[0].requests[-1].json()["input"] == ["a", "b"]


def test_chat_non_stream_is_byte_faithful(proxy: str, upstream: Upstream) -> None:
    fake, direct = upstream
    body = b'{"model":"m","messages":[{"role":"user","content":"hi \\u00e9"}],"temperature":0.5}'
    fake.reply("Hello there", "Hello there")
    via_proxy = httpx.post(proxy + "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    straight = httpx.post(direct + "/chat/completions", content=body, headers={"content-type": "application/json"})
    assert via_proxy.status_code == 200
    assert via_proxy.content == straight.content
    assert fake.chats[0].body == body  # the request reached the upstream byte for byte


def test_chat_non_stream_through_sdk(client: openai.OpenAI, upstream: Upstream) -> None:
    upstream[0].reply("Bonjour !")
    completion = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "salut"}])
    assert completion.choices[0].message.content == "Bonjour !"
    assert completion.usage is not None and completion.usage.total_tokens == 12


def test_chat_stream_reassembles_identically_with_usage(client: openai.OpenAI, upstream: Upstream) -> None:
    text = "Streaming, one small piece at a time — with ünïcode ✓."
    upstream[0].reply(Reply(text, chunk_size=2))
    stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "go"}], stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 12
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_stream_bytes_identical_to_direct(proxy: str, upstream: Upstream) -> None:
    fake, direct = upstream
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}
    fake.reply(Reply("abcdefghij", chunk_size=1), Reply("abcdefghij", chunk_size=1))
    via_proxy = httpx.post(proxy + "/v1/chat/completions", json=body)
    straight = httpx.post(direct + "/chat/completions", json=body)
    assert via_proxy.headers["content-type"].startswith("text/event-stream")
    assert via_proxy.content == straight.content and via_proxy.content.endswith(b"data: [DONE]\n\n")


def test_rate_limit_surfaces_as_sdk_error(client: openai.OpenAI, upstream: Upstream) -> None:
    upstream[0].reply(Reply(status=429, headers={"retry-after": "7"}))
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.response.headers["retry-after"] == "7"
    assert caught.value.code == "rate_limit_exceeded"


def test_unknown_path_with_query_string(client: openai.OpenAI, upstream: Upstream) -> None:
    seen = client.get("/vector_stores/vs_1/files", cast_to=object, options={"params": {"limit": 3, "order": "asc"}})
    assert isinstance(seen, dict)
    assert seen["path"] == "/v1/vector_stores/vs_1/files" and seen["query"] == "limit=3&order=asc"
    assert seen["method"] == "GET"


def test_percent_encoded_path_is_kept(proxy: str, upstream: Upstream) -> None:
    seen = httpx.delete(proxy + "/v1/files/a%2Fb?x=%20y").json()
    assert seen["method"] == "DELETE" and seen["query"] == "x=%20y"
    assert upstream[0].requests[-1].path == "/v1/files/a/b"  # the fake's router decodes what went on the wire


def test_header_hygiene(proxy: str, upstream: Upstream) -> None:
    headers = {"authorization": "Bearer sk-client", "x-memory-user": "alice", "X-Memory-Session": "s1",
               "connection": "keep-alive, x-hop", "x-hop": "1", "x-custom": "kept", "openai-organization": "org"}
    seen = httpx.post(proxy + "/v1/batches", json={"a": 1}, headers=headers).json()["headers"]
    assert seen["authorization"] == "Bearer sk-client"
    assert seen["x-custom"] == "kept" and seen["openai-organization"] == "org"
    assert not [h for h in seen if h.startswith("x-memory-")]
    assert "x-hop" not in seen


def test_proxy_adds_no_headers_of_its_own(proxy: str, upstream: Upstream) -> None:
    with httpx.Client() as plain:
        request = plain.build_request("GET", proxy + "/v1/echo")
        for name in ("accept", "accept-encoding", "user-agent", "connection"):
            del request.headers[name]
        seen = plain.send(request).json()["headers"]
    assert "accept-encoding" not in seen and "user-agent" not in seen and "accept" not in seen


def test_upstream_key_replaces_client_key(upstream: Upstream, settings_for: Callable[..., Settings],
                                          start_proxy: Callable[..., str]) -> None:
    url = start_proxy(settings_for(upstream[1], upstream_key="sk-upstream"))
    seen = httpx.get(url + "/v1/anything", headers={"authorization": "Bearer sk-client"}).json()["headers"]
    assert seen["authorization"] == "Bearer sk-upstream"


def test_large_upload_is_streamed_unchanged(proxy: str, upstream: Upstream) -> None:
    payload = bytes(range(256)) * 20_000  # 5 MB
    response = httpx.post(proxy + "/v1/uploads/u1/parts", content=iter([payload[:1000], payload[1000:]]))
    assert response.status_code == 200
    assert upstream[0].requests[-1].body == payload


def test_body_over_limit_is_413(upstream: Upstream, settings_for: Callable[..., Settings],
                                start_proxy: Callable[..., str]) -> None:
    url = start_proxy(settings_for(upstream[1], max_body_bytes=1000))
    for content in (b"x" * 1001, iter([b"x" * 600, b"x" * 600])):  # declared length, and chunked
        response = httpx.post(url + "/v1/files", content=content)
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "payload_too_large"
    response = httpx.post(url + "/v1/chat/completions", content=b"x" * 1001)
    assert response.status_code == 413


def test_unreachable_upstream_is_502(settings_for: Callable[..., Settings], start_proxy: Callable[..., str]) -> None:
    url = start_proxy(settings_for("http://127.0.0.1:9/v1"))  # discard port: nothing listens
    with openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0) as sdk, \
            pytest.raises(openai.APIStatusError) as caught:
        sdk.models.list()
    assert caught.value.status_code == 502
    error = caught.value.response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "upstream_unreachable"


def test_slow_upstream_is_504(upstream: Upstream, settings_for: Callable[..., Settings],
                              start_proxy: Callable[..., str]) -> None:
    url = start_proxy(settings_for(upstream[1], read_timeout=0.2))
    response = httpx.get(url + "/v1/slow")
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "upstream_timeout"


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'{"model": "m", "messages": "hi"}'])
def test_malformed_chat_request_is_the_upstreams_400(proxy: str, upstream: Upstream, body: bytes) -> None:
    """The upstream judges its own API's requests: the proxy forwards what memory cannot read as it came."""
    response = httpx.post(proxy + "/v1/chat/completions", content=body)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert upstream[0].requests[-1].body == body


def test_unknown_route_outside_v1_is_404_in_openai_shape(proxy: str) -> None:
    response = httpx.get(proxy + "/nope")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_client_disconnect_closes_upstream_stream(proxy: str, upstream: Upstream) -> None:
    fake = upstream[0]
    fake.reply(Reply("x" * 400, chunk_size=1, delay=0.01))  # ~4 s if read to the end
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}
    with httpx.stream("POST", proxy + "/v1/chat/completions", json=body) as response:
        next(response.iter_raw())
    deadline = time.monotonic() + 3
    while fake.streams_closed < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fake.streams_open == 1 and fake.streams_closed == 1


def test_concurrent_requests_share_the_pool(client: openai.OpenAI, upstream: Upstream) -> None:
    errors: list[BaseException] = []

    def call() -> None:
        try:
            client.models.list()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(upstream[0].requests) == 20


def test_health_and_readiness(proxy: str) -> None:
    assert httpx.get(proxy + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(proxy + "/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_error_bodies_are_json(proxy: str) -> None:
    body = httpx.post(proxy + "/v1/chat/completions", content=b"{").content
    assert set(orjson.loads(body)["error"]) == {"message", "type", "param", "code"}
