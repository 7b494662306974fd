"""Who may call the proxy, and whose memories a call may reach.

Three independent locks, each off until configured:

- Proxy keys (`proxy_keys = "tenant:key,..."`): every /v1 call must carry one as `Authorization: Bearer <key>`;
  the proxy sends its own `upstream_key` upstream instead. Memory is namespaced by tenant + user, so a tenant's
  key reaches only its own users whatever `X-Memory-User` says: the store sees `tenant<US>user`, and user ids
  can never hold the separator (control characters are refused).
- The admin token (`admin_token`): the management API answers a caller holding it, or a proxy key (scoped to
  that key's tenant); with either configured, nobody else.
- Signed users (`user_signing_secret`): the user header counts only with `X-Memory-User-Signature:
  t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<user id>">`, for apps behind a gateway that vouches for its
  users; a signature is good for `user_signature_max_age` seconds either side of its time (a leaked one stops
  working), and the old unexpiring form (hex HMAC of the id alone) counts only with `user_signature_legacy`.
  The body's `user` field then names no one (an end user could put anything there).

Both credentials are sent as `Authorization: Bearer <token>`; the scheme is matched case-insensitively, as RFC
9110 section 11.1 says auth schemes are.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from dataclasses import dataclass

from starlette.requests import Request

from proxy.config import Settings
from proxy.errors import BadRequest, ConfigError, Unauthorized
from proxy.models import TENANT_SEPARATOR, check_name

TIMESTAMPED = re.compile(r"t=(\d{1,12}),\s*v1=([0-9a-fA-F]{64})")


def bearer_token(request: Request) -> str | None:
    """The token of `Authorization: Bearer <token>` (scheme in any case, RFC 9110 11.1), or None."""
    scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def parse_proxy_keys(spec: str) -> dict[bytes, str]:
    """`tenant:key,tenant:key` → {sha256(key): tenant}. Hashing first makes the lookup independent of how much of
    a guessed key is right (no timing oracle) and keeps no key in memory longer than needed."""
    keys: dict[bytes, str] = {}
    for entry in filter(None, (part.strip() for part in spec.split(","))):
        tenant, sep, key = entry.partition(":")
        tenant, key = tenant.strip(), key.strip()
        if not sep or not tenant or not key:
            raise ConfigError(f"proxy_keys entries look like tenant:key, not {entry[:12]!r}...")
        if check_name(tenant, "tenant"):
            raise ConfigError(f"proxy_keys: tenant {tenant[:40]!r} is not a valid name")
        if len(key) < 16:
            raise ConfigError(f"proxy_keys: the key of tenant {tenant!r} is shorter than 16 characters")
        digest = hashlib.sha256(key.encode()).digest()
        if digest in keys:
            raise ConfigError("proxy_keys: the same key is given twice")
        keys[digest] = tenant
    return keys


@dataclass(frozen=True, slots=True)
class Gate:
    """The configured locks, parsed once at start."""

    keys: dict[bytes, str]
    admin_token: str
    signing_secret: bytes
    signature_max_age: float = 300.0
    signature_legacy: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> Gate:
        keys = parse_proxy_keys(settings.proxy_keys)
        if keys and not settings.upstream_key:
            raise ConfigError("proxy_keys needs upstream_key: clients then send proxy keys, never the upstream's")
        return cls(keys, settings.admin_token, settings.user_signing_secret.encode(),
                   settings.user_signature_max_age, settings.user_signature_legacy)

    @property
    def open(self) -> bool:
        """Anyone who can reach the proxy can read memories."""
        return not self.keys and not self.admin_token

    def tenant_of_key(self, request: Request) -> str | None:
        """The tenant whose proxy key the request carries, or None when it carries none we know."""
        token = bearer_token(request)
        return None if token is None else self.keys.get(hashlib.sha256(token.encode()).digest())

    def client(self, request: Request) -> str | None:
        """For /v1 calls: the caller's tenant (None when proxy keys are off); 401 without a valid key."""
        if not self.keys:
            return None
        tenant = self.tenant_of_key(request)
        if tenant is None:
            raise Unauthorized("this proxy needs a proxy key: Authorization: Bearer <proxy key>",
                               code="invalid_api_key")
        return tenant

    def manager(self, request: Request) -> str | None:
        """For the management API: the tenant whose users the caller may manage (None: the un-namespaced store).
        The admin token reaches any tenant, named by `X-Memory-Tenant`; a proxy key only its own."""
        if self.admin_token:
            sent = bearer_token(request) or ""
            if hmac.compare_digest(sent.encode(), self.admin_token.encode()):
                tenant = one_header(request, "X-Memory-Tenant")
                if tenant is not None and check_name(tenant, "tenant"):
                    raise Unauthorized("X-Memory-Tenant is not a valid tenant name")
                return tenant or None
        if self.keys:
            tenant = self.tenant_of_key(request)
            if tenant is not None:
                return tenant
        if self.open:
            return None
        raise Unauthorized("this endpoint needs the admin token (Authorization: Bearer <admin_token>)"
                           + (" or a proxy key" if self.keys else ""))

    def signed(self, request: Request, user: str, now: float | None = None) -> bool:
        """Whether the user header's signature is right and current (always, when signing is off)."""
        if not self.signing_secret:
            return True
        sent = (one_header(request, "X-Memory-User-Signature") or "").strip()
        stamped = TIMESTAMPED.fullmatch(sent)
        if stamped:
            at = int(stamped.group(1))
            if abs((time.time() if now is None else now) - at) > self.signature_max_age:
                return False
            expected = hmac.new(self.signing_secret, f"{at}.{user}".encode(), hashlib.sha256).hexdigest()
            return hmac.compare_digest(stamped.group(2).lower().encode(), expected.encode())
        if not self.signature_legacy:
            return False
        plain = sent.lower().removeprefix("sha256=")
        expected = hmac.new(self.signing_secret, user.encode(), hashlib.sha256).hexdigest()
        return hmac.compare_digest(plain.encode(), expected.encode())


def namespaced(tenant: str | None, user: str) -> str:
    """The id the store files a user's memories under."""
    return user if tenant is None else f"{tenant}{TENANT_SEPARATOR}{user}"


def sign(secret: str, user: str, at: float | None = None) -> str:
    """The `X-Memory-User-Signature` a gateway sends with a user header at time `at` (unix seconds; now when
    None): `t=<at>,v1=<hex HMAC-SHA256 of "<at>.<user>">`, like Stripe's webhook signatures."""
    stamp = int(time.time() if at is None else at)
    digest = hmac.new(secret.encode(), f"{stamp}.{user}".encode(), hashlib.sha256).hexdigest()
    return f"t={stamp},v1={digest}"


def sign_unexpiring(secret: str, user: str) -> str:
    """The old signature (hex HMAC-SHA256 of the user id alone): it never expires, so it counts only with
    `user_signature_legacy` on."""
    return hmac.new(secret.encode(), user.encode(), hashlib.sha256).hexdigest()


def one_header(request: Request, name: str, code: str = "invalid_header") -> str | None:
    """The value of header `name` (any case), as the client meant it: UTF-8 (Starlette decodes header bytes as
    Latin-1), or None when absent. BadRequest (param `name`) when it was sent more than once (which one a gateway
    meant is not ours to guess) or is not UTF-8 (read as Latin-1, `h\\xffx` would name what a UTF-8 `hÿx` names);
    `code` is the error's code."""
    sent = request.headers.getlist(name)
    if len(sent) > 1:
        raise BadRequest(f"{name} was sent {len(sent)} times: send it once", param=name, code=code)
    if not sent or sent[0].isascii():
        return sent[0] if sent else None
    try:
        return sent[0].encode("latin-1").decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(f"{name} is not UTF-8", param=name, code=code) from None
