"""Issue 17, sections 3 (slow clients) and 4 (paths and tokens), on real sockets against a real server."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.auth import sign, sign_unexpiring
from proxy.config import Settings
from proxy.limits import has_dot_segment
from tests.fakeupstream import FakeUpstream, Reply

Upstream = tuple[FakeUpstream, str]
KEY = "pk-tenant-a-0123456789"
KEYED = {"proxy_keys": f"acme:{KEY}", "upstream_key": "sk-upstream-own-key", "admin_token": "admin-token-0123456789"}


@contextlib.contextmanager
def connect(base: str) -> Iterator[socket.socket]:
    parts = urlsplit(base)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    try:
        yield sock
    finally:
        sock.close()


def read_response(sock: socket.socket, *, until_close: bool = False, quiet: float = 3) -> bytes:
    """What the server sends until it closes the connection or goes quiet for `quiet` s; unless `until_close`,
    only until the first answer (as long as its content-length says) is in."""
    sock.settimeout(quiet)
    data = b""
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
            if not until_close and b"\r\n\r\n" in data and data.split(b"\r\n\r\n", 1)[1]:
                head = data.split(b"\r\n\r\n", 1)[0].lower()
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.startswith(b"content-length:")), None)
                if length is not None and len(data.split(b"\r\n\r\n", 1)[1]) >= length:
                    break
    return data


def raw_request(base: str, head: bytes) -> bytes:
    with connect(base) as sock:
        sock.sendall(head)
        return read_response(sock)


def status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


# --- dot segments ----------------------------------------------------------------------------------------------

TRAVERSALS = [
    "/v1/../admin/secret", "/v1/models/../../internal", "/v1/%2e%2e/admin/secret", "/v1/.%2E/admin",
    "/v1/%2E%2e/admin", "/v1/%2e./admin", "/v1/models/%252e%252e/%252e%252e/internal", "/v1/models\\..\\..\\admin",
    "/v1/models%5c..%5c..%5cadmin", "/v1/..;/admin", "/v1/./models", "/v1/models/%2e", "/v1/models/..%2f..%2fadmin",
    "/v1/%2e%2e%2fadmin", "/v1/models/%00",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_dot_segments_are_found(path: str) -> None:
    assert has_dot_segment(path.encode())


@pytest.mark.parametrize("path", ["/v1/models", "/v1/files/file-..abc/content", "/v1/models/gpt-4.1",
                                  "/v1/vector_stores/vs_1/files", "/v1/models/ft%3Agpt-4o%3Aacme", "/v1/a/...b"])
def test_ordinary_paths_pass(path: str) -> None:
    assert not has_dot_segment(path.encode())


def test_no_dot_segment_reaches_the_upstream(upstream: Upstream, settings_for: Callable[..., Settings],
                                             start_proxy: Callable[..., str]) -> None:
    fake, url = upstream
    proxy = start_proxy(settings_for(url, **KEYED))
    for path in TRAVERSALS:
        for method in ("GET", "POST"):
            answer = raw_request(proxy, f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                                        "Content-Length: 0\r\n\r\n".encode())
            assert status(answer) == 400 and b'"invalid_path"' in answer, (method, path, answer[:200])
    assert fake.requests == []
    ok = raw_request(proxy, f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\r\n".encode())
    assert status(ok) == 200 and [r.path for r in fake.requests] == ["/v1/models"]
    assert fake.requests[0].headers["authorization"] == "Bearer sk-upstream-own-key"


# --- the auth scheme in any case ---------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_the_auth_scheme_is_case_insensitive_for_admin_token_and_proxy_keys(
        scheme: str, upstream: Upstream, settings_for: Callable[..., Settings],
        start_proxy: Callable[..., str]) -> None:
    proxy = start_proxy(settings_for(upstream[1], **KEYED))
    admin = httpx.get(proxy + "/memories/alice", headers={"Authorization": f"{scheme} {KEYED['admin_token']}"})
    assert admin.status_code == 200
    spaced = httpx.get(proxy + "/memories/alice", headers={"Authorization": f"{scheme}   {KEYED['admin_token']}"})
    assert spaced.status_code == 200
    keyed = httpx.get(proxy + "/v1/models", headers={"Authorization": f"{scheme} {KEY}"})
    assert keyed.status_code == 200
    wrong = httpx.get(proxy + "/memories/alice", headers={"Authorization": f"{scheme} {KEYED['admin_token']}x"})
    assert wrong.status_code == 401
    basic = httpx.get(proxy + "/memories/alice", headers={"Authorization": f"Basic {KEYED['admin_token']}"})
    assert basic.status_code == 401


# --- timestamped user signatures ----------------------------------------------------------------------------------

def test_user_signatures_expire(upstream: Upstream, settings_for: Callable[..., Settings],
                                start_proxy: Callable[..., str]) -> None:
    proxy = start_proxy(settings_for(upstream[1], user_signing_secret="gateway-secret", user_signature_max_age=60))
    body = {"model": "m", "messages": [{"role": "user", "content": "Hello"}]}

    def chat(signature: str, user: str = "dave") -> int:
        return httpx.post(proxy + "/v1/chat/completions", json=body,
                          headers={"X-Memory-User": user, "X-Memory-User-Signature": signature}).status_code

    now = time.time()
    assert chat(sign("gateway-secret", "dave")) == 200
    assert chat(sign("gateway-secret", "dave", now - 50)) == 200  # within the window (clock skew too)
    assert chat(sign("gateway-secret", "dave", now + 50)) == 200
    assert chat(sign("gateway-secret", "dave", now - 120)) == 401  # a leaked signature stops working
    assert chat(sign("gateway-secret", "dave", now + 120)) == 401
    assert chat(sign("gateway-secret", "erin")) == 401  # another user's
    assert chat(sign("guess", "dave")) == 401
    assert chat(sign_unexpiring("gateway-secret", "dave")) == 401  # the old form never expires: refused by default
    stamp = sign("gateway-secret", "dave").split(",")[0]
    assert chat(stamp + ",v1=" + "0" * 64) == 401


def test_the_unexpiring_form_only_with_the_legacy_setting(upstream: Upstream, settings_for: Callable[..., Settings],
                                                          start_proxy: Callable[..., str]) -> None:
    proxy = start_proxy(settings_for(upstream[1], user_signing_secret="gateway-secret", user_signature_legacy=True))
    body = {"model": "m", "messages": [{"role": "user", "content": "Hello"}]}
    for signature, expected in ((sign_unexpiring("gateway-secret", "dave"), 200), (sign("gateway-secret", "dave"), 200),
                                (sign_unexpiring("guess", "dave"), 401)):
        response = httpx.post(proxy + "/v1/chat/completions", json=body,
                              headers={"X-Memory-User": "dave", "X-Memory-User-Signature": signature})
        assert response.status_code == expected


# --- slow clients ---------------------------------------------------------------------------------------------

def trickle(sock: socket.socket, data: bytes, pause: float) -> int:
    """Send `data` a byte at a time; how many bytes went out before the server closed the connection."""
    for sent, byte in enumerate(data):
        try:
            sock.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            return sent
        time.sleep(pause)
        sock.settimeout(0.001)
        try:
            if sock.recv(65536, socket.MSG_PEEK) == b"":  # closed by the server
                return sent + 1
        except (BlockingIOError, TimeoutError):
            pass
        except ConnectionResetError:
            return sent + 1
        finally:
            sock.settimeout(10)
    return len(data)


def test_a_head_that_trickles_in_is_cut_off(upstream: Upstream, settings_for: Callable[..., Settings],
                                            start_proxy: Callable[..., str]) -> None:
    proxy = start_proxy(settings_for(upstream[1], request_head_timeout=0.5))
    head = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 40 + b"\r\n\r\n"
    with connect(proxy) as sock:
        sent = trickle(sock, head, 0.05)  # 2.3+ s for the whole head: far past the limit
        assert sent < len(head)
        sock.settimeout(3)
        answer = read_response(sock)
    assert answer == b"" or status(answer) == 408
    assert upstream[0].requests == []
    # A kept-alive connection's next head gets a deadline of its own.
    with connect(proxy) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status(read_response(sock)) == 200
        assert trickle(sock, head, 0.05) < len(head)


def test_a_body_that_trickles_in_is_cut_off(upstream: Upstream, settings_for: Callable[..., Settings],
                                            start_proxy: Callable[..., str]) -> None:
    proxy = start_proxy(settings_for(upstream[1], request_body_timeout=0.5))
    for path in ("/v1/chat/completions", "/v1/files", "/memories/alice"):
        with connect(proxy) as sock:
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         "X-Memory-User: alice\r\nContent-Length: 200\r\n\r\n".encode())
            sent = trickle(sock, b"{" + b" " * 199, 0.05)
            assert sent < 200, path
            answer = read_response(sock)
        assert status(answer) == 408 and b'"request_timeout"' in answer, (path, answer[:300])
    assert upstream[0].chats == []


def test_connections_past_the_bound_are_refused_until_slots_free_up(upstream: Upstream,
                                                                   settings_for: Callable[..., Settings],
                                                                   start_proxy: Callable[..., str]) -> None:
    proxy = start_proxy(settings_for(upstream[1], max_client_connections=3, request_head_timeout=1.0))
    with contextlib.ExitStack() as stack:
        idle = [stack.enter_context(connect(proxy)) for _ in range(3)]
        for sock in idle:
            sock.sendall(b"GET /v1/models HTTP/1.1\r\n")  # a head that never ends
        time.sleep(0.2)
        refused = raw_request(proxy, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status(refused) == 503
        for sock in idle:  # each is cut off at its head deadline...
            answer = read_response(sock)
            assert answer == b"" or status(answer) == 408
    # ...and then the proxy serves again.
    assert status(raw_request(proxy, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")) == 200


# --- what the HTTP parser refuses ------------------------------------------------------------------------------

def answered(proxy: str) -> Counter[tuple[str, str]]:
    """memory_proxy_requests_total by (route, status), the checks (/metrics, /healthz) left out."""
    counts: Counter[tuple[str, str]] = Counter()
    for family in text_string_to_metric_families(httpx.get(proxy + "/metrics").text):
        for sample in family.samples:
            if sample.name == "memory_proxy_requests_total" and sample.labels["route"] not in ("/metrics", "/healthz"):
                counts[sample.labels["route"], sample.labels["status"]] += int(sample.value)
    return counts


CHAT = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
MALFORMED = {
    "a garbage request line": b"HELLO THERE\r\n\r\n",
    "a control character in a header value": CHAT + b"X-Memory-User: a\x01b\r\nContent-Length: 2\r\n\r\n{}",
    "DEL in a header value": CHAT + b"X-Memory-User: a\x7fb\r\nContent-Length: 2\r\n\r\n{}",
    "a space in a header name": CHAT + b"X Memory: a\r\nContent-Length: 2\r\n\r\n{}",
    "a Content-Length that is no number": CHAT + b"Content-Length: abc\r\n\r\n{}",
    "Content-Length beside Transfer-Encoding": CHAT + b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
                                               b"2\r\n{}\r\n0\r\n\r\n",
    "a chunk size that is no number": CHAT + b"Transfer-Encoding: chunked\r\n\r\nZZ\r\n{}\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("what", list(MALFORMED))
def test_what_the_parser_refuses_is_a_400_in_openai_s_shape(upstream: Upstream, settings_for: Callable[..., Settings],
                                                            start_proxy: Callable[..., str], what: str) -> None:
    """uvicorn answers these in plain text; every error of ours is {"error": {message, type, param, code}}."""
    fake, url = upstream
    proxy = start_proxy(settings_for(url))
    before = answered(proxy)
    response = raw_request(proxy, MALFORMED[what])
    head, _, body = response.partition(b"\r\n\r\n")
    assert status(response) == 400 and b"content-type: application/json" in head.lower()
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "invalid_http_request"
    assert fake.chats == []
    assert httpx.get(proxy + "/healthz").status_code == 200  # and the server goes on
    counted = answered(proxy) - before  # the registry is the process's: other tests' requests are in it too
    # Counted as what the client got: a request routed before its body failed, as a 400 where it was going.
    assert counted == (Counter({("/v1/chat/completions", "400"): 1}) if "chunk" in what else Counter())


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses", "/v1/embeddings", "/memories/alice"])
def test_a_client_that_leaves_mid_body_is_a_499_not_an_error(upstream: Upstream, settings_for: Callable[..., Settings],
                                                             start_proxy: Callable[..., str], path: str,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """Declared 100 bytes, sent 10 and closed: nothing reaches the upstream or the store, no traceback is logged,
    and the metrics count it as 499 (nginx's "client closed request"), not as a 500 an alert would page on."""
    fake, url = upstream
    proxy = start_proxy(settings_for(url))
    with connect(proxy) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Memory-User: al\r\n"
                     "Content-Length: 100\r\n\r\n".encode() + b'{"model": ')
        time.sleep(0.2)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and 'status="499"' not in httpx.get(proxy + "/metrics").text:
        time.sleep(0.05)
    metrics = httpx.get(proxy + "/metrics").text
    assert 'status="499"' in metrics and 'status="500"' not in metrics
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert fake.chats == [] and httpx.get(proxy + "/memories/al").json()["data"] == []


def requests_on_one_connection(proxy: str, *sends: bytes, pause: float = 0.0) -> bytes:
    with connect(proxy) as sock:
        for send in sends:
            sock.sendall(send)
            time.sleep(pause)
        return read_response(sock, until_close=True, quiet=5)




@pytest.mark.parametrize("what", [w for w in MALFORMED if "chunk" not in w])
@pytest.mark.parametrize("pause", [0.3, 0.0], ids=["kept-alive", "pipelined"])
def test_a_malformed_request_after_a_good_one_gets_its_400_after_the_good_answer(
        upstream: Upstream, settings_for: Callable[..., Settings], start_proxy: Callable[..., str], what: str,
        pause: float) -> None:
    """The request before it on the connection is answered whole, then the 400; a write it asked for is done."""
    _, url = upstream
    proxy = start_proxy(settings_for(url))
    fact = b'{"text": "Pipe user keeps a boat"}'
    store = (b"POST /memories/pipeuser HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
             b"Content-Length: %d\r\n\r\n%s" % (len(fact), fact))
    data = requests_on_one_connection(proxy, store, MALFORMED[what], pause=pause)
    first, _, rest = data.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 201") and rest.count(b"HTTP/1.1 400 ") == 1, data
    refusal = rest[rest.index(b"HTTP/1.1 400 "):]
    assert refusal.startswith(b"HTTP/1.1 400") and b'"invalid_http_request"' in refusal
    assert [m["text"] for m in httpx.get(proxy + "/memories/pipeuser").json()["data"]] == ["Pipe user keeps a boat"]


def test_a_bad_chunk_behind_a_streamed_answer_never_lands_inside_it(upstream: Upstream,
                                                                    settings_for: Callable[..., Settings],
                                                                    start_proxy: Callable[..., str]) -> None:
    """A streamed chat answer under way, and behind it a request whose chunked body the parser refuses: the
    stream ends whole (its last chunk), then the 400; the refused request never reaches the upstream."""
    fake, url = upstream
    proxy = start_proxy(settings_for(url))
    fake.reply(Reply(text="Streaming along nicely, thank you.", chunk_size=4, delay=0.05))
    body = b'{"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]}'
    streamed = CHAT + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    data = requests_on_one_connection(proxy, streamed + MALFORMED["a chunk size that is no number"])
    first_end = data.find(b"0\r\n\r\n")
    refusal = data.find(b"HTTP/1.1 400")
    assert data.startswith(b"HTTP/1.1 200") and b"data: [DONE]" in data[:first_end], data
    assert 0 < first_end < refusal and b'"invalid_http_request"' in data[refusal:]
    assert len(fake.chats) == 1
