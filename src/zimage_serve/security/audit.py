"""The audit log: an append-only, hash-chained record of every state-changing request, every generation
and every output read, as JSON Lines in segments under `<data-dir>/audit/` (security/audit_files.py).

Each record holds the SHA-256 of the one before it (`prev`) and its own (`hash`, over the record's
canonical JSON without it), and a sequence number. The newest sequence number and hash are also kept in
the queue database, with where the log ends, so an edit, a deletion, a reordering, a cut at the end and
lines added by anything but the server are all found. Generations are recorded from the queue file
itself: a trigger copies each job's end into an outbox table in the same transaction that records it,
and the writer moves those rows into the log, so no finished job goes unrecorded even if a process dies
in between.

The server never writes on its event loop: records go to one writer thread, which says in the database
where the batch will end, appends it in one write, then records the new head (and removes the outbox
rows it wrote) in one transaction. A request that changes state is answered only once its record is
written (`AuditLog.write`), or stored in the outbox with the job it queued, in the transaction that
stores the job (SQLite's queue: `NewJob.record`; the writer is woken, and appends such rows at most every
OUTBOX_EVERY_S). When the log cannot be written (a full disk), `write` raises at once and the server
answers 503 until a write succeeds again, and the records kept meanwhile are written then.

The log is bounded: segments rotate by size and by day, and the oldest are removed once the log is over
its size or past its age (`--audit-max-bytes`, `--audit-retention-days`); the database keeps the last
removed record, which the first kept one must follow, and a record in the chain says what went.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zimage_serve import sqlite_busy
from zimage_serve.errors import ZImageError
from zimage_serve.private import private_folder
from zimage_serve.security.audit_files import (
    GENESIS,
    OUTBOX_COLUMNS,
    LogState,
    audit_files,
    iso,
    last_record,
    read_records,
    read_state,
    segment_number,
    segment_path,
    set_aside,
)

log = logging.getLogger(__name__)

ROTATE_BYTES = 64 * 1024 * 1024
MAX_BYTES = 1024 * 1024 * 1024
KEPT_LIMIT = 10_000  # records held in memory while the log cannot be written; beyond, counted as lost
RETRY_S = (0.5, 1.0, 2.0, 5.0)
IDLE_RECORD_S = 0.05  # how soon an idle writer records the last batch's head (verify waits far longer)
IDLE_WAIT_S = 0.5  # how long an idle writer waits before it looks at the outbox anyway (job ends)
OUTBOX_EVERY_S = 0.02  # records stored with their jobs are appended at most this often (batched)
OUTCOMES = ("ok", "error", "refused", "blocked")
UNAVAILABLE = "the audit log cannot be written (is the disk full?): nothing was done; try again shortly"


class AuditUnavailable(ZImageError):
    """The record of a request could not be written: the request must be answered 503 (and undone)."""


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


def prompt_fields(texts: list[str], mode: str) -> dict[str, Any]:
    """A prompt's texts for a record: as they are, or (`--audit-prompts hash`) only their SHA-256."""
    if not texts:
        return {}
    joined = "\n".join(texts)
    if mode == "hash":
        return {"prompt_sha256": hashlib.sha256(joined.encode("utf-8", "surrogatepass")).hexdigest()}
    return {"prompt": joined}


def log_place(data_dir: Path, node: str | None = None) -> tuple[Path, Path]:
    """Where an audit log is: its folder, and the database that keeps its head (and outbox). One machine:
    `<data>/audit` and the queue file. A cluster's API node (`node`): `<data>/audit/<node>` and a file of
    its own there (each node writes its own chain)."""
    if node is None:
        return data_dir / "audit", data_dir / "queue.sqlite3"
    folder = data_dir / "audit" / node
    return folder, folder / "head.sqlite3"


@dataclass(frozen=True)
class Retention:
    """How big a segment grows, and how much of the log (bytes, days) is kept. 0 days: no age limit."""

    segment_bytes: int = ROTATE_BYTES
    max_bytes: int = MAX_BYTES
    days: float = 0


@dataclass
class _Pending:
    record: dict[str, Any]
    done: asyncio.Future[None] | None = None
    loop: asyncio.AbstractEventLoop | None = None


_WAKE = _Pending({})  # in the writer's queue: the outbox has new rows


@dataclass(frozen=True)
class _Written:
    """A batch in the log whose head the database does not hold yet (it is recorded with the next batch's
    intent, in one transaction, or when the writer is idle): where it ends, and what it took from the outbox."""

    seq: int
    head: str
    file: str
    size: int
    outbox_done: int | None


class AuditLog:
    """The server's writer: `write` (await it: answered once written) and `add` (no wait) from the event
    loop; a thread appends."""

    def __init__(
        self,
        folder: Path,
        queue_file: Path,
        retention: Retention | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.folder, self.retention, self.clock = folder, retention or Retention(), clock
        private_folder(folder)
        self._db = sqlite3.connect(str(queue_file), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA busy_timeout=10000")  # the tables: audit_files.AUDIT_TABLES
        # As the store's own connection: a commit survives a killed process without waiting for the disk
        # (only a power cut could lose the newest head, which `_recover` then finds again from the file).
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA wal_autocheckpoint=4000")  # rarely: the queue's own thread checkpoints the log
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._file: int | None = None
        self._path: Path | None = None
        self._size = 0
        self._day = ""
        self._kept: list[dict[str, Any]] = []  # records of failed writes, written first once the log is back
        self._lost = 0
        self._failing_since: float | None = None
        self.available = True  # False from a failed write until one succeeds: changing requests get 503
        self._stopping = False
        self._unrecorded: _Written | None = None
        self._outbox_taken = 0  # outbox rows up to this id are in the log (their removal may be unrecorded)
        self._last_batch = 0.0  # when the last batch was written (monotonic)
        self._woken = False  # a wake-up is in the writer's queue, not taken yet
        self.seq, self.head = self._recover()
        self._db.execute("PRAGMA busy_timeout=0")  # set up: from now on waits for locks are `_sql`'s

    # -- from the event loop -------------------------------------------------------------------------
    def add(self, record: dict[str, Any]) -> None:
        self._queue.put(_Pending(record))

    def wake(self) -> None:
        """Rows were added to the outbox (a request's record, stored with the job it queued): write them soon.
        Once per batch: a wake-up the writer has not taken yet covers every row committed before it looks."""
        if not self._woken:
            self._woken = True
            self._queue.put(_WAKE)

    async def write(self, record: dict[str, Any]) -> None:
        """Answered once the record is in the log; raises `AuditUnavailable` at once if it cannot be."""
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
        failures = 0
        while True:
            wait = IDLE_WAIT_S if self.available else RETRY_S[min(failures, len(RETRY_S) - 1)]
            if self._unrecorded is not None and self.available:
                wait = IDLE_RECORD_S  # a batch's head waits for the next batch's commit only this long
            batch, woken = self._take(wait)
            if woken:
                self._woken = False  # before the outbox is read: a row committed after this wakes it again
            try:
                self._write(batch)
                self._last_batch = time.monotonic()
                if not (batch or woken) or self._stopping:  # idle, or the last batch: the database gets its head now
                    self._record_written()
            except Exception as exc:  # a full disk, or anything else: the writer thread must live on
                failures += 1
                self._failed(batch, exc)
                if self._stopping:
                    log.error("audit log: stopping with %d records that could not be written", len(self._kept))
                    return
                continue
            if failures:
                log.warning("audit log: writable again after %.0f s", self.clock() - (self._failing_since or 0))
                failures, self._failing_since, self.available = 0, None, True
            if self._stopping and self._queue.empty():
                return

    def _take(self, wait: float) -> tuple[list[_Pending], bool]:
        """The records to write next, and whether the outbox has new rows (a wake). Generations wait for
        the next record or wake, or `wait` at most. A wake alone, within OUTBOX_EVERY_S of the last batch,
        lingers until then (a record someone awaits cuts that short): a stream of jobs costs one append and
        one transaction per interval, not one each."""
        taken: list[_Pending | None] = []
        try:
            taken.append(self._queue.get(timeout=wait))
            while True:
                taken.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        records = [p for p in taken if p is not None and p is not _WAKE]
        woken = _WAKE in taken
        if records or not woken or self._stopping:
            return records, woken
        while (linger := self._last_batch + OUTBOX_EVERY_S - time.monotonic()) > 0:
            try:
                item = self._queue.get(timeout=linger)
            except queue.Empty:
                break
            if item is None:  # stopping: write what there is now
                break
            if item is not _WAKE:
                records.append(item)
                if item.done is not None:
                    break
        return records, woken

    def _failed(self, batch: list[_Pending], exc: BaseException) -> None:
        """A write failed: the requests waiting on it are answered 503 at once (their records now say so),
        and every record is kept for the next try."""
        if self.available:
            log.warning(
                "audit log: cannot write (%s); changing requests are refused with 503 until it can",
                exc,
                exc_info=not isinstance(exc, OSError | sqlite3.Error),  # the trace only where it is not the disk
            )
            self._failing_since = self.clock()
        self.available = False
        for pending in batch:
            record = pending.record
            if pending.done is not None and pending.loop is not None:
                record.update(status=503, outcome="error", error=UNAVAILABLE)
                with contextlib.suppress(RuntimeError):  # the loop closed while shutting down
                    pending.loop.call_soon_threadsafe(_fail, pending.done)
            self._keep(record)

    def _keep(self, record: dict[str, Any]) -> None:
        if len(self._kept) < KEPT_LIMIT:
            self._kept.append(record)
        else:
            self._lost += 1

    def _write(self, batch: list[_Pending]) -> None:
        outbox = self._sql(
            f"SELECT {OUTBOX_COLUMNS} FROM audit_outbox WHERE id > ? ORDER BY id LIMIT 1000", (self._outbox_taken,)
        ).fetchall()
        records = list(self._kept)
        if self._lost:
            gap = {"time": iso(self.clock()), "kind": "log_gap", "lost": self._lost, "why": UNAVAILABLE}
            records.append(gap)
        # The outbox first: its rows were committed before the batch's records could follow from them (a
        # request that cancels a job queued a moment ago comes after the request that queued it). A record
        # that is awaited is answered only once written, so nothing in the outbox follows from one of these.
        records += [outbox_record(row) for row in outbox] + [p.record for p in batch]
        if not records:
            return
        self._append_records(records, outbox[-1][0] if outbox else None)  # raises: nothing of it is in the log
        self._kept, self._lost = [], 0
        for pending in batch:
            if pending.done is not None and pending.loop is not None:
                with contextlib.suppress(RuntimeError):  # the loop closed while shutting down
                    pending.loop.call_soon_threadsafe(_resolve, pending.done)

    def _append_records(self, records: list[dict[str, Any]], outbox_done: int | None) -> None:
        lines, seq, head = [], self.seq, self.head
        for record in records:
            seq += 1
            line, head = chained(record, seq, head)
            lines.append(line)
        data = b"".join(lines)
        rotated = self._choose_segment()
        assert self._path is not None and self._file is not None
        start = self._size
        if os.fstat(self._file).st_size != start:  # the end of a failed write that could not be cut then
            os.ftruncate(self._file, start)
        written = _Written(seq, head, self._path.name, start + len(data), outbox_done)
        # One transaction per batch: the previous batch's head, and where this one will end (said before it
        # is written, so that recovery can tell a batch the server wrote from lines added by anything else).
        self._record(self._unrecorded, written)
        self._unrecorded = None
        try:
            self._write_bytes(data)
        except BaseException:
            # A torn line, or lines the head does not name, would break the chain for good: cut them now.
            with contextlib.suppress(OSError):
                os.ftruncate(self._file, start)
            raise
        self._unrecorded = written
        if outbox_done is not None:
            self._outbox_taken = outbox_done
        self._size = start + len(data)
        self.seq, self.head = seq, head
        if rotated:
            try:  # the batch is written and recorded: a failure here must not undo that
                self._apply_retention()
            except (OSError, sqlite3.Error) as exc:
                log.error("audit log: old segments could not be removed: %s", exc)

    def _write_bytes(self, data: bytes) -> None:
        assert self._file is not None
        view = memoryview(data)
        while view:
            written = os.write(self._file, view)
            view = view[written:]

    # -- segments ------------------------------------------------------------------------------------
    def _today(self) -> str:
        return _day_of(self.clock())

    def _choose_segment(self) -> bool:
        """Open the segment to append to; True if a new one was started (by size or by a new day)."""
        if self._file is not None and self._size < self.retention.segment_bytes and self._day == self._today():
            return False
        files = audit_files(self.folder)
        number = segment_number(files[-1]) if files else 1
        path = segment_path(self.folder, number)
        found = path.stat() if self._file is None and path.exists() else None
        if self._file is not None or (
            found is not None
            and (found.st_size >= self.retention.segment_bytes or _day_of(found.st_mtime) != self._today())
        ):
            path = segment_path(self.folder, number + 1)
        if self._file is not None:
            os.close(self._file)
            self._file = None
        self._file = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._path, self._size, self._day = path, os.fstat(self._file).st_size, self._today()
        return self._size == 0

    def _apply_retention(self) -> None:
        """Remove the oldest segments while the log is over its size or past its age (never the one being
        written), after recording the last removed record; then say in the chain what went."""
        files = [p for p in audit_files(self.folder) if p != self._path]
        total = sum(p.stat().st_size for p in files) + self._size
        cutoff = self.clock() - self.retention.days * 86400 if self.retention.days else None
        removed: list[str] = []
        reasons: set[str] = set()
        for path in files:
            too_old = cutoff is not None and path.stat().st_mtime < cutoff
            if total <= self.retention.max_bytes and not too_old:
                break
            last = last_record(path)
            if last is None or not isinstance(last.get("seq"), int):
                break  # not a segment of this chain's making: verify will say so; never delete it
            self._sql(
                "INSERT INTO audit_cut (id, seq, hash) VALUES (1, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
                (int(last["seq"]), str(last.get("hash", ""))),
            )
            total -= path.stat().st_size
            path.unlink()
            removed.append(path.name)
            reasons.add("age" if too_old else "size")
        if removed:
            self.add(
                {
                    "time": iso(self.clock()),
                    "kind": "retention",
                    "removed": removed,
                    "why": sorted(reasons),
                    "max_bytes": self.retention.max_bytes,
                    "days": self.retention.days,
                }
            )

    # -- the database --------------------------------------------------------------------------------
    def _sql(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Cursor:
        """A statement on the queue file, waiting in short steps for the queue's and the worker's writes
        (sqlite_busy): SQLite's own waits would hold a request's answer for milliseconds."""
        return sqlite_busy.execute(self._db, sql, args)

    def _record_written(self) -> None:
        if self._unrecorded is not None:
            self._record(self._unrecorded, None)
            self._unrecorded = None

    def _record_head(self, seq: int, head: str, outbox_done: int | None, file: str, size: int) -> None:
        self._record(_Written(seq, head, file, size, outbox_done), None)

    def _record(self, written: _Written | None, intended: _Written | None) -> None:
        """In one transaction: a written batch's head (the newest record's number and hash, where the log
        ends, its outbox rows removed: they are in the log now), and where the next batch will end."""
        if written is None and intended is None:
            return
        self._sql("BEGIN IMMEDIATE")
        try:
            if written is not None:
                self._sql(
                    "INSERT INTO audit_head (id, seq, hash) VALUES (1, ?, ?) "
                    "ON CONFLICT(id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
                    (written.seq, written.head),
                )
                self._sql(
                    "INSERT INTO audit_end (id, file, size) VALUES (1, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                    "file = excluded.file, size = excluded.size, pending_file = NULL, pending_size = NULL, "
                    "pending_seq = NULL, pending_hash = NULL",
                    (written.file, written.size),
                )
                if written.outbox_done is not None:
                    self._sql("DELETE FROM audit_outbox WHERE id <= ?", (written.outbox_done,))
            if intended is not None:
                self._sql(
                    "INSERT INTO audit_end (id, file, size, pending_file, pending_size, pending_seq, pending_hash) "
                    "VALUES (1, NULL, 0, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                    "pending_file = excluded.pending_file, pending_size = excluded.pending_size, "
                    "pending_seq = excluded.pending_seq, pending_hash = excluded.pending_hash",
                    (intended.file, intended.size, intended.seq, intended.head),
                )
            self._sql("COMMIT")
        except BaseException:
            self._sql("ROLLBACK")
            raise

    # -- at start ------------------------------------------------------------------------------------
    def _recover(self) -> tuple[int, str]:
        """The head to chain from. A batch a crash left written but not recorded is adopted (and its outbox
        rows removed, so no generation is written twice); bytes the server did not write (a write cut short
        by a crash or a full disk, lines added while it was stopped) are set aside, with a record each."""
        state = read_state(self._db)
        files = audit_files(self.folder)
        if state.end_file is None:  # a log from before ends were recorded: trust what chains from the head
            return self._adopt_legacy(state, files)
        seq, head = state.seq, state.head
        repairs: list[dict[str, Any]] = []
        end_number = segment_number(Path(state.end_file))
        for path in files:
            if segment_number(path) > end_number and path.name != state.pending_file:
                repairs += _set_aside(self.folder, path, 0, "appended while the server was stopped")
        beyond = [(state.end_file, state.end_size)]
        if state.pending_file is not None and state.pending_file != state.end_file:
            beyond.append((state.pending_file, 0))  # a batch that began a new segment
        for name, start in beyond:
            path = self.folder / name
            size = path.stat().st_size if path.exists() else 0
            if name == state.end_file and size < start:
                log.error("audit log: %s is %d bytes shorter than recorded: records were cut", name, start - size)
            if size <= start:
                continue
            pending = state.pending_file == name
            batch = [record for _, record, _ in read_records(path, start)]
            if pending and size == state.pending_size and _chains(batch, seq, head, state.pending_hash):
                log.warning("audit log: %d records written after the last recorded head (a crash)", len(batch))
                seq, head = state.pending_seq, state.pending_hash
                outbox = [r["outbox"] for r in batch if isinstance(r.get("outbox"), int)]
                self._record_head(seq, head, max(outbox) if outbox else None, name, size)
                continue
            cut_short = pending and size < state.pending_size
            why = "a write cut short (a crash or a full disk)" if cut_short else "appended while the server was stopped"
            repairs += _set_aside(self.folder, path, start, why)
        for repair in repairs:
            log.error(
                "audit log: %s: %d bytes of %s set aside as %s",
                repair["why"],
                repair["bytes"],
                repair["file"],
                repair["kept_as"],
            )
            self.add(repair)
        return seq, head

    def _adopt_legacy(self, state: LogState, files: list[Path]) -> tuple[int, str]:
        seq, head = state.seq, state.head
        later = _tail(files, seq)
        good = 0
        for record in later:
            if record.get("seq") != seq + good + 1 or record.get("prev") != (later[good - 1]["hash"] if good else head):
                break
            good += 1
        if good:
            log.warning("audit log: %d records written after the last recorded head (a crash); recorded now", good)
            seq, head = int(later[good - 1]["seq"]), str(later[good - 1]["hash"])
        if files:
            outbox = [r["outbox"] for r in later[:good] if isinstance(r.get("outbox"), int)]
            self._record_head(seq, head, max(outbox) if outbox else None, files[-1].name, files[-1].stat().st_size)
        return seq, head


def _set_aside(folder: Path, segment: Path, start: int, why: str) -> list[dict[str, Any]]:
    """`set_aside`, or, where that fails (a full disk at start), the bytes left in place to be reported by
    `zimage audit verify`: the server starts all the same."""
    try:
        return [set_aside(folder, segment, start, why)]
    except OSError as exc:
        log.error(
            "audit log: %s in %s could not be set aside (%s); `zimage audit verify` reports it", why, segment.name, exc
        )
        return []


def _chains(batch: list[dict[str, Any]], seq: int, head: str, ends_at: str) -> bool:
    """Whether `batch` follows record `seq` (hash `head`) link by link and ends at hash `ends_at`."""
    for record in batch:
        claimed = record.get("hash")
        body = {k: v for k, v in record.items() if k != "hash"}
        if record.get("seq") != seq + 1 or record.get("prev") != head:
            return False
        if hashlib.sha256(canonical(body)).hexdigest() != claimed:
            return False
        seq, head = seq + 1, str(claimed)
    return bool(batch) and head == ends_at


def _day_of(when: float) -> str:
    return datetime.datetime.fromtimestamp(when, datetime.UTC).strftime("%Y-%m-%d")


def _resolve(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)


def _fail(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_exception(AuditUnavailable(UNAVAILABLE))


def _tail(files: list[Path], after: int) -> list[dict[str, Any]]:
    """Records with a sequence number above `after`, from the newest file back as far as needed."""
    start = 0
    for index in range(len(files) - 1, -1, -1):
        first = next(read_records(files[index]), None)
        if first is not None and isinstance(first[1].get("seq"), int) and first[1]["seq"] <= after + 1:
            start = index
            break
    return [
        record
        for path in files[start:]
        for _, record, _ in read_records(path)
        if isinstance(record.get("seq"), int) and record["seq"] > after
    ]


def outbox_record(row: tuple[Any, ...]) -> dict[str, Any]:
    """The record an outbox row holds (OUTBOX_COLUMNS): a request's, whole, or a job's end. Each names its
    row (`outbox`), so that a crash right after a batch's append is recovered without writing it twice."""
    if row[-1] is not None:
        try:
            record: dict[str, Any] = json.loads(row[-1])
        except ValueError:
            record = {"time": iso(time.time()), "kind": "request", "job_id": row[1], "unreadable": True}
        record["outbox"] = row[0]
        return record
    return generation_record(row[:-1])


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


__all__ = ["GENESIS", "AuditLog", "AuditUnavailable", "Retention", "iso", "log_place", "prompt_fields"]
