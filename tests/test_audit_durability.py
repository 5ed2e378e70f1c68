"""The audit log when things go wrong: a full disk (a job's record kept with it in the queue file, or 503 at
once with no job left behind; the chain intact once space is back), a write cut short, lines added while
the server was stopped, `verify` during traffic, and retention by size and by age with a chain that still
verifies."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import sqlite3
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.support.app import AppServer, serving
from tests.support.cli import run
from tests.support.jobs import history, running_ids, running_job, small_job, submit, wait_until
from tests.support.tokens import make_tokens
from zimage_serve.queue.jobs import Job, NewJob
from zimage_serve.queue.sqlite_queue import SQLiteQueue
from zimage_serve.security import audit
from zimage_serve.security.audit import AuditLog, Retention, chained
from zimage_serve.security.audit_files import QUARANTINE, audit_files
from zimage_serve.security.audit_verify import records, verify


def disk_full(log: AuditLog) -> Any:
    """What the disk does when it fills mid-write: part of the data lands, then ENOSPC."""

    def write(data: bytes) -> None:
        assert log._file is not None
        os.write(log._file, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    return write


def fill_the_disk_while_a_job_runs(
    served: AppServer, token: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[AppServer, str, AuditLog, Any]:
    """A user's job running, then the disk full under the audit log: (the server as the user, the running
    job, the log, its own write to put back once there is space)."""
    server = served.as_token(token)
    blocker = submit(server, running_job("blocker"))
    wait_until(lambda: running_ids(server) == [blocker])
    log = served.runtime.security.audit
    writes = log._write_bytes
    monkeypatch.setattr(log, "_write_bytes", disk_full(log))
    return server, blocker, log, writes


def new_log(folder: Path, **retention: Any) -> tuple[AuditLog, Path]:
    queue_file = folder / "queue.sqlite3"
    SQLiteQueue(queue_file).close()  # the store owns the queue file's tables, the audit log's among them
    return AuditLog(folder / "audit", queue_file, Retention(**retention)), queue_file


def written_log(folder: Path, count: int) -> tuple[AuditLog, Path, Path]:
    """A log of `count` records in one segment, its writer stopped: (the log, the queue file, the segment)."""
    log, queue_file = new_log(folder)
    log.start()
    write_all(log, count)
    log.stop()
    [segment] = audit_files(folder / "audit")
    return log, queue_file, segment


def write_all(log: AuditLog, count: int, start: int = 0) -> None:
    async def main() -> None:
        for n in range(start, start + count):
            await log.write({"kind": "request", "user": "u", "route": "/prompt", "n": n, "pad": "x" * 100})

    asyncio.run(main())


def test_a_full_disk_answers_503_at_once_leaves_no_job_and_the_chain_continues(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the queue keeps no audit records (a cluster's Redis), a request's record is written before its
    answer: a full disk makes that write fail, and the job it queued is undone."""
    data = tmp_path / "data"
    tokens = make_tokens(data)
    with serving(data, auth="on") as served:
        monkeypatch.setattr(served.runtime.service.store, "keeps_records", False)
        server, blocker, log, writes = fill_the_disk_while_a_job_runs(served, tokens["user"], monkeypatch)

        status, body = server.json("POST", "/prompt", {"prompt": small_job("refused")})
        assert status == 503 and body["error"]["type"] == "audit_unavailable", body
        queue = server.json("GET", "/queue")[1]
        assert queue["queue_pending"] == [] and [item[1] for item in queue["queue_running"]] == [blocker]

        # Until a write succeeds, a request that would change something is refused before it does anything.
        status, body = server.json("POST", "/interrupt", {})
        assert status == 503 and body["error"]["type"] == "audit_unavailable"
        assert running_ids(server) == [blocker]
        assert server.json("GET", "/queue")[0] == 200  # reads go on

        monkeypatch.setattr(log, "_write_bytes", writes)  # space is back
        wait_until(lambda: log.available)
        later = submit(server, small_job("later"))
        assert server.json("POST", "/interrupt", {})[0] == 200
        wait_until(lambda: later in history(server))
    assert verify(data / "audit", data / "queue.sqlite3")[1] is None
    found = [r for r in records(data / "audit") if r.get("status") == 503]
    assert [(r["route"], r["user"]) for r in found] == [("/prompt", "alice"), ("/interrupt", "alice")], found
    assert found[0]["error"].startswith("the audit log cannot be written")  # it was answered 503, undone
    assert found[1]["reason"] == "audit_unavailable"  # refused before it did anything
    assert all(line.endswith(b"\n") for f in audit_files(data / "audit") for line in f.read_bytes().splitlines(True))


def test_a_job_queued_as_the_disk_fills_keeps_its_record_with_it_until_the_log_takes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SQLite queue stores a request's record with its job, in one transaction: the answer waits for no
    writer, and a log that cannot be written loses nothing. Its append fails, requests that would change
    something are refused from then on, and the record is in the log once there is space again."""
    data = tmp_path / "data"
    tokens = make_tokens(data)
    with serving(data, auth="on") as served:
        server, blocker, log, writes = fill_the_disk_while_a_job_runs(served, tokens["user"], monkeypatch)

        kept = submit(server, small_job("kept"))  # queued, its record beside it in the queue file
        wait_until(lambda: not log.available)
        status, body = server.json("POST", "/prompt", {"prompt": small_job("refused")})
        assert status == 503 and body["error"]["type"] == "audit_unavailable", body
        queue = server.json("GET", "/queue")[1]
        assert [item[1] for item in queue["queue_running"] + queue["queue_pending"]] == [blocker, kept]

        monkeypatch.setattr(log, "_write_bytes", writes)  # space is back
        wait_until(lambda: log.available)
        assert server.json("POST", "/interrupt", {})[0] == 200
        wait_until(lambda: kept in history(server))
    assert verify(data / "audit", data / "queue.sqlite3")[1] is None
    found = list(records(data / "audit"))
    queued = [r for r in found if r.get("route") == "/prompt" and r.get("status") == 200]
    assert [r["job_id"] for r in queued] == [blocker, kept]  # each once, in the order they were queued
    assert queued[1]["user"] == "alice" and queued[1]["outcome"] == "ok" and "prompt" in queued[1]
    refused = [r for r in found if r.get("status") == 503]
    assert [(r["route"], r["reason"]) for r in refused] == [("/prompt", "audit_unavailable")]
    generations = [r["job_id"] for r in found if r["kind"] == "generation"]
    assert sorted(generations) == sorted([blocker, kept])


def test_records_stored_with_their_jobs_are_appended_once_each_soon_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each wake-up is taken (none is swallowed by the batching): with the writer's idle waits made an hour,
    every record stored with a job still reaches the log, once, in the order the jobs were stored."""
    monkeypatch.setattr(audit, "IDLE_WAIT_S", 3600.0)
    monkeypatch.setattr(audit, "IDLE_RECORD_S", 3600.0)  # nor does it look again to record a batch's head
    log, queue_file = new_log(tmp_path)
    store = SQLiteQueue(queue_file)
    log.start()
    try:
        for n in range(12):
            job = Job(f"job-{n}", n, {}, {}, [], owner="alice")
            text = json.dumps({"kind": "request", "user": "alice", "route": "/prompt", "job_id": job.id})
            [stored] = store.enqueue_many([replace(NewJob.of(job), record=text)])
            assert isinstance(stored, Job)
            log.wake()
            if n % 4 == 3:  # some at once, some after the writer caught up
                wait_until(lambda n=n: sum(1 for _ in records(tmp_path / "audit")) == n + 1, 10)
    finally:
        log.stop()
        store.close()
    assert [r["job_id"] for r in records(tmp_path / "audit")] == [f"job-{n}" for n in range(12)]
    assert verify(tmp_path / "audit", queue_file)[1] is None


def test_an_outbox_row_comes_before_a_record_of_the_same_batch_that_follows_from_it(tmp_path: Path) -> None:
    """A job's record waits in the outbox while a request that deletes the job (a moment later) is handed to
    the writer: the chain names the job queued first, then deleted."""
    log, queue_file = new_log(tmp_path)
    store = SQLiteQueue(queue_file)
    job = Job("queued-then-deleted", 1, {}, {}, [], owner="alice")
    queued = json.dumps({"kind": "request", "route": "/prompt", "job_id": job.id})
    assert isinstance(store.enqueue_many([replace(NewJob.of(job), record=queued)])[0], Job)
    log.add({"kind": "request", "route": "/queue", "delete": [job.id]})  # taken with the outbox, in one batch
    log.wake()
    log.start()
    log.stop()
    store.close()
    assert [r["route"] for r in records(tmp_path / "audit")] == ["/prompt", "/queue"]


def test_a_queue_file_from_before_whole_records_gains_the_column_and_keeps_its_rows(tmp_path: Path) -> None:
    queue_file = tmp_path / "queue.sqlite3"
    db = sqlite3.connect(queue_file)
    db.execute(
        "CREATE TABLE audit_outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, owner TEXT NOT "
        "NULL, context TEXT NOT NULL, state TEXT NOT NULL, created REAL, started REAL, finished REAL, result TEXT)"
    )
    db.execute(
        "INSERT INTO audit_outbox (job_id, owner, context, state, created, started, finished, result) "
        "VALUES ('older', 'bob', '{}', 'success', 1.0, 2.0, 3.0, '{}')"
    )
    db.commit()
    db.close()
    SQLiteQueue(queue_file).close()
    log = AuditLog(tmp_path / "audit", queue_file)
    log.start()
    log.stop()
    [generation] = list(records(tmp_path / "audit"))
    assert generation["kind"] == "generation" and generation["job_id"] == "older" and generation["user"] == "bob"


def test_stopping_while_the_disk_is_full_does_not_hang(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log, _ = new_log(tmp_path)
    log.start()
    monkeypatch.setattr(log, "_write_bytes", disk_full(log))
    log.add({"kind": "request", "n": 1})
    wait_until(lambda: not log.available)
    writer = log._thread
    log.stop()
    assert writer is not None and not writer.is_alive()  # it gave up, instead of retrying for ever


def _pending(queue_file: Path, file: str, size: int, seq: int, digest: str) -> None:
    """As the writer leaves the database just before it appends a batch."""
    db = sqlite3.connect(queue_file)
    db.execute(
        "UPDATE audit_end SET pending_file = ?, pending_size = ?, pending_seq = ?, pending_hash = ?",
        (file, size, seq, digest),
    )
    db.commit()
    db.close()


def test_a_write_cut_short_by_a_crash_is_set_aside_and_recorded_not_called_tampering(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log, queue_file, segment = written_log(tmp_path, 5)
    line, digest = chained({"kind": "request", "n": 5}, 6, log.head)
    _pending(queue_file, segment.name, segment.stat().st_size + len(line), 6, digest)
    with open(segment, "ab") as file:
        file.write(line[: len(line) // 2])  # the crash came mid-write

    checked, problem = verify(tmp_path / "audit", queue_file)
    assert problem is not None and "a write cut short" in problem.why and checked == 5

    again = AuditLog(tmp_path / "audit", queue_file)  # the next start sets the torn bytes aside
    again.start()
    write_all(again, 1, start=6)
    again.stop()
    assert verify(tmp_path / "audit", queue_file) == (7, None)
    [repair] = [r for r in records(tmp_path / "audit") if r["kind"] == "log_repair"]
    assert repair["why"].startswith("a write cut short") and repair["bytes"] == len(line) // 2
    assert (tmp_path / "audit" / repair["kept_as"]).read_bytes() == line[: len(line) // 2]


def test_a_batch_written_just_before_a_crash_is_adopted(tmp_path: Path) -> None:
    log, queue_file, segment = written_log(tmp_path, 3)
    line, digest = chained({"kind": "request", "n": 3}, 4, log.head)
    _pending(queue_file, segment.name, segment.stat().st_size + len(line), 4, digest)
    with open(segment, "ab") as file:
        file.write(line)  # written, and the crash came before the head was recorded
    assert verify(tmp_path / "audit", queue_file) == (4, None)  # a batch in flight, not damage
    again = AuditLog(tmp_path / "audit", queue_file)
    assert (again.seq, again.head) == (4, digest)
    again.stop()
    assert not (tmp_path / "audit" / QUARANTINE).exists()


def test_records_appended_while_the_server_was_stopped_are_found_and_set_aside(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log, queue_file, segment = written_log(tmp_path, 4)
    forged, _ = chained({"kind": "request", "user": "mallory", "route": "/prompt", "n": 99}, 5, log.head)
    with open(segment, "ab") as file:
        file.write(forged)  # a perfectly chained record, by someone who is not the server

    problem = verify(tmp_path / "audit", queue_file)[1]
    assert problem is not None and "were not written by the server" in problem.why, problem
    code, _, err = run(["audit", "verify", "--data-dir", str(tmp_path)], capsys)
    assert code == 1 and "not written by the server" in err

    again = AuditLog(tmp_path / "audit", queue_file)
    again.start()
    write_all(again, 1, start=4)
    again.stop()
    assert verify(tmp_path / "audit", queue_file)[1] is None
    found = list(records(tmp_path / "audit"))
    assert not [r for r in found if r.get("user") == "mallory"]
    [repair] = [r for r in found if r["kind"] == "log_repair"]
    assert repair["why"] == "appended while the server was stopped"
    assert json.loads((tmp_path / "audit" / repair["kept_as"]).read_bytes())["user"] == "mallory"


def test_verify_during_traffic_never_reports_damage(tmp_path: Path) -> None:
    log, queue_file = new_log(tmp_path, segment_bytes=4000)
    log.start()
    stop = threading.Event()

    async def requests() -> None:  # one after another, each answered once written, as the server's are
        n = 0
        while not stop.is_set():
            await log.write({"kind": "request", "n": n, "pad": "y" * 50})
            n += 1

    writer = threading.Thread(target=asyncio.run, args=(requests(),))
    writer.start()
    try:
        results = []
        deadline = time.monotonic() + 60
        # At least 30 checks, and on until the log has grown under them (a busy machine starts the writer late).
        while len(results) < 30 or (results[-1][0] <= results[0][0] and time.monotonic() < deadline):
            results.append(verify(tmp_path / "audit", queue_file))
    finally:
        stop.set()
        writer.join()
        log.stop()
    assert [problem for _, problem in results if problem is not None] == []
    assert results[-1][0] > results[0][0]  # the log grew while it was being verified
    assert verify(tmp_path / "audit", queue_file)[1] is None


def test_retention_by_size_keeps_the_log_bounded_and_verifiable(tmp_path: Path) -> None:
    log, queue_file = new_log(tmp_path, segment_bytes=2000, max_bytes=8000)
    log.start()
    write_all(log, 200)
    log.stop()
    files = audit_files(tmp_path / "audit")
    assert sum(f.stat().st_size for f in files) <= 8000 + 2000
    checked, problem = verify(tmp_path / "audit", queue_file)
    assert problem is None and 0 < checked < 200
    found = list(records(tmp_path / "audit"))
    assert found[0]["seq"] > 1 and any(r["kind"] == "retention" and r["why"] == ["size"] for r in found)
    files[0].unlink()  # a kept segment removed by hand is still found
    assert "records are missing" in str(verify(tmp_path / "audit", queue_file)[1])


def test_retention_by_age_removes_segments_older_than_the_days_kept(tmp_path: Path) -> None:
    now = [1_800_000_000.0]
    queue_file = tmp_path / "queue.sqlite3"
    SQLiteQueue(queue_file).close()
    log = AuditLog(tmp_path / "audit", queue_file, Retention(days=1), clock=lambda: now[0])
    log.start()
    write_all(log, 5)
    log.stop()
    first = audit_files(tmp_path / "audit")
    now[0] += 3 * 86400  # three days on: a new day's segment, and the old one is past its age
    for path in first:
        os.utime(path, (now[0] - 2 * 86400, now[0] - 2 * 86400))
    again = AuditLog(tmp_path / "audit", queue_file, Retention(days=1), clock=lambda: now[0])
    again.start()
    write_all(again, 2, start=5)
    again.stop()
    kept = audit_files(tmp_path / "audit")
    assert not set(first) & set(kept)
    assert verify(tmp_path / "audit", queue_file)[1] is None
    [retention] = [r for r in records(tmp_path / "audit") if r["kind"] == "retention"]
    assert retention["why"] == ["age"] and retention["removed"] == [p.name for p in first]
