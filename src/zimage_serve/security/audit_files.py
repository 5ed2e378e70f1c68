"""The audit log on disk: its segment files, the state the database keeps about them, and the bytes set
aside when a segment holds more than the log wrote.

A log is a folder of segments, `audit-NNNNNN.jsonl`, each a run of JSON lines. The database beside it (the
queue file, or a cluster node's own file) keeps, in the same transactions as the log's head:
- `audit_end`: the segment and size at which the recorded head ends, and, while a batch is being appended,
  the segment and size it will end at (its intent, written before the append);
- `audit_cut`: the last record of the segments retention removed, which the first kept record follows.

So every byte of every segment is accounted for: up to the end, the chain; between the end and a pending
batch's size, a batch in flight (or cut short by a crash or a full disk); anything else was written by
something other than the server, and is moved out to `quarantine/` with a record that says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from zimage_serve.private import private_folder

# The audit log's head, end, cut and outbox (security/audit.py, this module); kept in the queue file, so
# that a job's end and its copy in the outbox are one transaction. A node whose queue is Redis keeps them
# in a file of its own.
AUDIT_TABLES = """
CREATE TABLE IF NOT EXISTS audit_head (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL,
    hash TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_end (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    file TEXT,
    size INTEGER NOT NULL DEFAULT 0,
    pending_file TEXT,
    pending_size INTEGER,
    pending_seq INTEGER,
    pending_hash TEXT
);
CREATE TABLE IF NOT EXISTS audit_cut (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL,
    hash TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    owner TEXT NOT NULL,
    context TEXT NOT NULL,
    state TEXT NOT NULL,
    created REAL,
    started REAL,
    finished REAL,
    result TEXT,
    record TEXT
);"""
# Every job's end is copied, in the transaction that records it, to the outbox the audit log's writer
# empties (security/audit.py): a generation is in the audit log even if a process dies right after it. The
# queue's SQLite store installs it on its jobs table.
AUDIT_TRIGGER = """
CREATE TRIGGER IF NOT EXISTS jobs_audited AFTER UPDATE OF finished ON jobs
WHEN OLD.finished IS NULL AND NEW.finished IS NOT NULL BEGIN
    INSERT INTO audit_outbox (job_id, owner, context, state, created, started, finished, result)
    VALUES (NEW.id, NEW.owner, NEW.context, NEW.state, NEW.created, NEW.started, NEW.finished, NEW.result);
END;
"""

# The outbox also takes whole records (`record`, JSON): a request's, written in the transaction that stores
# the job it queued, so that the request is answered without waiting for the log's writer.
OUTBOX_COLUMNS = "id, job_id, owner, context, state, created, started, finished, result, record"
REQUEST_STATE = "request"  # an outbox row holding a request's record, not a job's end


def upgrade_audit_tables(db: sqlite3.Connection) -> None:
    """Bring an older file's audit tables to this version's (an outbox without whole records)."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(audit_outbox)")}
    if "record" not in columns:
        db.execute("ALTER TABLE audit_outbox ADD COLUMN record TEXT")


GENESIS = "0" * 64
FILE_PATTERN = "audit-{:06d}.jsonl"
QUARANTINE = "quarantine"


def audit_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("audit-*.jsonl"))


def segment_number(path: Path) -> int:
    try:
        return int(path.stem.split("-")[1])
    except (IndexError, ValueError):
        return 0


def segment_path(folder: Path, number: int) -> Path:
    return folder / FILE_PATTERN.format(number)


def read_records(path: Path, start: int = 0) -> Iterator[tuple[int, dict[str, Any], bool]]:
    """(line number, record, complete) for each line from byte `start` on; a line that is not a JSON object
    reads as {}; the last line is incomplete when the file does not end with a newline (a write cut short)."""
    with open(path, "rb") as file:
        file.seek(start)
        for number, line in enumerate(file, 1):
            complete = line.endswith(b"\n")
            try:
                record = json.loads(line) if complete else {}
            except ValueError:
                record = {}
            yield number, record if isinstance(record, dict) else {}, complete


def last_record(path: Path) -> dict[str, Any] | None:
    """The segment's last complete record, read from its end."""
    with open(path, "rb") as file:
        size = file.seek(0, os.SEEK_END)
        chunk = 64 * 1024
        while True:
            start = max(0, size - chunk)
            file.seek(start)
            data = file.read(size - start)
            lines = data.split(b"\n")
            for line in reversed(lines[1:-1] if start else lines[:-1]):
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if isinstance(record, dict):
                        return record
            if start == 0:
                return None
            chunk *= 4


@dataclass(frozen=True)
class LogState:
    """What the database says about the log: its head, where it ends, a batch in flight, the cut."""

    seq: int = 0
    head: str = GENESIS
    end_file: str | None = None  # None: a log written before ends were recorded (or no log yet)
    end_size: int = 0
    pending_file: str | None = None
    pending_size: int = 0
    pending_seq: int = 0
    pending_hash: str = ""
    cut_seq: int = 0
    cut_hash: str = GENESIS


def read_state(db: sqlite3.Connection) -> LogState:
    head = _row(db, "SELECT seq, hash FROM audit_head WHERE id = 1")
    end = _row(
        db, "SELECT file, size, pending_file, pending_size, pending_seq, pending_hash FROM audit_end WHERE id = 1"
    )
    cut = _row(db, "SELECT seq, hash FROM audit_cut WHERE id = 1")
    seq, digest = head if head else (0, GENESIS)
    state = LogState(int(seq), str(digest))
    if end is not None and end[0] is not None:
        state = replace(state, end_file=str(end[0]), end_size=int(end[1]))
    if end is not None and end[2] is not None:
        state = replace(
            state, pending_file=str(end[2]), pending_size=int(end[3]), pending_seq=int(end[4]), pending_hash=str(end[5])
        )
    if cut is not None:
        state = replace(state, cut_seq=int(cut[0]), cut_hash=str(cut[1]))
    return state


def _row(db: sqlite3.Connection, query: str) -> tuple[Any, ...] | None:
    try:
        row: tuple[Any, ...] | None = db.execute(query).fetchone()
    except sqlite3.OperationalError:  # a database from before the table existed
        return None
    return row


def read_state_file(database: Path) -> LogState | None:
    """The state as a reader outside the server sees it (None: no database, or no audit tables in it)."""
    if not database.exists():
        return None
    db = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        if _row(db, "SELECT 1 FROM audit_head") is None and _row(db, "SELECT 1 FROM audit_end") is None:
            return None
        return read_state(db)
    finally:
        db.close()


def set_aside(folder: Path, segment: Path, start: int, why: str) -> dict[str, Any]:
    """Move the bytes of `segment` from `start` on into the quarantine folder, cut them from the segment,
    and return the record that says so (it joins the chain)."""
    quarantine = private_folder(folder / QUARANTINE)
    with open(segment, "rb") as file:
        file.seek(start)
        data = file.read()
    kept = quarantine / f"{segment.name}.{int(time.time() * 1000)}.{why.split()[0]}"
    descriptor = os.open(kept, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(descriptor, data)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    if start == 0:
        segment.unlink()
    else:
        os.truncate(segment, start)
    return {
        "time": iso(time.time()),
        "kind": "log_repair",
        "why": why,
        "file": segment.name,
        "offset": start,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "kept_as": f"{QUARANTINE}/{kept.name}",
    }


def iso(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when)) + f".{int(when * 1000) % 1000:03d}Z"
