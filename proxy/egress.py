"""The way out to the upstream: the forward proxy and the trusted CAs, from the standard environment variables.

    https_proxy / HTTPS_PROXY    for an https:// upstream: CONNECT through this proxy, TLS end to end inside
    http_proxy / HTTP_PROXY      for an http:// upstream: requests in absolute form through this proxy
    all_proxy / ALL_PROXY        either, when the scheme's own variable is unset
    no_proxy / NO_PROXY          hosts reached directly: `*`, names (`example.com` also covers its subdomains,
                                 a leading `.` or `*.` is the same), `host:port`, IP addresses and CIDR ranges
    SSL_CERT_FILE, SSL_CERT_DIR  the CAs an https:// upstream's certificate must chain to (default: certifi's)

The lower-case name wins over the upper-case one, as in curl and Python's urllib; an empty value counts as
unset. A proxy is `http://[user:password@]host[:port]` (no scheme means http://); its credentials go in
`Proxy-Authorization: Basic`. HTTPS and SOCKS proxies are refused at start with a clear error. The variables are
read from the Mapping the settings were loaded from (`config.load(environ=...)`), never from os.environ behind
the caller's back.
"""

from __future__ import annotations

import base64
import ipaddress
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import httpx

from proxy.errors import ConfigError


def _env(environ: Mapping[str, str], name: str) -> str:
    return (environ.get(name.lower()) or environ.get(name.upper()) or "").strip()


@dataclass(frozen=True, slots=True)
class ForwardProxy:
    """An HTTP forward proxy: where to connect, and the Proxy-Authorization value if it has credentials."""

    host: str
    port: int
    authorization: bytes | None = None

    @property
    def origin(self) -> str:
        """host:port, for messages (never the credentials)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, value: str, variable: str) -> ForwardProxy:
        """Raises ConfigError for a scheme other than http://, or no host."""
        parts = urlsplit(value if "://" in value else "http://" + value)
        if parts.scheme.lower() != "http":
            raise ConfigError(f"{variable}: only http:// forward proxies are supported (TLS to the upstream goes "
                              f"end to end through CONNECT), not {parts.scheme}://")
        try:
            host, port = parts.hostname, parts.port or 80
        except ValueError:
            host = None
        if not host:
            raise ConfigError(f"{variable} is not a proxy URL like http://proxy.example:3128")
        authorization = None
        if parts.username is not None:
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            authorization = b"Basic " + base64.b64encode(pair)
        return cls(host, port, authorization)


def bypassed(host: str, port: int, no_proxy: str) -> bool:
    """Whether `no_proxy` (comma-separated, see the module docstring) names this host."""
    host = host.lower().strip("[]").rstrip(".")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for entry in filter(None, (part.strip().lower() for part in no_proxy.split(","))):
        if entry == "*":
            return True
        name, entry_port = entry, None
        if entry.startswith("[") and "]" in entry:  # [::1] or [::1]:8080
            name, _, rest = entry[1:].partition("]")
            entry_port = rest[1:] or None
        elif entry.count(":") == 1:
            name, entry_port = entry.split(":")
        if entry_port is not None and entry_port != str(port):
            continue
        if address is not None:
            try:
                if address in ipaddress.ip_network(name, strict=False):
                    return True
            except ValueError:
                pass
            continue
        name = name.removeprefix("*").lstrip(".").rstrip(".")
        if name and (host == name or host.endswith("." + name)):
            return True
    return False


def ssl_context(environ: Mapping[str, str]) -> ssl.SSLContext:
    """The CAs to verify the upstream with: SSL_CERT_FILE and/or SSL_CERT_DIR if set (ConfigError if they name
    nothing), else certifi's bundle, as httpx uses."""
    cafile, capath = environ.get("SSL_CERT_FILE") or None, environ.get("SSL_CERT_DIR") or None
    if cafile is None and capath is None:
        return httpx.create_ssl_context(trust_env=False)
    if cafile is not None and not Path(cafile).is_file():
        raise ConfigError(f"SSL_CERT_FILE names {cafile!r}, which is not a file")
    if capath is not None and not Path(capath).is_dir():
        raise ConfigError(f"SSL_CERT_DIR names {capath!r}, which is not a directory")
    try:
        return ssl.create_default_context(cafile=cafile, capath=capath)
    except ssl.SSLError as exc:
        raise ConfigError(f"SSL_CERT_FILE {cafile!r} holds no usable CA certificate ({exc})") from None


@dataclass(frozen=True, slots=True)
class Egress:
    """How to reach one upstream origin: directly or through `proxy`, and with which TLS context."""

    proxy: ForwardProxy | None
    ssl: ssl.SSLContext | None  # None for an http:// upstream

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], upstream: str) -> Egress:
        """The route to `upstream` (a URL) that these environment variables give; ConfigError for a proxy or CA
        setting that cannot work, so that a bad one stops the start, not the first request."""
        url = httpx.URL(upstream)
        scheme = url.scheme
        proxy = None
        for name in (f"{scheme}_proxy", "all_proxy"):
            value = _env(environ, name)
            if value:
                proxy = ForwardProxy.parse(value, name.upper())
                break
        if proxy is not None and bypassed(url.host, url.port or (443 if scheme == "https" else 80),
                                          _env(environ, "no_proxy")):
            proxy = None
        return cls(proxy, ssl_context(environ) if scheme == "https" else None)
