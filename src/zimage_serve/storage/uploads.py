"""The output store's outbox and its record of stored objects, in the queue's SQLite file (storage/schema.py).

One row per succeeded job, claimed with a lease (two API nodes sharing the file never upload one job at
once), removed when each of its files is stored: an output is uploaded at least once, always under the one
key its place names, so a second upload after a crash replaces the object with the same bytes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from zimage_serve import outbox
from zimage_serve.storage.schema import TABLES, fit_triggers


@dataclass(frozen=True)
class OutputFile:
    """A file a job listed in its outputs' `output` folder."""

    subfolder: str
    filename: str


@dataclass(frozen=True)
class Upload:
    """One job's files, claimed for uploading."""

    seq: int
    job_id: str
    space: str  # '' : the shared folders
    files: tuple[OutputFile, ...]
    created: float
    attempts: int  # tries, this one included
    lease_until: float
    owner: str = ""  # who queued the job


@dataclass(frozen=True)
class StoredObject:
    job_id: str
    space: str
    subfolder: str
    filename: str
    key: str
    size: int
    mtime_ns: int = 0  # the local file's when it was stored: a later file under a reused name is another


class Uploads(Protocol):
    """The uploads' outbox and the record of stored objects, kept with the queue: in its SQLite file
    (`UploadOutbox`) or in its Redis (`redis_uploads.RedisUploadOutbox`); one contract suite holds both."""

    def close(self) -> None: ...

    def use(self, location: str | None) -> None:
        """Jobs that succeed from now on are uploaded to `location`; None: not by this node."""
        ...

    def claim(self, now: float, limit: int, lease_s: float) -> list[Upload]:
        """Due uploads, oldest first, leased to the caller for `lease_s`."""
        ...

    def stored_as(self, space: str, file: OutputFile) -> StoredObject | None:
        """The object a file was stored as by any job (a job served from the cache lists an earlier job's file)."""
        ...

    def stored(self, upload: Upload, objects: list[StoredObject]) -> bool:
        """The job's files are stored: recorded, and its upload out of the outbox, at once. False when the
        lease ran out meanwhile (another node has the job now: it records the same keys)."""
        ...

    def failed(self, upload: Upload, error: str, retry_at: float | None) -> None:
        """A try that did not store every file: again at `retry_at`, or given up on (None): its files stay on
        disk, and the job's events go out without their objects. Fenced by the claim's lease."""
        ...

    def objects_of(self, job_ids: Iterable[str]) -> dict[str, list[StoredObject]]:
        """The stored objects of these jobs, by job."""
        ...

    def pending(self) -> list[dict[str, Any]]:
        """Jobs whose files are not all stored yet (dead ones too), oldest first: what an admin looks at."""
        ...

    def forget_dead(self, before: float) -> int:
        """Uploads given up on before then are no longer listed; how many."""
        ...

    def retry(self, job_ids: list[str] | None, now: float) -> int:
        """Uploads given up on (these jobs', or all) are tried again from `now`, with a fresh retry window;
        how many."""
        ...


def listed_items(outputs: Any) -> Iterator[dict[str, Any]]:
    """Every entry (a dict) in the lists a history entry's `outputs` holds per node (images, gifs, audio ...),
    whatever else they hold."""
    for ui in outputs.values() if isinstance(outputs, dict) else ():
        for items in ui.values() if isinstance(ui, dict) else ():
            for item in items if isinstance(items, list) else ():
                if isinstance(item, dict):
                    yield item


def output_files(result: Any) -> Iterator[OutputFile]:
    """The files in the output folder that a history entry's outputs list (each node's lists of files)."""
    for item in listed_items(result.get("outputs") if isinstance(result, dict) else None):
        if isinstance(item.get("filename"), str) and item.get("type", "output") == "output":
            yield OutputFile(str(item.get("subfolder") or ""), item["filename"])


class UploadOutbox(outbox.OutboxFile):
    """The uploads' outbox of one queue file; thread-safe."""

    TABLE = "output_outbox"

    def __init__(self, path: Path) -> None:
        super().__init__(path, TABLES)

    def use(self, location: str | None) -> None:
        """Uploads from now on go to `location`. None: none (a job that ends then puts nothing in the outbox),
        and the jobs still waiting for an upload are given up on, so their webhooks are no longer held."""
        with self._writing():
            self._execute("DELETE FROM output_store")
            if location is not None:
                self._execute("INSERT INTO output_store (id, location) VALUES (1, ?)", (location,))
            else:
                self._execute(
                    "UPDATE output_outbox SET dead = ?, last_error = 'no output store is configured any more', "
                    "lease_until = NULL WHERE dead IS NULL",
                    (time.time(),),
                )
            fit_triggers(self._execute)

    def claim(self, now: float, limit: int, lease_s: float) -> list[Upload]:
        if not self._read(f"SELECT 1 FROM output_outbox WHERE {DUE} LIMIT 1", (now, now)):
            return []
        with self._writing():
            rows = self._execute(
                "UPDATE output_outbox SET lease_until = ?, attempts = attempts + 1 WHERE seq IN ("
                f"SELECT seq FROM output_outbox WHERE {DUE} ORDER BY next_at, seq LIMIT ?) RETURNING *",
                (now + lease_s, now, now, limit),
            ).fetchall()
        claimed = []
        for row in sorted(rows, key=lambda r: r["seq"]):
            try:
                result = json.loads(row["result"] or "{}")
            except ValueError:
                result = {}
            files = tuple(dict.fromkeys(output_files(result)))
            claimed.append(
                Upload(row["seq"], row["job_id"], row["space"], files, row["created"], row["attempts"],
                       row["lease_until"], row["owner"])
            )  # fmt: skip
        return claimed

    def stored_as(self, space: str, file: OutputFile) -> StoredObject | None:
        """The object a file was stored as by any job (a job served from the cache lists an earlier job's file)."""
        rows = self._read(
            "SELECT * FROM output_objects WHERE space = ? AND subfolder = ? AND filename = ? "
            "ORDER BY uploaded DESC LIMIT 1",
            (space, file.subfolder, file.filename),
        )
        return _stored(rows[0]) if rows else None

    def stored(self, upload: Upload, objects: list[StoredObject]) -> bool:
        """The job's files are stored: recorded, and its row out of the outbox, in one transaction. False when
        the lease ran out meanwhile (another node has the job now: it records the same keys)."""
        with self._writing():
            gone = self._execute(
                "DELETE FROM output_outbox WHERE seq = ? AND lease_until = ?", (upload.seq, upload.lease_until)
            )
            if gone.rowcount == 0:
                return False
            for found in objects:  # recorded while its job is kept (a job deleted meanwhile leaves no record)
                self._execute(
                    "INSERT OR REPLACE INTO output_objects (job_id, space, subfolder, filename, key, size, mtime_ns, "
                    "uploaded) SELECT ?, ?, ?, ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM jobs WHERE id = ?)",
                    (found.job_id, found.space, found.subfolder, found.filename, found.key, found.size,
                     found.mtime_ns, time.time(), found.job_id),
                )  # fmt: skip
        return True

    def failed(self, upload: Upload, error: str, retry_at: float | None) -> None:
        """A try that did not store every file: again at `retry_at`, or given up on (None): its files stay on
        disk, and the job's events go out without their objects."""
        self.retry_or_give_up(upload.seq, upload.lease_until, error, retry_at)

    def forget_dead(self, before: float) -> int:
        with self._writing():
            return int(self._execute("DELETE FROM output_outbox WHERE dead < ?", (before,)).rowcount)

    def retry(self, job_ids: list[str] | None, now: float) -> int:
        which = "" if job_ids is None else f" AND job_id IN ({','.join('?' * len(job_ids))})"
        with self._writing():
            return int(
                self._execute(
                    "UPDATE output_outbox SET dead = NULL, attempts = 0, created = ?, next_at = ?, lease_until = NULL "
                    f"WHERE dead IS NOT NULL{which}",
                    (now, now, *(job_ids or [])),
                ).rowcount
            )

    def objects_of(self, job_ids: Iterable[str]) -> dict[str, list[StoredObject]]:
        """The stored objects of these jobs, by job."""
        wanted = list(dict.fromkeys(job_ids))
        found: dict[str, list[StoredObject]] = {}
        for start in range(0, len(wanted), 500):  # SQLite's limit on bound values, well within
            chunk = wanted[start : start + 500]
            rows = self._read(
                f"SELECT * FROM output_objects WHERE job_id IN ({','.join('?' * len(chunk))})", tuple(chunk)
            )
            for row in rows:
                found.setdefault(row["job_id"], []).append(_stored(row))
        return found

    def pending(self) -> list[dict[str, Any]]:
        """Jobs whose files are not all stored yet (dead ones too), oldest first: what an admin looks at."""
        rows = self._read("SELECT * FROM output_outbox ORDER BY seq")
        return [
            {"job_id": r["job_id"], "attempts": r["attempts"], "error": r["last_error"], "created": r["created"],
             "next_at": r["next_at"], "dead": r["dead"]}
            for r in rows
        ]  # fmt: skip


DUE = "dead IS NULL AND next_at <= ? AND (lease_until IS NULL OR lease_until < ?)"


def _stored(row: Any) -> StoredObject:
    return StoredObject(
        row["job_id"], row["space"], row["subfolder"], row["filename"], row["key"], row["size"], row["mtime_ns"]
    )
