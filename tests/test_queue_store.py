"""The SQLite file itself: what a killed process leaves in it, its indexes and query plans, and the older
files it reads. What every queue must do is in test_queue_contract.py."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.support.queues import enqueue
from zimage_serve.queue import sqlite_queue, sqlite_schema
from zimage_serve.queue.sqlite_queue import SQLiteQueue


def add(store: SQLiteQueue, job_id: str, number: float | None = None) -> None:
    enqueue(store, job_id, store.next_number() if number is None else number, {"1": {"class_type": "X"}}, {}, ["1"])


def test_sigkill_loses_no_accepted_job(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    child = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from tests.support.queues import enqueue
        from zimage_serve.queue.sqlite_queue import SQLiteQueue
        store = SQLiteQueue(Path({str(path)!r}))
        for i in range(50):
            enqueue(store, f"job{{i}}", store.next_number(), {{"1": {{}}}}, {{}}, ["1"])
        store.claim()
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    process = subprocess.run([sys.executable, "-c", child], env={**os.environ}, check=False)
    assert process.returncode == -signal.SIGKILL
    store = SQLiteQueue(path)
    assert store.count("pending") == 49 and [j.id for j in store.running()] == ["job0"]
    store.recover()
    assert [j.id for j in store.pending()] == [f"job{i}" for i in range(50)]


def test_a_files_counter_is_one_past_the_highest_number_after_a_crash_and_exact_after_a_close(tmp_path: Path) -> None:
    store = SQLiteQueue(tmp_path / "q.db")
    for name in ("a", "b", "c"):
        add(store, name)
    store.next_number()  # counted, not stored
    assert SQLiteQueue(tmp_path / "q.db").next_number() == 3  # the counter was not saved: read from the jobs
    store.close()
    assert SQLiteQueue(tmp_path / "q.db").next_number() == 4


def test_claiming_reads_one_index_entry_not_every_waiting_job(tmp_path: Path) -> None:
    store = SQLiteQueue(tmp_path / "q.db")
    plan = " ".join(row[3] for row in store._db.execute("EXPLAIN QUERY PLAN " + sqlite_queue.NEXT_PENDING))
    assert "jobs_live" in plan and "TEMP B-TREE" not in plan, plan


def test_an_older_files_indexes_are_replaced_and_its_jobs_kept_in_order(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    older = SQLiteQueue(path)
    for name in "abc":
        add(older, name)
    assert (running := older.claim()) is not None and running.id == "a"
    older.close()
    with sqlite3.connect(path) as db:
        db.execute("DROP INDEX jobs_finished")
        db.execute("DROP INDEX jobs_live")
        db.execute("CREATE INDEX jobs_state ON jobs (state, finished)")
        db.execute("CREATE INDEX jobs_pending ON jobs (number, seq) WHERE state = 'pending'")
        db.execute("CREATE INDEX jobs_running ON jobs (started) WHERE state = 'running'")
        db.execute(
            "CREATE INDEX jobs_history ON jobs (finished, seq) WHERE state IN ('success', 'error', 'interrupted')"
        )
    store = SQLiteQueue(path)
    names = {row[0] for row in store._db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert not {"jobs_state", "jobs_history", "jobs_pending", "jobs_running"} & names
    assert {"jobs_live", "jobs_finished"} <= names
    assert [j.id for j in store.running()] == ["a"] and [j.id for j in store.pending()] == ["b", "c"]
    assert (following := store.finish("a", "success", {}, claim_next=True)) is not None and following.id == "b"
    assert [j.id for j in store.history()] == ["a"] and [j.id for j in store.running()] == ["b"]


OLDER_JOBS_TABLE = """
CREATE TABLE jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    number REAL NOT NULL,
    prompt TEXT NOT NULL,
    extra_data TEXT NOT NULL,
    outputs TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'running', 'success', 'error', 'interrupted')),
    attempts INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    result TEXT
)"""


def test_an_older_jobs_table_is_made_again_with_every_job_kept(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    with sqlite3.connect(path) as db:  # a file as an earlier version left it: the states checked with IN
        db.execute(OLDER_JOBS_TABLE)
        db.execute("CREATE INDEX jobs_pending ON jobs (number, seq) WHERE state = 'pending'")
        rows = [(1, "done", 0, "success", 5.0, '{"outputs": {}}'), (2, "run", 1, "running", None, None)]
        rows += [(3, "wait", 2, "pending", None, None), (4, "first", -1, "pending", None, None)]
        for seq, job_id, number, state, finished, result in rows:
            db.execute(
                "INSERT INTO jobs (seq, id, number, prompt, extra_data, outputs, state, created, finished, result) "
                "VALUES (?, ?, ?, '{}', '{}', '[]', ?, 1.0, ?, ?)",
                (seq, job_id, number, state, finished, result),
            )
        db.execute("UPDATE sqlite_sequence SET seq = 9 WHERE name = 'jobs'")  # seq 5 to 9 were deleted
        # Its indexes, counts and triggers as that version kept them.
        db.executescript(sqlite_schema.SCHEMA.split(");", 1)[1])
        for state in sqlite_schema.STATES:
            db.execute("INSERT INTO state_counts SELECT ?, COUNT(*) FROM jobs WHERE state = ?", (state, state))
    store = SQLiteQueue(path)
    [table] = store._db.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'jobs'").fetchone()
    assert "IN (" not in table and "state = 'interrupted'" in table
    assert [j.id for j in store.history()] == ["done"] and store.history()[0].result == {"outputs": {}}
    assert [j.id for j in store.running()] == ["run"] and [j.id for j in store.pending()] == ["first", "wait"]
    assert {s: store.count(s) for s in ("pending", "running", "success")} == {"pending": 2, "running": 1, "success": 1}
    add(store, "new")
    assert store._db.execute("SELECT seq FROM jobs WHERE id = 'new'").fetchone()[0] == 10
    assert (claimed := store.claim()) is not None and claimed.id == "first"
    assert store.count("running") == 2 and store.count("pending") == 2  # counted by the triggers made again
    with pytest.raises(sqlite3.IntegrityError):  # the check still holds
        store._db.execute("UPDATE jobs SET state = 'lost' WHERE id = 'new'")
    store.close()
    reopened = SQLiteQueue(path)  # made again once only
    assert [j.id for j in reopened.pending()] == ["wait", "new"] and reopened.count("pending") == 2


def test_history_is_read_in_order_from_its_index(tmp_path: Path) -> None:
    store = SQLiteQueue(tmp_path / "q.db")
    query = f"SELECT * FROM jobs WHERE {sqlite_schema.DONE} ORDER BY finished, seq LIMIT 10"
    plan = " ".join(row[3] for row in store._db.execute("EXPLAIN QUERY PLAN " + query))
    assert "jobs_finished" in plan and "TEMP B-TREE" not in plan, plan


def test_jobs_are_read_by_column_position_so_the_table_keeps_the_declared_order(tmp_path: Path) -> None:
    store = SQLiteQueue(tmp_path / "q.db")
    declared = [row[1] for row in store._db.execute("PRAGMA table_info(jobs)")]
    assert declared == sqlite_schema.JOBS_COLUMNS.split(", ")
    add(store, "a")
    job = store.claim()
    assert job is not None and (job.id, job.number, job.prompt, job.outputs, job.attempts) == (
        "a",
        0,
        {"1": {"class_type": "X"}},
        ["1"],
        1,
    )


def broken(store: SQLiteQueue, job_id: str, number: float) -> None:
    """A pending row whose prompt is not JSON (as a damaged or hand-edited file may hold)."""
    store._db.execute(
        "INSERT INTO jobs (id, number, prompt, extra_data, outputs, state, created) "
        "VALUES (?, ?, '{not json', '{}', '[]', 'pending', 0)",
        (job_id, number),
    )


def test_a_claim_quarantines_a_row_it_cannot_read_and_takes_the_next(tmp_path: Path) -> None:
    """The claimed row is read once the transaction is over; an unreadable one is put aside, never run."""
    store = SQLiteQueue(tmp_path / "q.db")
    add(store, "first", 0)
    broken(store, "bad1", 1)
    broken(store, "bad2", 2)
    add(store, "next", 3)
    first = store.claim("w1")
    assert first is not None and first.id == "first" and first.state == "running" and first.worker == "w1"
    taken = store.finish("first", "success", {}, claim_next=True, worker="w1")
    assert taken is not None and (taken.id, taken.state, taken.attempts, taken.worker) == ("next", "running", 1, "w1")
    assert taken.lease is not None and taken.started is not None and taken.lease > taken.started
    assert [j.id for j in store.running()] == ["next"] and store.count("pending") == 0
    assert [(row["id"], row["state"]) for row in store.quarantined()] == [("bad1", "pending"), ("bad2", "pending")]
    broken(store, "bad3", 4)
    assert store.claim("w1") is None and [row["id"] for row in store.quarantined()][-1] == "bad3"


def test_an_unreadable_claim_another_worker_took_over_is_not_quarantined_by_the_first(tmp_path: Path) -> None:
    store = SQLiteQueue(tmp_path / "q.db")
    broken(store, "bad", 0)
    with store._writing():
        claim = store._claim_next("w1", 60)
    assert claim is not None
    store._db.execute("UPDATE jobs SET worker = 'w2' WHERE id = 'bad'")  # its lease ran out; w2 took it
    assert store._read_claimed(claim) is None
    assert store.quarantined() == [] and [row[0] for row in store._db.execute("SELECT id FROM jobs")] == ["bad"]


def test_a_claimed_row_whose_quarantine_failed_is_quarantined_by_the_next_claim(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SQLiteQueue(tmp_path / "q.db")
    broken(store, "bad", 0)
    store._db.execute(
        "INSERT INTO jobs (id, number, prompt, extra_data, outputs, state, created, attempts) "
        "VALUES ('odd', 1, '{}', '{}', '[]', 'pending', 0, 'many')"  # attempts that are not a number
    )
    add(store, "good", 2)
    real = store._quarantine
    failures = iter([sqlite3.OperationalError("database is locked")])

    def failing_once(row: sqlite3.Row, reason: str) -> None:
        for exc in failures:
            raise exc
        real(row, reason)

    monkeypatch.setattr(store, "_quarantine", failing_once)
    with pytest.raises(sqlite3.OperationalError):
        store.claim("w1")
    # claimed, unread, not yet out of the way (read as rows: listing jobs would quarantine it too)
    assert [tuple(r) for r in store._db.execute("SELECT id FROM jobs WHERE state = 'running'")] == [("bad",)]
    job = store.claim("w1")
    assert job is not None and job.id == "good" and [j.id for j in store.running()] == ["good"]
    assert [row["id"] for row in store.quarantined()] == ["bad", "odd"]


def triggers(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")}


WEBHOOK_TRIGGERS = {"jobs_webhook_queued", "jobs_webhook_started", "jobs_webhook_ended", "jobs_webhook_deleted"}


def test_the_webhook_triggers_exist_only_while_an_endpoint_does(tmp_path: Path) -> None:
    """Without an endpoint a job's changes run no webhook trigger at all (each costs SQLite a sub-program per
    row even when its WHEN clause is false); an endpoint registered from another connection makes them, in
    its own transaction, and the other connections' next statements use them."""
    from zimage_serve.webhooks.store import WebhookStore

    path = tmp_path / "queue.sqlite3"
    queue = SQLiteQueue(path)
    assert not triggers(path) & WEBHOOK_TRIGGERS
    hooks = WebhookStore(path)
    hooks.add("all", "https://a.example", ["queued", "started"], subscribe=True)
    hooks.add("second", "https://b.example", ["queued"], subscribe=True)
    assert triggers(path) >= WEBHOOK_TRIGGERS
    add(queue, "after")
    queue.claim()
    events = hooks._db.execute("SELECT event, endpoint FROM webhook_outbox WHERE job_id = 'after'").fetchall()
    assert sorted(e for e, _ in events) == ["queued", "queued", "started"]
    assert hooks.remove("all") and triggers(path) >= WEBHOOK_TRIGGERS  # one endpoint is left
    assert hooks.remove("second") and not triggers(path) & WEBHOOK_TRIGGERS
    add(queue, "later")
    assert hooks._db.execute("SELECT COUNT(*) FROM webhook_outbox WHERE job_id = 'later'").fetchone()[0] == 0
    queue.close()
    hooks.close()


def test_opening_the_file_fits_its_triggers_to_its_endpoints_and_store_and_changes_nothing_that_fits(
    tmp_path: Path,
) -> None:
    """An endpoint registered before the queue ever made its tables gets its triggers when the queue opens
    the file; triggers an older version left with no endpoint (or written differently) are dropped or made
    again; a file whose triggers fit is not touched (a schema change makes every connection prepare again)."""
    from zimage_serve.storage.uploads import UploadOutbox
    from zimage_serve.webhooks.store import WebhookStore

    path = tmp_path / "queue.sqlite3"
    hooks = WebhookStore(path)  # no jobs table yet: nothing to put triggers on
    hooks.add("all", "https://a.example", subscribe=True)
    assert not triggers(path) & WEBHOOK_TRIGGERS
    SQLiteQueue(path).close()
    assert triggers(path) >= WEBHOOK_TRIGGERS
    with sqlite3.connect(path) as db:
        version = db.execute("PRAGMA schema_version").fetchone()[0]
    SQLiteQueue(path).close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA schema_version").fetchone()[0] == version
        db.execute("DELETE FROM webhook_endpoints")  # as a version that kept its triggers always would
        db.execute("DROP TRIGGER jobs_outputs_forgotten")
        db.execute("CREATE TRIGGER jobs_outputs_forgotten AFTER DELETE ON jobs BEGIN SELECT 1; END")
    SQLiteQueue(path).close()
    assert not triggers(path) & WEBHOOK_TRIGGERS
    with sqlite3.connect(path) as db:
        [kept] = db.execute("SELECT sql FROM sqlite_master WHERE name = 'jobs_outputs_forgotten'").fetchone()
    assert "DELETE FROM output_objects" in kept
    uploads = UploadOutbox(path)
    assert "jobs_outputs_stored" not in triggers(path)
    uploads.use("s3://bucket/outputs")
    assert "jobs_outputs_stored" in triggers(path)
    uploads.use(None)
    assert "jobs_outputs_stored" not in triggers(path) and "jobs_outputs_forgotten" in triggers(path)
    uploads.close()
    hooks.close()
