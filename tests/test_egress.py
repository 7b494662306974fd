"""The way out: a real forward proxy on 127.0.0.1 (tests/forwardproxy.py), a real TLS upstream whose certificate
comes from a CA made in the test, the variables given as the settings' environ. What a 502 says, and what /readyz
knows about the upstream."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trustme

from proxy.config import Settings
from proxy.egress import Egress, ForwardProxy, bypassed
from proxy.errors import ConfigError
from tests.fakeupstream import FakeUpstream, Reply
from tests.forwardproxy import ForwardProxy as Proxy
from tests.forwardproxy import forward_proxy
from tests.servers import running

NAME = "upstream.test"  # only the forward proxy resolves it: a request that reached the upstream went through it
BLOCK = '\n<memory>\n["User keeps bees"]\n</memory>'


class Tls:
    def __init__(self, tmp: Path) -> None:
        self.ca = trustme.CA()
        self.ca_file = tmp / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.server = tmp / "server.pem"
        self.ca.issue_cert(NAME, "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(self.server))


@pytest.fixture
def tls(tmp_path: Path) -> Tls:
    return Tls(tmp_path)


@pytest.fixture
def https_upstream(tls: Tls) -> Iterator[tuple[FakeUpstream, int]]:
    fake = FakeUpstream()
    with running(fake.app, ssl_certfile=str(tls.server)) as url:
        yield fake, int(url.rsplit(":", 1)[1])


@pytest.fixture
def plain_upstream() -> Iterator[tuple[FakeUpstream, int]]:
    fake = FakeUpstream()
    with running(fake.app) as url:
        yield fake, int(url.rsplit(":", 1)[1])


@pytest.fixture
def proxy_at() -> Iterator[Callable[..., tuple[Proxy, str]]]:
    """Start forward proxies (each knows NAME as 127.0.0.1); returns (proxy, its URL)."""
    with ExitStack() as stack:
        def start(**options: Any) -> tuple[Proxy, str]:
            proxy = Proxy(hosts={NAME: "127.0.0.1"}, **options)
            return proxy, stack.enter_context(forward_proxy(proxy))
        yield start


def start(start_proxy: Callable[..., str], settings_for: Callable[..., Settings], upstream: str,
          environ: dict[str, str], **overrides: Any) -> str:
    return start_proxy(settings_for(upstream, **overrides), environ=environ)


def chat_with_memory(base: str, fake: FakeUpstream) -> None:
    """The whole memory loop, streamed, through whatever route the proxy takes to the upstream."""
    fake.reply(Reply("Noted." + BLOCK, chunk_size=4))
    with openai.OpenAI(base_url=base + "/v1", api_key="sk-client", max_retries=0) as sdk:
        assert [m.id for m in sdk.models.list().data] == ["fake-model"]
        chunks = sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "I keep bees"}],
                                             stream=True, extra_headers={"X-Memory-User": "ann"})
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Noted."
    deadline = time.monotonic() + 10
    while not httpx.get(base + "/memories/ann").json()["data"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [m["text"] for m in httpx.get(base + "/memories/ann").json()["data"]] == ["User keeps bees"]


def test_https_upstream_through_a_connect_tunnel_verified_with_ssl_cert_file(
        https_upstream: tuple[FakeUpstream, int], tls: Tls, proxy_at: Callable[..., tuple[Proxy, str]],
        start_proxy: Callable[..., str], settings_for: Callable[..., Settings]) -> None:
    fake, port = https_upstream
    forward, url = proxy_at(credentials=("ann", "p@ss:w"))
    environ = {"HTTPS_PROXY": url.replace("http://", "http://ann:p%40ss%3Aw@"), "SSL_CERT_FILE": str(tls.ca_file)}
    base = start(start_proxy, settings_for, f"https://{NAME}:{port}/v1", environ)
    chat_with_memory(base, fake)
    assert {(a.method, a.target) for a in forward.asked} == {("CONNECT", f"{NAME}:{port}")}
    assert all(a.authorization == "Basic YW5uOnBAc3M6dw==" for a in forward.asked)  # ann:p@ss:w
    assert not any("proxy-authorization" in r.headers for r in fake.requests)  # for the proxy only
    assert len(forward.asked) < len(fake.requests)  # the tunnel is kept and reused


def test_what_a_failing_route_says(https_upstream: tuple[FakeUpstream, int], tls: Tls,
                                   proxy_at: Callable[..., tuple[Proxy, str]], start_proxy: Callable[..., str],
                                   settings_for: Callable[..., Settings]) -> None:
    _, port = https_upstream
    _, url = proxy_at(credentials=("ann", "secret-pw"))
    upstream = f"https://{NAME}:{port}/v1"
    proxy_origin = url.removeprefix("http://")
    untrusted = start(start_proxy, settings_for, upstream, {"https_proxy": url.replace("//", "//ann:secret-pw@")})
    refused = start(start_proxy, settings_for, upstream, {"https_proxy": url.replace("//", "//ann:wrong-pw@"),
                                                          "SSL_CERT_FILE": str(tls.ca_file)})
    for base, says in ((untrusted, "CERTIFICATE_VERIFY_FAILED"), (refused, "answered 407 to CONNECT")):
        response = httpx.get(base + "/v1/models")
        assert response.status_code == 502
        message = response.json()["error"]["message"]
        assert f"the upstream {NAME}:{port} through the proxy {proxy_origin}" in message and says in message
        assert "pw" not in message and "/v1" not in message


def test_http_upstream_through_the_proxy_in_absolute_form(plain_upstream: tuple[FakeUpstream, int],
                                                          proxy_at: Callable[..., tuple[Proxy, str]],
                                                          start_proxy: Callable[..., str],
                                                          settings_for: Callable[..., Settings]) -> None:
    fake, port = plain_upstream
    forward, url = proxy_at()
    base = start(start_proxy, settings_for, f"http://{NAME}:{port}/v1", {"ALL_PROXY": url})
    chat_with_memory(base, fake)
    assert ("GET", f"http://{NAME}:{port}/v1/models") in {(a.method, a.target) for a in forward.asked}
    assert {r.path for r in fake.requests} == {"/v1/models", "/v1/chat/completions"}


@pytest.mark.parametrize(("no_proxy", "straight"), [("127.0.0.1", True), ("localhost,127.0.0.0/8", True),
                                                     ("*", True), ("127.0.0.1:{port}", True), ("0.0.1", False),
                                                     ("127.0.0.1:1", False)])
def test_no_proxy_goes_straight(no_proxy: str, straight: bool, https_upstream: tuple[FakeUpstream, int], tls: Tls,
                                proxy_at: Callable[..., tuple[Proxy, str]], start_proxy: Callable[..., str],
                                settings_for: Callable[..., Settings]) -> None:
    fake, port = https_upstream
    forward, url = proxy_at()
    environ = {"HTTPS_PROXY": url, "NO_PROXY": no_proxy.format(port=port), "SSL_CERT_FILE": str(tls.ca_file)}
    base = start(start_proxy, settings_for, f"https://127.0.0.1:{port}/v1", environ)
    assert httpx.get(base + "/v1/models").status_code == 200 and fake.requests
    assert [a.method for a in forward.asked] == ([] if straight else ["CONNECT"])


def test_lower_case_wins_and_ssl_cert_dir_works(https_upstream: tuple[FakeUpstream, int], tls: Tls, tmp_path: Path,
                                                proxy_at: Callable[..., tuple[Proxy, str]],
                                                start_proxy: Callable[..., str],
                                                settings_for: Callable[..., Settings]) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to name the CA directory's file by subject hash")
    _, port = https_upstream
    forward, url = proxy_at()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"  # nothing listens there
    certs = tmp_path / "certs"
    certs.mkdir()
    digest = subprocess.run(["openssl", "x509", "-hash", "-noout", "-in", str(tls.ca_file)], capture_output=True,
                            text=True, check=True).stdout.strip()
    shutil.copy(tls.ca_file, certs / f"{digest}.0")
    base = start(start_proxy, settings_for, f"https://{NAME}:{port}/v1",
                 {"https_proxy": url, "HTTPS_PROXY": dead, "SSL_CERT_DIR": str(certs)})
    assert httpx.get(base + "/v1/models").status_code == 200 and forward.asked


@pytest.mark.parametrize(("host", "port", "no_proxy", "expected"), [
    ("api.openai.com", 443, "openai.com", True),
    ("api.openai.com", 443, ".openai.com", True),
    ("api.openai.com", 443, "*.openai.com", True),
    ("notopenai.com", 443, "openai.com", False),
    ("api.openai.com", 443, "api.openai.com:8443", False),
    ("api.openai.com", 443, "api.openai.com:443", True),
    ("API.OpenAI.com", 443, " other.example , OPENAI.COM ", True),
    ("10.1.2.3", 80, "10.0.0.0/8", True),
    ("10.1.2.3", 80, "10.1.2.4", False),
    ("::1", 80, "[::1]", True),
    ("::1", 80, "::1", True),
    ("fd00::5", 80, "fd00::/8", True),
    ("example.com", 80, "", False),
    ("example.com", 80, "*", True),
])
def test_no_proxy_rules(host: str, port: int, no_proxy: str, expected: bool) -> None:
    assert bypassed(host, port, no_proxy) is expected


@pytest.mark.parametrize(("environ", "says"), [
    ({"HTTPS_PROXY": "socks5://127.0.0.1:1080"}, "only http:// forward proxies"),
    ({"https_proxy": "https://proxy.example:3128"}, "only http:// forward proxies"),
    ({"HTTPS_PROXY": "http://:3128"}, "is not a proxy URL"),
    ({"SSL_CERT_FILE": "/nonexistent/ca.pem"}, "SSL_CERT_FILE names"),
    ({"SSL_CERT_DIR": "/nonexistent"}, "SSL_CERT_DIR names"),
])
def test_a_route_that_cannot_work_stops_the_start(environ: dict[str, str], says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        Egress.from_environ(environ, "https://api.openai.com/v1")


def test_the_route_is_read_from_the_given_environ_only() -> None:
    assert Egress.from_environ({}, "https://api.openai.com/v1").proxy is None
    assert Egress.from_environ({"HTTP_PROXY": "http://p:1"}, "https://api.openai.com/v1").proxy is None
    assert Egress.from_environ({"HTTPS_PROXY": "p.example:3128"}, "https://x/v1").proxy == ForwardProxy(
        "p.example", 3128)
    assert Egress.from_environ({"HTTPS_PROXY": "http://p:1"}, "http://x/v1").proxy is None
    assert Egress.from_environ({"http_proxy": "", "HTTP_PROXY": "http://p:1"}, "http://x/v1").proxy is not None


# ---- What a 502 says, and what /readyz knows -------------------------------------------------------------------

CHECK = 1.0  # upstream_check_seconds in the readiness test


def closed_port() -> socket.socket:
    """A socket bound on 127.0.0.1 but not listening: connecting to it is refused until it listens."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def test_a_502_names_the_upstream_host_and_port_only(start_proxy: Callable[..., str],
                                                     settings_for: Callable[..., Settings]) -> None:
    with closed_port() as sock:
        port = sock.getsockname()[1]
        base = start(start_proxy, settings_for, f"http://user:s3cret@127.0.0.1:{port}/private/v1", {})
        for response in (httpx.get(base + "/v1/models?key=k3y"),
                         httpx.post(base + "/v1/chat/completions", json={"model": "m", "messages": []},
                                    headers={"X-Memory-User": "ann"})):
            assert response.status_code == 502
            message = response.json()["error"]["message"]
            assert message.startswith(f"the upstream 127.0.0.1:{port} could not be reached: ")
            assert "s3cret" not in message and "private" not in message and "k3y" not in message


def test_readyz_reports_the_upstream_it_cannot_reach_and_checks_it_again_at_most_every_n_seconds(
        start_proxy: Callable[..., str], settings_for: Callable[..., Settings]) -> None:
    fake = FakeUpstream()
    with closed_port() as sock:
        port = sock.getsockname()[1]
        base = start(start_proxy, settings_for, f"http://127.0.0.1:{port}/v1", {}, upstream_check_seconds=CHECK)
        ready = httpx.get(base + "/readyz")
        assert ready.status_code == 200  # this process can serve: the memory API works, chats get a clear 502
        body = ready.json()
        assert body["parts"] == {"model": True, "store": True, "upstream": False}
        assert body["upstream"]["reachable"] is False and f"127.0.0.1:{port}" in body["upstream"]["error"]
        strict = httpx.get(base + "/readyz", params={"require": "upstream"})
        assert strict.status_code == 503 and strict.json()["status"] == "upstream-unreachable"

        sock.listen()
        with running(fake.app, sock=sock):
            assert httpx.get(base + "/readyz").json()["parts"]["upstream"] is False  # still trusted for CHECK s
            time.sleep(CHECK + 0.1)
            began = time.monotonic()
            with httpx.Client() as client:
                for _ in range(50):  # however often it is asked, one probe per CHECK seconds at most
                    assert client.get(base + "/readyz", params={"require": "upstream"}).status_code == 200
            probes = [r for r in fake.requests if r.path == "/v1/models"]
            assert 1 <= len(probes) <= 1 + (time.monotonic() - began) / CHECK
            assert "authorization" not in probes[0].headers
            time.sleep(CHECK + 0.1)
            probed = len([r for r in fake.requests if r.path == "/v1/models"])
            assert httpx.post(base + "/v1/chat/completions", json={"model": "m", "messages": [
                {"role": "user", "content": "hi"}]}).status_code == 200
            assert httpx.get(base + "/readyz").json()["upstream"]["reachable"] is True
            assert len([r for r in fake.requests if r.path == "/v1/models"]) == probed  # a real exchange counts
