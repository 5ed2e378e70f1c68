"""Idempotency keys and asset records of one machine: a SQLite file of their own beside the queue's
(`<data dir>/records.sqlite3`), so that uploads and key claims never wait on the queue's write lock."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from zimage_serve import sqlite_busy
from zimage_serve.private import private_file
from zimage_serve.records.contract import KEY_TTL_S, Asset, Place

SCHEMA = """
CREATE TABLE IF NOT EXISTS idempotency_keys (
    owner TEXT NOT NULL,
    key TEXT NOT NULL,
    expires REAL NOT NULL,
    PRIMARY KEY (owner, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS idempotency_keys_expiring ON idempotency_keys (expires);
CREATE TABLE IF NOT EXISTS assets (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    space TEXT NOT NULL,
    kind TEXT NOT NULL,
    subfolder TEXT NOT NULL,
    filename TEXT NOT NULL,
    size INTEGER NOT NULL,
    content_type TEXT NOT NULL,
    created REAL NOT NULL,
    hash TEXT,
    file_path TEXT,
    expires REAL,
    job_id TEXT,
    node_id TEXT,
    tags TEXT NOT NULL DEFAULT '[]'
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS assets_by_hash ON assets (owner, hash) WHERE hash IS NOT NULL AND job_id IS NULL;
CREATE INDEX IF NOT EXISTS assets_by_place ON assets (space, kind, subfolder, filename);
CREATE INDEX IF NOT EXISTS assets_of_jobs ON assets (job_id) WHERE job_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS assets_expiring ON assets (expires) WHERE expires IS NOT NULL;
"""
COLUMNS = (
    "id, owner, space, kind, subfolder, filename, size, content_type, created, hash, file_path, expires, job_id, "
    "node_id, tags"
)


class SQLiteRecords:
    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path, self.clock = private_file(path), clock
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._db.execute("PRAGMA busy_timeout=0")  # waits are sqlite_busy's, in short steps
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- idempotency keys ----------------------------------------------------------------------------
    def claim_key(self, owner: str, key: str, ttl_s: float = KEY_TTL_S) -> bool:
        now = self.clock()
        with self._writing():
            self._execute(
                "DELETE FROM idempotency_keys WHERE owner = ? AND key = ? AND expires <= ?", (owner, key, now)
            )
            claimed = self._execute(
                "INSERT OR IGNORE INTO idempotency_keys (owner, key, expires) VALUES (?, ?, ?)",
                (owner, key, now + ttl_s),
            ).rowcount
            # A few of the keys that expired go with each claim: the table holds a day of claims at most.
            self._execute(
                "DELETE FROM idempotency_keys WHERE (owner, key) IN "
                "(SELECT owner, key FROM idempotency_keys WHERE expires <= ? ORDER BY expires LIMIT 8)",
                (now,),
            )
        return bool(claimed)

    def release_key(self, owner: str, key: str) -> None:
        with self._writing():
            self._execute("DELETE FROM idempotency_keys WHERE owner = ? AND key = ?", (owner, key))

    # -- assets --------------------------------------------------------------------------------------
    def add_asset(self, asset: Asset) -> Asset:
        with self._writing():
            self._execute(f"INSERT OR IGNORE INTO assets ({COLUMNS}) VALUES ({', '.join('?' * 15)})", _row(asset))
            row = self._execute(f"SELECT {COLUMNS} FROM assets WHERE id = ?", (asset.id,)).fetchone()
        return _asset(row)

    def asset(self, asset_id: str) -> Asset | None:
        with self._lock:
            row = self._execute(f"SELECT {COLUMNS} FROM assets WHERE id = ?", (asset_id,)).fetchone()
        return None if row is None else _asset(row)

    def with_hash(self, owner: str, hash: str) -> Asset | None:
        with self._lock:
            row = self._execute(
                f"SELECT {COLUMNS} FROM assets WHERE owner = ? AND hash = ? AND job_id IS NULL "
                "AND hash IS NOT NULL LIMIT 1",
                (owner, hash),
            ).fetchone()
        return None if row is None else _asset(row)

    def set_hash(self, asset_id: str, hash: str) -> None:
        with self._writing():
            self._execute("UPDATE assets SET hash = ? WHERE id = ?", (hash, asset_id))

    def delete_asset(self, asset_id: str) -> tuple[Asset, bool] | None:
        with self._writing():
            row = self._execute(f"SELECT {COLUMNS} FROM assets WHERE id = ?", (asset_id,)).fetchone()
            if row is None:
                return None
            self._execute("DELETE FROM assets WHERE id = ?", (asset_id,))
            others = self._execute(
                "SELECT 1 FROM assets WHERE space = ? AND kind = ? AND subfolder = ? AND filename = ? LIMIT 1",
                (row["space"], row["kind"], row["subfolder"], row["filename"]),
            ).fetchone()
        return _asset(row), others is None

    def forget_outputs(self, job_ids: list[str]) -> int:
        with self._writing():
            return sum(self._execute("DELETE FROM assets WHERE job_id = ?", (job_id,)).rowcount for job_id in job_ids)

    def expired_assets(self, now: float, limit: int = 100) -> list[Asset]:
        with self._lock:
            rows = self._execute(
                f"SELECT {COLUMNS} FROM assets WHERE expires IS NOT NULL AND expires <= ? ORDER BY expires LIMIT ?",
                (now, limit),
            ).fetchall()
        return [_asset(row) for row in rows]

    # -- internals -----------------------------------------------------------------------------------
    def _execute(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Cursor:
        return sqlite_busy.execute(self._db, sql, args)

    def _writing(self) -> AbstractContextManager[None]:
        return sqlite_busy.transaction(self._db, self._lock)


def _row(asset: Asset) -> tuple[Any, ...]:
    place = asset.place
    return (
        asset.id,
        asset.owner,
        place.space,
        place.kind,
        place.subfolder,
        place.filename,
        asset.size,
        asset.content_type,
        asset.created,
        asset.hash,
        asset.file_path,
        asset.expires,
        asset.job_id,
        asset.node_id,
        json.dumps(list(asset.tags)),
    )


def _asset(row: sqlite3.Row) -> Asset:
    return Asset(
        id=row["id"],
        owner=row["owner"],
        place=Place(row["kind"], row["subfolder"], row["filename"], row["space"]),
        size=row["size"],
        content_type=row["content_type"],
        created=row["created"],
        hash=row["hash"],
        file_path=row["file_path"],
        expires=row["expires"],
        job_id=row["job_id"],
        node_id=row["node_id"],
        tags=tuple(json.loads(row["tags"])),
    )
