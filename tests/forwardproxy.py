"""A real HTTP forward proxy on 127.0.0.1 for the egress tests: CONNECT tunnels (RFC 9110 §9.3.6) and
absolute-form requests, optional Basic credentials (407 without them), and its own name resolution, so that a
host only it knows (`upstream.test`) proves a request went through it. It records what it was asked."""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class Asked:
    method: str
    target: str
    authorization: str | None


@dataclass
class ForwardProxy:
    hosts: dict[str, str] = field(default_factory=dict)  # names it resolves itself, e.g. upstream.test → 127.0.0.1
    credentials: tuple[str, str] | None = None
    asked: list[Asked] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            line, *lines = head.decode("latin-1").split("\r\n")
            method, target, version = line.split(" ")
            headers = [tuple(part.strip() for part in h.split(":", 1)) for h in lines if h]
            auth = next((v for k, v in headers if k.lower() == "proxy-authorization"), None)
            self.asked.append(Asked(method, target, auth))
            if self.credentials and auth != "Basic " + base64.b64encode(":".join(self.credentials).encode()).decode():
                writer.write(b'HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm="t"\r\n'
                             b"Content-Length: 0\r\nConnection: close\r\n\r\n")
                return
            if method == "CONNECT":
                host, _, port = target.rpartition(":")
                up_reader, up_writer = await asyncio.open_connection(self.hosts.get(host, host), int(port))
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:  # absolute form: one request in origin form to the origin, which then closes
                url = urlsplit(target)
                up_reader, up_writer = await asyncio.open_connection(self.hosts.get(url.hostname or "", url.hostname),
                                                                     url.port or 80)
                kept = [f"{k}: {v}" for k, v in headers if k.lower() not in ("proxy-authorization", "connection")]
                origin_form = (url.path or "/") + (f"?{url.query}" if url.query else "")
                up_writer.write("\r\n".join([f"{method} {origin_form} {version}", *kept, "Connection: close",
                                             "", ""]).encode("latin-1"))
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        except (OSError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        with suppress(OSError):
            writer.close()


@contextmanager
def forward_proxy(proxy: ForwardProxy) -> Iterator[str]:
    """Run `proxy` on a free port of 127.0.0.1 in a thread of its own; yields its URL (http://127.0.0.1:port)."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict[str, asyncio.Server] = {}

    async def start() -> None:
        holder["server"] = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
        started.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(start()), loop.run_forever()), daemon=True)
    thread.start()
    assert started.wait(10)
    port = holder["server"].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        async def stop() -> None:
            holder["server"].close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
