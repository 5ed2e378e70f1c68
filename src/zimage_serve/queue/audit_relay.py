"""Job ends into the audit log, for a node whose queue is Redis.

The Redis queue writes every job's end to a stream in the script that records it (queue/redis_scripts.py),
as the SQLite queue writes it to its outbox table in the same transaction. Each API node reads the stream
in one consumer group, so every end goes to one node; it copies what it reads into the outbox table of
its own audit file (the table the audit log's writer empties, security/audit.py) and only then
acknowledges it. A node that dies between the two reads its unacknowledged entries again when it starts
(under the same node name): an end may then be logged twice, never lost.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path
from typing import Any

import redis

from zimage_serve.private import private_file
from zimage_serve.queue.redis_queue import RedisQueue
from zimage_serve.security.audit_files import AUDIT_TABLES, upgrade_audit_tables

log = logging.getLogger(__name__)
GROUP = "audit"
BATCH = 500


def audit_file(path: Path) -> Path:
    """A file holding only the audit log's head and outbox (for a node whose queue is not a file)."""
    db = sqlite3.connect(str(private_file(path)))
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(AUDIT_TABLES)
        upgrade_audit_tables(db)
    finally:
        db.close()
    return path


class AuditRelay:
    def __init__(self, queue: RedisQueue, outbox_file: Path, consumer: str) -> None:
        self.queue, self.consumer = queue, consumer
        self.stream = queue.prefix + "audit"
        self._db = sqlite3.connect(str(outbox_file), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA busy_timeout=10000")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="zimage-audit-relay", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._db.close()

    def relay_once(self, block_ms: int | None = None) -> int:
        """Copy what waits (this node's unacknowledged entries first); how many were copied."""
        self._ensure_group()
        moved = 0
        for start in ("0", ">"):  # "0": delivered to this consumer before and never acknowledged
            entries = self._read(start, block_ms if start == ">" else None)
            if entries:
                self._copy(entries)
                moved += len(entries)
        return moved

    def _read(self, start: str, block_ms: int | None) -> list[tuple[str, dict[str, Any]]]:
        def read() -> Any:
            return self.queue.redis.xreadgroup(GROUP, self.consumer, {self.stream: start}, count=BATCH, block=block_ms)

        found = self.queue.call(read) or []
        # An entry trimmed from the stream while delivered comes back with no fields: nothing to copy.
        return [(str(entry_id), dict(fields)) for _, batch in found for entry_id, fields in batch if fields]

    def _ensure_group(self) -> None:
        try:
            self.queue.call(lambda: self.queue.redis.xgroup_create(self.stream, GROUP, id="0", mkstream=True))
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _copy(self, entries: list[tuple[str, dict[str, Any]]]) -> None:
        rows = [
            (
                e["job_id"],
                e.get("owner", ""),
                e.get("context", "{}"),
                e["state"],
                _number(e.get("created")),
                _number(e.get("started")),
                _number(e.get("finished")),
                e.get("result"),
            )
            for _, e in entries
        ]
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.executemany(
                "INSERT INTO audit_outbox (job_id, owner, context, state, created, started, finished, result) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        ids = [entry_id for entry_id, _ in entries]
        self.queue.call(lambda: self.queue.redis.xack(self.stream, GROUP, *ids))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.relay_once(block_ms=1000)
            except Exception as exc:  # Redis away, or the file busy: the entries wait in the stream
                log.warning("could not copy job ends into the audit log (%s); trying again", exc)
                self._stop.wait(1.0)


def _number(text: str | None) -> float | None:
    return float(text) if text else None
