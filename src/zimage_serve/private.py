"""Files only the server's own user may read.

The token store (token hashes, sign-in sessions), the queue (every prompt, with who sent it), and the
audit log hold what other local users must not see. They are created 0600, in folders created 0700,
whatever the umask; one that an operator left readable by others (a copy, a restore from a backup) is
narrowed when the server opens it, and the log says so. SQLite gives its -wal and -shm files the
database's own permissions.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)
FILE_MODE, FOLDER_MODE = 0o600, 0o700


def private_folder(path: Path) -> Path:
    """`path`, made 0700 if this call creates it (an existing folder is the operator's to set)."""
    path.mkdir(parents=True, exist_ok=True, mode=FOLDER_MODE)
    return path


def private_file(path: Path) -> Path:
    """`path` (a database, say), created empty and 0600 if missing; made 0600 if others could read it."""
    private_folder(path.parent)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE))
    for part in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            mode = stat.S_IMODE(part.stat().st_mode)
        except FileNotFoundError:
            continue
        if not mode & 0o077:
            continue
        try:
            part.chmod(FILE_MODE)
            log.warning("%s was readable by other users (mode %o): it is 0600 now", part, mode)
        except PermissionError:  # another user's file: nothing this process may change
            log.warning("%s is readable by other users (mode %o) and not ours to change", part, mode)
    return path
