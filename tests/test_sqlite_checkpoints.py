"""Write-ahead log checkpoints are made by a thread of their own, not inside a commit."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tests.support.jobs import wait_until
from tests.support.queues import enqueue
from zimage_serve import sqlite_checkpoints
from zimage_serve.queue.sqlite_queue import SQLiteQueue
from zimage_serve.sqlite_checkpoints import Checkpoints


def _logged_file(path: Path) -> sqlite3.Connection:
    """A database whose commits stay in its log (as the queue's connections make them)."""
    db = sqlite3.connect(str(path), isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.execute("CREATE TABLE rows (text TEXT)")
    return db


def test_the_queues_commits_reach_the_database_file_by_the_thread_alone(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite3"
    queue = SQLiteQueue(path)
    size = path.stat().st_size
    for i in range(40):
        enqueue(queue, f"job-{i}", i, {"1": {"class_type": "Note", "inputs": {"text": "x" * 2000}}}, {}, ["1"])
    wait_until(lambda: path.stat().st_size > size, timeout=10)  # the new jobs' pages copied from the log
    queue.close()


def test_no_commit_of_the_queue_checkpoints_on_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Checkpoints, "committed", lambda self: None)  # no thread: what do the commits copy?
    path = tmp_path / "queue.sqlite3"
    queue = SQLiteQueue(path)
    size = path.stat().st_size
    for i in range(300):  # well past SQLite's own threshold of 1,000 pages of log
        enqueue(queue, f"job-{i}", i, {"1": {"class_type": "Note", "inputs": {"text": "x" * 2000}}}, {}, ["1"])
    assert Path(f"{path}-wal").stat().st_size > 1000 * 4096 and path.stat().st_size == size
    queue.close()


def test_commits_are_checkpointed_by_the_thread_which_ends_when_idle(tmp_path: Path) -> None:
    path = tmp_path / "rows.sqlite3"
    db = _logged_file(path)
    checkpoints = Checkpoints(path, every_s=0.05, idle_s=0.2)
    assert not checkpoints.running  # nothing committed yet
    for _ in range(20):
        db.execute("INSERT INTO rows VALUES (?)", ("x" * 3000,))
        checkpoints.committed()
    wait_until(lambda: checkpoints.done >= 1, timeout=10)
    assert path.stat().st_size > 20 * 3000 and checkpoints.done <= 20
    wait_until(lambda: not checkpoints.running, timeout=10)  # idle: the thread is gone
    done = checkpoints.done
    db.execute("INSERT INTO rows VALUES ('later')")
    checkpoints.committed()  # and a later commit starts it again
    wait_until(lambda: checkpoints.done == done + 1, timeout=10)
    checkpoints.close()
    assert not checkpoints.running
    checkpoints.committed()  # closed: nothing starts
    assert not checkpoints.running
    db.close()


def test_a_thread_that_could_not_start_is_started_again_by_the_next_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "rows.sqlite3"
    db = _logged_file(path)
    db.execute("INSERT INTO rows VALUES (?)", ("x" * 3000,))
    checkpoints = Checkpoints(path, every_s=0.01, idle_s=5)
    connect = sqlite3.connect

    def out_of_descriptors(*args: object, **kwargs: object) -> sqlite3.Connection:
        raise sqlite3.OperationalError("unable to open database file")

    monkeypatch.setattr(sqlite_checkpoints.sqlite3, "connect", out_of_descriptors)
    checkpoints.committed()
    wait_until(lambda: not checkpoints.running, timeout=10)
    monkeypatch.setattr(sqlite_checkpoints.sqlite3, "connect", connect)
    checkpoints.committed()
    wait_until(lambda: checkpoints.done == 1, timeout=10)
    assert path.stat().st_size > 3000
    checkpoints.close()
    db.close()
