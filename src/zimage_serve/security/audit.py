"""The audit log: an append-only, hash-chained record of every state-changing request, every generation
and every output read, as JSON Lines under `<data-dir>/audit/`, rotated by size.

Each record holds the SHA-256 of the one before it (`prev`) and its own (`hash`, over the record's
canonical JSON without it), and a sequence number. The newest sequence number and hash are also kept in
the queue database, so an edit, a deletion, a reordering and a cut at the end are all found by
`verify`. Generations are recorded from the queue file itself: a trigger copies each job's end into an
outbox table in the same transaction that records it, and the writer moves those rows into the log, so
no finished job goes unrecorded even if a process dies in between.

The server never writes on its event loop: records go to one writer thread, which appends a batch in one
write and then records the new head (and removes the outbox rows it wrote) in one transaction. A
request that changes state is answered only once its record is written (`AuditLog.write`).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zimage_serve.private import private_folder

log = logging.getLogger(__name__)

GENESIS = "0" * 64
ROTATE_BYTES = 64 * 1024 * 1024
FILE_PATTERN = "audit-{:06d}.jsonl"
CSV_COLUMNS = (
    "seq",
    "time",
    "kind",
    "user",
    "address",
    "method",
    "route",
    "status",
    "outcome",
    "job_id",
    "duration_ms",
    "prompt",
    "prompt_sha256",
    "parameters",
    "files",
    "rule",
    "hash",
)
OUTCOMES = ("ok", "error", "refused", "blocked")


def canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def chained(record: dict[str, Any], seq: int, prev: str) -> tuple[bytes, str]:
    """The line to write for `record` (its `seq`, `prev` and `hash` set) and its hash. The line is the
    canonical JSON the hash is taken over, with the hash added as a last key: one encoding per record."""
    record["seq"], record["prev"] = seq, prev
    record.pop("hash", None)
    text = canonical(record)
    digest = hashlib.sha256(text).hexdigest()
    record["hash"] = digest
    return text[:-1] + b',"hash":"' + digest.encode() + b'"}\n', digest


def iso(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when)) + f".{int(when * 1000) % 1000:03d}Z"


def prompt_fields(texts: list[str], mode: str) -> dict[str, Any]:
    """A prompt's texts for a record: as they are, or (`--audit-prompts hash`) only their SHA-256."""
    if not texts:
        return {}
    joined = "\n".join(texts)
    if mode == "hash":
        return {"prompt_sha256": hashlib.sha256(joined.encode("utf-8", "surrogatepass")).hexdigest()}
    return {"prompt": joined}


def audit_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("audit-*.jsonl"))


def log_place(data_dir: Path, node: str | None = None) -> tuple[Path, Path]:
    """Where an audit log is: its folder, and the database that keeps its head (and outbox). One machine:
    `<data>/audit` and the queue file. A cluster's API node (`node`): `<data>/audit/<node>` and a file of
    its own there (each node writes its own chain)."""
    if node is None:
        return data_dir / "audit", data_dir / "queue.sqlite3"
    folder = data_dir / "audit" / node
    return folder, folder / "head.sqlite3"


@dataclass
class _Pending:
    record: dict[str, Any]
    done: asyncio.Future[None] | None = None
    loop: asyncio.AbstractEventLoop | None = None


class AuditLog:
    """The server's writer: `write` (await it: answered once written) and `add` (no wait) from the event
    loop; a thread appends."""

    def __init__(self, folder: Path, queue_file: Path, rotate_bytes: int = ROTATE_BYTES) -> None:
        self.folder, self.rotate_bytes = folder, rotate_bytes
        private_folder(folder)
        self._db = sqlite3.connect(str(queue_file), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA busy_timeout=10000")  # the tables are the store's (queue/store.py)
        # As the store's own connection: a commit survives a killed process without waiting for the disk
        # (only a power cut could lose the newest head, which `_recover` then finds again from the file).
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._file: int | None = None
        self._path: Path | None = None
        self._size = 0
        self.seq, self.head = self._recover()
        self._stopping = False

    # -- from the event loop -------------------------------------------------------------------------
    def add(self, record: dict[str, Any]) -> None:
        self._queue.put(_Pending(record))

    async def write(self, record: dict[str, Any]) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._queue.put(_Pending(record, done, loop))
        await done

    # -- the writer ----------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="zimage-audit", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stopping = True
            self._queue.put(None)
            self._thread.join(10)
            self._thread = None
        if self._file is not None:
            os.close(self._file)
            self._file = None
        with contextlib.suppress(sqlite3.Error):
            self._db.close()

    def _run(self) -> None:
        while True:
            batch: list[_Pending] = []
            try:  # generations wait for the next request's record, or half a second at most
                first = self._queue.get(timeout=0.5)
                if first is not None:
                    batch.append(first)
                while True:
                    more = self._queue.get_nowait()
                    if more is not None:
                        batch.append(more)
            except queue.Empty:
                pass
            try:
                self._write(batch)
            except Exception:  # the log must never stop the server; the records are retried next turn
                log.exception("could not write the audit log")
                for pending in batch:
                    self._queue.put(pending)
                time.sleep(0.5)
                continue
            if self._stopping and self._queue.empty():
                return

    def _write(self, batch: list[_Pending]) -> None:
        outbox = self._db.execute("SELECT * FROM audit_outbox ORDER BY id LIMIT 1000").fetchall()
        if not batch and not outbox:
            return
        records = [p.record for p in batch] + [generation_record(row) for row in outbox]
        lines, seq, head = [], self.seq, self.head
        for record in records:
            seq += 1
            line, head = chained(record, seq, head)
            lines.append(line)
        self._append(b"".join(lines))
        self._record_head(seq, head, outbox[-1][0] if outbox else None)
        self.seq, self.head = seq, head
        for pending in batch:
            if pending.done is not None and pending.loop is not None:
                with contextlib.suppress(RuntimeError):  # the loop closed while shutting down
                    pending.loop.call_soon_threadsafe(_resolve, pending.done)

    def _append(self, data: bytes) -> None:
        if self._file is None or self._size >= self.rotate_bytes:
            self._open_next()
        assert self._file is not None
        view = memoryview(data)
        while view:
            written = os.write(self._file, view)
            view = view[written:]
        self._size += len(data)

    def _open_next(self) -> None:
        if self._file is not None:
            os.close(self._file)
        files = audit_files(self.folder)
        number = int(files[-1].stem.split("-")[1]) if files else 1
        path = self.folder / FILE_PATTERN.format(number)
        if path.exists() and path.stat().st_size >= self.rotate_bytes:
            path = self.folder / FILE_PATTERN.format(number + 1)
        self._file = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._path, self._size = path, os.fstat(self._file).st_size

    def _recover(self) -> tuple[int, str]:
        """The head to chain from: the database's, moved on past records a crash left written but not yet
        recorded there (and their outbox rows removed, so no generation is written twice)."""
        row = self._db.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
        seq, head = (int(row[0]), str(row[1])) if row else (0, GENESIS)
        later: list[dict[str, Any]] = []
        for record in _tail(self.folder, seq):
            if record.get("seq") != seq + len(later) + 1 or record.get("prev") != (
                later[-1]["hash"] if later else head
            ):
                break
            later.append(record)
        if not later:
            return seq, head
        log.warning("audit log: %d records written after the last recorded head (a crash); recorded now", len(later))
        seq, head = int(later[-1]["seq"]), str(later[-1]["hash"])
        outbox = [r["outbox"] for r in later if isinstance(r.get("outbox"), int)]
        self._record_head(seq, head, max(outbox) if outbox else None)
        return seq, head

    def _record_head(self, seq: int, head: str, outbox_done: int | None) -> None:
        """In one transaction: the newest record's number and hash, and the outbox rows up to `outbox_done`
        removed (they are in the log now)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute(
                "INSERT INTO audit_head (id, seq, hash) VALUES (1, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
                (seq, head),
            )
            if outbox_done is not None:
                self._db.execute("DELETE FROM audit_outbox WHERE id <= ?", (outbox_done,))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise


def _resolve(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)


def _tail(folder: Path, after: int) -> Iterator[dict[str, Any]]:
    """Records with a sequence number above `after`, from the newest file back as far as needed."""
    files = audit_files(folder)
    start = 0
    for index in range(len(files) - 1, -1, -1):
        first = next(_read(files[index]), None)
        if first is not None and isinstance(first[1].get("seq"), int) and first[1]["seq"] <= after + 1:
            start = index
            break
    for path in files[start:]:
        for _, record in _read(path):
            if isinstance(record.get("seq"), int) and record["seq"] > after:
                yield record


def _read(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(path, "rb") as file:
        for number, line in enumerate(file, 1):
            try:
                record = json.loads(line)
            except ValueError:
                record = {}
            yield number, record if isinstance(record, dict) else {}


def generation_record(row: tuple[Any, ...]) -> dict[str, Any]:
    """A job's end, from its outbox row: who queued it, the outcome, how long it ran, the files it made."""
    outbox_id, job_id, owner, context, state, created, started, finished, result = row
    try:
        context_value = json.loads(context) if context else {}
        result_value = json.loads(result) if result else {}
    except ValueError:
        context_value, result_value = {}, {}
    files = [
        "/".join(p for p in (item.get("type", "output"), item.get("subfolder", ""), item.get("filename", "")) if p)
        for ui in (result_value.get("outputs") or {}).values()
        if isinstance(ui, dict)
        for key in ("images", "gifs", "audio")
        for item in ui.get(key, [])
        if isinstance(item, dict)
    ]
    outcome = {"success": "ok", "error": "error", "interrupted": "error"}.get(state, "error")
    record: dict[str, Any] = {
        "time": iso(finished or time.time()),
        "kind": "generation",
        "user": owner,
        "address": context_value.get("address", "") if isinstance(context_value, dict) else "",
        "route": "worker",
        "job_id": job_id,
        "outcome": outcome,
        "state": state,
        "duration_ms": round(((finished or 0) - (started or finished or 0)) * 1000, 3),
        "queued_ms": round(((started or 0) - (created or started or 0)) * 1000, 3) if started else None,
        "files": files,
        "outbox": outbox_id,
    }
    errors = [d for e, d in result_value.get("messages", []) if e == "execution_error" and isinstance(d, dict)]
    if errors:
        record["error"] = str(errors[0].get("exception_message", ""))[:500]
    return record


# -- reading the log (zimage audit) --------------------------------------------------------------------
@dataclass
class Problem:
    file: str
    line: int
    seq: int | None
    why: str

    def __str__(self) -> str:
        at = f"record {self.seq}" if self.seq is not None else "a record"
        return f"{self.file}:{self.line}: {at}: {self.why}"


def verify(folder: Path, queue_file: Path) -> tuple[int, Problem | None]:
    """Walk the whole chain; (records checked, the first problem or None)."""
    expected_seq, prev, checked = 1, GENESIS, 0
    last: tuple[str, int] = ("", 0)
    for path in audit_files(folder):
        for number, record in _read(path):
            last = (path.name, number)
            seq = record.get("seq")
            claimed = record.pop("hash", None)
            if not record or not isinstance(seq, int):
                return checked, Problem(path.name, number, None, "not a record (the line was edited or damaged)")
            if seq != expected_seq:
                why = (
                    f"expected record {expected_seq}: records are missing before it"
                    if seq > expected_seq
                    else f"expected record {expected_seq}: records are out of order or repeated"
                )
                return checked, Problem(path.name, number, seq, why)
            if record.get("prev") != prev:
                return checked, Problem(path.name, number, seq, "does not follow the record before it (prev hash)")
            if hashlib.sha256(canonical(record)).hexdigest() != claimed:
                return checked, Problem(path.name, number, seq, "its content was changed (hash mismatch)")
            prev, expected_seq, checked = str(claimed), expected_seq + 1, checked + 1
    head = _head(queue_file)
    if head is not None:
        head_seq, head_hash = head
        if checked < head_seq:
            return checked, Problem(
                last[0] or "(no file)",
                last[1],
                head_seq,
                f"the log ends at record {checked}, but {head_seq} were written: records were cut from the end",
            )
        if checked > head_seq or prev != head_hash:
            return checked, Problem(
                last[0], last[1], checked, f"the log does not end at the recorded head (record {head_seq})"
            )
    elif checked:
        return checked, Problem(last[0], last[1], None, "the queue database records no head for this log")
    return checked, None


def _head(queue_file: Path) -> tuple[int, str] | None:
    if not queue_file.exists():
        return None
    db = sqlite3.connect(f"file:{queue_file}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
    except sqlite3.OperationalError:
        row = None
    finally:
        db.close()
    return (int(row[0]), str(row[1])) if row else None


def records(folder: Path, user: str | None = None, since: float | None = None) -> Iterator[dict[str, Any]]:
    since_text = iso(since) if since is not None else None
    for path in audit_files(folder):
        for _, record in _read(path):
            if not record:
                continue
            if user is not None and record.get("user") != user:
                continue
            if since_text is not None and str(record.get("time", "")) < since_text:
                continue
            yield record


def export(out: io.TextIOBase | Any, found: Iterable[dict[str, Any]], form: str) -> int:
    count = 0
    if form == "jsonl":
        for record in found:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
        return count
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    for record in found:
        row = []
        for column in CSV_COLUMNS:
            value = record.get(column)
            row.append(json.dumps(value, ensure_ascii=False) if isinstance(value, dict | list) else value)
        writer.writerow(row)
        count += 1
    return count
