"""Whether a SQLite store's files are still the ones it opened.

A database file deleted (or replaced, by a restore or a careless `mv`) under a running proxy goes on answering:
SQLite keeps writing to the open, unlinked inode, and every write is lost at the next start. `FileIdentity`
records the (device, inode) of the database and its -wal file as opened, and `problem()` compares them with what
the paths name now: the store fails writes with 503 and /readyz reports not ready until the proxy is restarted
on the file that is really there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FileIdentity:
    files: tuple[tuple[str, int, int], ...]  # (path, st_dev, st_ino) of each file as opened

    @classmethod
    def of(cls, path: str) -> FileIdentity:
        """The identity of `path` and of its -wal file (when there is one: WAL mode makes it with the first
        connection). Call it while the store's connections are open."""
        files = []
        for name in (path, path + "-wal"):
            try:
                stat = os.stat(name)
            except FileNotFoundError:
                continue
            files.append((name, stat.st_dev, stat.st_ino))
        return cls(tuple(files))

    def problem(self) -> str | None:
        """Why the paths no longer name the open files (one line), or None. Costs one stat() per file."""
        for name, device, inode in self.files:
            try:
                stat = os.stat(name)
            except FileNotFoundError:
                return f"{name} was deleted while the proxy had it open: restart the proxy"
            except OSError as exc:
                return f"{name} cannot be checked ({exc})"
            if (stat.st_dev, stat.st_ino) != (device, inode):
                return f"{name} was replaced by another file while the proxy had it open: restart the proxy"
        return None
