"""The inspector page at /ui: static files (proxy/ui/, shipped as package data, no build step) that talk to the
management API from the operator's browser with the token the operator types in.

The files hold no data and no secret, so serving them needs no token; every call the page makes goes through
the API's own guard. The page renders what users said as text, never as markup, and the Content-Security-Policy
below lets it run only its own script and reach only this origin, so stored text cannot turn into script.
"""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles
from starlette.types import Message, Receive, Scope, Send

CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                           "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'")
HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cache-control": "no-cache",  # revalidated (ETag) so an upgraded proxy serves its own page at once
}


class Page:
    """The files of proxy/ui with the headers above (a missing file is the app's JSON 404)."""

    def __init__(self) -> None:
        self.files = StaticFiles(packages=[("proxy", "ui")], html=True)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).update(HEADERS)
            await send(message)

        await self.files(scope, receive, send_with_headers)


routes = [Mount("/ui", app=Page(), name="ui")]
