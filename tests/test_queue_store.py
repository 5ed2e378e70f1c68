"""The SQLite queue: order, limits, history, and what a killed process leaves behind."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from zimage_serve.queue import store as store_module
from zimage_serve.queue.store import DuplicateJob, Job, JobStore, QueueFull


def add(store: JobStore, job_id: str, number: float | None = None) -> None:
    store.enqueue(job_id, store.next_number() if number is None else number, {"1": {"class_type": "X"}}, {}, ["1"])


def test_lowest_number_first_then_submission_order(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "q.db")
    for name in ("a", "b", "c"):
        add(store, name)
    add(store, "urgent", -1)
    add(store, "tie", 1)  # same number as "b", submitted later
    assert [j.id for j in store.pending()] == ["urgent", "a", "b", "tie", "c"]
    claimed = [store.claim() for _ in range(5)]
    assert [j.id for j in claimed if j] == ["urgent", "a", "b", "tie", "c"]
    assert store.claim() is None
    assert claimed[1] is not None and claimed[1].state == "running" and claimed[1].attempts == 1


def test_running_jobs_are_listed_by_start_whatever_their_numbers(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "q.db")
    add(store, "late", 5)
    add(store, "early", 9)
    assert (first := store.claim()) is not None and first.id == "late"
    add(store, "front", -1)  # queued in front after "late" started: it is claimed next, before "early"
    assert (second := store.claim()) is not None and second.id == "front"
    assert [j.id for j in store.running()] == ["late", "front"] and [j.id for j in store.pending()] == ["early"]
    assert store.delete_pending() == 1 and [j.id for j in store.running()] == ["late", "front"]


def test_numbers_keep_increasing_across_restarts(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "q.db")
    for name in ("a", "b", "c"):
        add(store, name)
    assert [j.number for j in store.pending()] == [0, 1, 2]
    store.next_number()  # a prompt that then failed validation: counted, as ComfyUI does, but not stored
    # Killed before closing (the counter not saved): one past the highest number stored.
    assert JobStore(tmp_path / "q.db").next_number() == 3
    store.close()  # closed cleanly: the counter goes on exactly
    assert JobStore(tmp_path / "q.db").next_number() == 4


def test_counts_follow_every_change_and_match_the_file(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    store = JobStore(path)
    for name in "abcdef":
        add(store, name)
    first, second = store.claim(), store.claim()
    assert first is not None and second is not None
    store.finish(first.id, "success", {})
    store.delete_pending(["c"])
    store.finish(second.id, "error", {})
    store.claim()
    store.delete_history([first.id])
    expected = {"pending": 2, "running": 1, "success": 0, "error": 1, "interrupted": 0}
    assert {s: store.count(s) for s in expected} == expected
    store.close()
    reopened = JobStore(path)
    assert {s: reopened.count(s) for s in expected} == expected
    reopened.recover()
    assert reopened.count("running") == 0 and reopened.count("pending") == 3


def test_duplicates_and_a_full_queue_are_refused(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "q.db", max_pending=2)
    add(store, "a")
    with pytest.raises(DuplicateJob, match="prompt_id a already exists"):
        add(store, "a")
    add(store, "b")
    with pytest.raises(QueueFull, match="2 jobs waiting"):
        add(store, "c")
    store.claim()
    add(store, "c")  # a running job no longer counts as waiting
    assert store.count("pending") == 2


def test_history_entries_have_comfyuis_shape(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "q.db")
    for name in ("a", "b", "c"):
        add(store, name)
    for state in ("success", "error", "interrupted"):
        job = store.claim()
        assert job is not None
        store.finish(job.id, state, {"outputs": {"9": {"images": []}}, "messages": [["execution_start", {}]]})
    entry = store.history()[0].history_entry()
    assert entry == {
        "prompt": [0, "a", {"1": {"class_type": "X"}}, {}, ["1"]],
        "outputs": {"9": {"images": []}},
        "status": {"status_str": "success", "completed": True, "messages": [["execution_start", {}]]},
        "meta": {"9": {"node_id": "9", "display_node": "9", "parent_node": None, "real_node_id": "9"}},
    }
    assert [j.history_entry()["status"]["status_str"] for j in store.history()] == ["success", "error", "error"]
    assert [j.id for j in store.history(max_items=2)] == ["b", "c"]  # the newest two
    assert [j.id for j in store.history(max_items=1, offset=0)] == ["a"]
    assert store.delete_history(["a", "nope"]) == 1
    assert store.delete_history() == 2 and store.history() == []


def test_deleting_waiting_jobs_leaves_the_running_one(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "q.db")
    for name in ("a", "b", "c"):
        add(store, name)
    store.claim()
    assert store.delete_pending(["b", "a"]) == 1
    assert store.delete_pending() == 1
    assert [j.id for j in store.running()] == ["a"] and store.pending() == []


def test_a_job_left_running_by_a_crash_runs_again_then_fails(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "q.db")
    add(store, "a")
    store.claim()
    reopened = JobStore(tmp_path / "q.db")  # the first process "died" without finishing
    [job] = reopened.recover()
    assert (job.id, job.state, job.attempts) == ("a", "pending", 1)
    again = reopened.claim()
    assert again is not None and again.attempts == 2
    [job] = JobStore(tmp_path / "q.db").recover()
    assert job.state == "error"
    entry = reopened.get("a")
    assert entry is not None and entry.state == "error"
    status = entry.history_entry()["status"]
    assert status["status_str"] == "error" and not status["completed"]
    assert "stopped while this prompt ran (2 times)" in status["messages"][0][1]["exception_message"]


def test_sigkill_loses_no_accepted_job(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    child = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from zimage_serve.queue.store import JobStore
        store = JobStore(Path({str(path)!r}))
        for i in range(50):
            store.enqueue(f"job{{i}}", store.next_number(), {{"1": {{}}}}, {{}}, ["1"])
        store.claim()
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    process = subprocess.run([sys.executable, "-c", child], env={**os.environ}, check=False)
    assert process.returncode == -signal.SIGKILL
    store = JobStore(path)
    assert store.count("pending") == 49 and [j.id for j in store.running()] == ["job0"]
    store.recover()
    assert [j.id for j in store.pending()] == [f"job{i}" for i in range(50)]


def test_two_connections_to_one_file_see_each_others_counts(tmp_path: Path) -> None:
    server, worker = JobStore(tmp_path / "q.db", max_pending=2), JobStore(tmp_path / "q.db")
    add(server, "a")
    add(server, "b")
    with pytest.raises(QueueFull):
        add(server, "c")
    job = worker.claim()  # the worker process takes one: the server may queue another
    assert job is not None and server.count("running") == 1 and server.count("pending") == 1
    add(server, "c")
    worker.finish(job.id, "success", {})
    assert server.count("success") == 1 and server.count_finished() == 1


def test_history_keeps_the_newest_entries_within_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "HISTORY_LIMIT", 3)
    store = JobStore(tmp_path / "q.db")
    for name in "abcde":
        add(store, name)
        job = store.claim()
        assert job is not None
        store.finish(job.id, "success", {})
    assert [j.id for j in store.history()] == ["c", "d", "e"]
    assert store.count_finished() == 3 == store.count("success")


def test_claiming_reads_one_index_entry_not_every_waiting_job(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "q.db")
    plan = " ".join(row[3] for row in store._db.execute("EXPLAIN QUERY PLAN " + store_module.NEXT_PENDING))
    assert "jobs_live" in plan and "TEMP B-TREE" not in plan, plan


def test_an_older_files_indexes_are_replaced_and_its_jobs_kept_in_order(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    older = JobStore(path)
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
    store = JobStore(path)
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
        db.executescript(store_module.SCHEMA.split(");", 1)[1])
        for state in store_module.STATES:
            db.execute("INSERT INTO state_counts SELECT ?, COUNT(*) FROM jobs WHERE state = ?", (state, state))
    store = JobStore(path)
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
    reopened = JobStore(path)  # made again once only
    assert [j.id for j in reopened.pending()] == ["wait", "new"] and reopened.count("pending") == 2


def test_history_is_read_in_order_from_its_index(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "q.db")
    query = f"SELECT * FROM jobs WHERE {store_module.DONE} ORDER BY finished, seq LIMIT 10"
    plan = " ".join(row[3] for row in store._db.execute("EXPLAIN QUERY PLAN " + query))
    assert "jobs_finished" in plan and "TEMP B-TREE" not in plan, plan


def test_finishing_can_hand_out_the_next_job_in_the_same_transaction(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "q.db")
    for name in ("a", "b"):
        add(store, name)
    first = store.claim()
    assert first is not None and first.id == "a"
    following = store.finish("a", "success", {}, claim_next=True)
    assert following is not None and following.id == "b" and following.state == "running"
    assert store.count("running") == 1 and store.count("pending") == 0 and store.count("success") == 1
    assert store.finish("b", "error", {}, claim_next=True) is None
    assert store.count("running") == 0 and store.count_finished() == 2


def test_the_queue_as_json_text_equals_the_parsed_queue_items(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "q.db")
    prompt = {"1": {"class_type": "X", "inputs": {"text": '蓝色 "quoted"'}}}
    store.enqueue("a", 3.0, prompt, {"client_id": "c"}, ["1"])
    store.enqueue("b", -1.5, {"2": {}}, {}, ["2"])
    store.enqueue("c", 7.0, {"3": {}}, {}, ["3"])
    store.claim()
    for state, jobs in (("pending", store.pending()), ("running", store.running())):
        spliced = [json.loads(text) for text in store.queue_items_json(state)]
        assert spliced == [job.queue_item() for job in jobs]
    assert [item[0] for item in map(json.loads, store.queue_items_json("pending"))] == [3, 7]


def test_a_burst_is_stored_in_one_transaction_and_each_job_gets_its_own_answer(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "q.db", max_pending=4)
    add(store, "taken", 0)
    prompt = {"1": {"class_type": "X"}}
    ids = (("a", 1), ("taken", 2), ("b", 3), ("a", 4), ("c", 5), ("d", 6))
    results = store.enqueue_many([Job(i, n, prompt, {}, ["1"]) for i, n in ids])
    kinds = [type(r).__name__ for r in results]
    assert kinds == ["Job", "DuplicateJob", "Job", "DuplicateJob", "Job", "QueueFull"]
    assert [j.id for j in store.pending()] == ["taken", "a", "b", "c"]
    assert [j.number for j in store.pending()] == [0, 1, 3, 5]  # the refused "a" did not overwrite the first
    assert store.count("pending") == 4  # the counts kept by triggers agree
    with pytest.raises(QueueFull):
        add(store, "e")


def test_jobs_are_read_by_column_position_so_the_table_keeps_the_declared_order(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "q.db")
    declared = [row[1] for row in store._db.execute("PRAGMA table_info(jobs)")]
    assert declared == store_module.JOBS_COLUMNS.split(", ")
    add(store, "a")
    job = store.claim()
    assert job is not None and (job.id, job.number, job.prompt, job.outputs, job.attempts) == (
        "a",
        0,
        {"1": {"class_type": "X"}},
        ["1"],
        1,
    )
