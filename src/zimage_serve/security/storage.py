"""How much of the server's disk one user may fill with what they store: their uploads (input and temp),
saved workflows and settings (userdata) and templates, counted together in bytes and in files.

The server's `--user-storage` and `--user-files` hold for every user; a token may set its own
(`max_storage`, `max_files`). Admins, and everyone when authentication is off, store in the shared
folders, which are the operator's to manage. The images a user's jobs make are bounded by their
images a day instead, so they are not counted here.

A write is admitted under a lock of its user, which counts what they keep (off the event loop) and
holds until the write is done, so two concurrent uploads cannot both take the last room.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from zimage_serve.errors import ZImageError
from zimage_serve.identity import Identity
from zimage_serve.limits import StorageLimits


class StorageFull(ZImageError):
    """A write that would take a user past their storage: 413, naming the limit."""

    status = 413


@dataclass(frozen=True)
class Kept:
    files: int
    bytes: int


def kept(folders: list[Path]) -> Kept:
    """The files below `folders`, and their bytes (a file removed while counting is not counted)."""
    files = used = 0
    for root in folders:
        for folder, _, names in os.walk(root):
            for name in names:
                try:
                    used += os.path.getsize(os.path.join(folder, name))
                except OSError:
                    continue
                files += 1
    return Kept(files, used)


class Storage:
    def __init__(self, folders_of: Callable[[str], list[Path]], limits: StorageLimits | None = None) -> None:
        """`folders_of(user)`: the folders that hold what `user` stores."""
        self.folders_of, self.limits = folders_of, limits or StorageLimits()
        self._locks: dict[str, asyncio.Lock] = {}

    def limits_of(self, identity: Identity, max_bytes: int | None, max_files: int | None) -> StorageLimits | None:
        """The caller's limits (a token's own, else the server's); None for the shared folders' writers."""
        if identity.space is None:
            return None
        return StorageLimits(max_bytes or self.limits.bytes, max_files or self.limits.files)

    async def usage(self, user: str) -> Kept:
        return await asyncio.to_thread(kept, self.folders_of(user))

    @asynccontextmanager
    async def room(
        self, identity: Identity, limits: StorageLimits | None, adding: int, replacing: Path | None = None
    ) -> AsyncIterator[None]:
        """Hold while writing `adding` bytes (in place of `replacing`, if it is a file); raises StorageFull
        if that would pass the caller's limits."""
        if limits is None:
            yield
            return
        lock = self._locks.setdefault(identity.user, asyncio.Lock())
        async with lock:
            now = await self.usage(identity.user)
            replaced = await asyncio.to_thread(_size, replacing) if replacing is not None else None
            files = now.files + (0 if replaced is not None else 1)
            used = now.bytes - (replaced or 0) + adding
            if files > limits.files:
                raise StorageFull(
                    f"you keep {now.files:,} files (uploads, saved workflows and templates), and may keep "
                    f"{limits.files:,}: delete some first"
                )
            if used > limits.bytes:
                raise StorageFull(
                    f"this would make {used:,} bytes of uploads, saved workflows and templates, and you may keep "
                    f"{limits.bytes:,}: delete some first"
                )
            yield


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size if path.is_file() else None
    except OSError:
        return None
