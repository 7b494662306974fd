"""Routes whose path parameters may hold any character, "/" included.

A user id is whatever the chat path accepted (proxy/models.py `check_user_id`): `team/alice`, `50%`, `..`, `café`.
In a URL it travels as one percent-encoded segment (`/memories/team%2Falice`). Starlette matches routes on the
decoded path, where that segment has already become two; these routes match on the path as it was sent
(`raw_path`) and decode each parameter on its own, as UTF-8.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote_to_bytes

from starlette.routing import Match, Route
from starlette.types import Scope


def decode_segment(segment: str) -> str:
    """`team%2Falice` → `team/alice`. Bytes that are not UTF-8 become lone surrogates, which no valid id holds,
    so they are refused by the id's check with a 400 instead of being silently replaced."""
    return unquote_to_bytes(segment).decode("utf-8", "surrogateescape")


def raw_route_path(scope: Scope) -> str | None:
    """The path as the client sent it (still percent-encoded), less the app's root path; None if the server
    gave no raw path."""
    raw: bytes | None = scope.get("raw_path")
    if raw is None:
        return None
    path = raw.decode("latin-1")
    root = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root):len(root) + 1] in ("/", ""):
        path = path[len(root):]
    return path


class SegmentRoute(Route):
    """A Route matched on the raw path: each `{param}` is one percent-encoded segment, decoded after the match."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        path = raw_route_path(scope) if scope["type"] == "http" else None
        if path is None:
            return super().matches(scope)
        found = self.path_regex.match(path)
        if not found:
            return Match.NONE, {}
        params: dict[str, Any] = dict(scope.get("path_params", {}))
        params.update({name: decode_segment(value) for name, value in found.groupdict().items()})
        child = {"endpoint": self.endpoint, "path_params": params}
        return (Match.PARTIAL if self.methods and scope["method"] not in self.methods else Match.FULL), child
