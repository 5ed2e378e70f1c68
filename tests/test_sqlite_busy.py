"""Statements on a shared SQLite file wait for another connection's write in short steps, and give up
after their timeout with SQLite's own error."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from zimage_serve import sqlite_busy


def connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA busy_timeout=0")  # as the queue's and the audit's connections, once set up
    return db


def test_a_write_waits_for_the_other_connections_transaction_then_goes_on(tmp_path: Path) -> None:
    holder, waiter = connect(tmp_path / "q.sqlite3"), connect(tmp_path / "q.sqlite3")
    holder.execute("CREATE TABLE t (n INTEGER)")
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("INSERT INTO t VALUES (1)")
    with pytest.raises(sqlite3.OperationalError):  # what SQLite alone answers, with no wait
        waiter.execute("BEGIN IMMEDIATE")
    tried = threading.Event()
    original = waiter.execute

    class Watched:  # tells the test once the waiter has met the lock, so the holder commits while it waits
        def execute(self, sql: str, args: object = ()) -> sqlite3.Cursor:
            try:
                return original(sql, args)  # type: ignore[arg-type]
            except sqlite3.OperationalError:
                tried.set()
                raise

    def commit_once_met() -> None:
        tried.wait(30)
        holder.execute("COMMIT")

    releasing = threading.Thread(target=commit_once_met)
    releasing.start()
    sqlite_busy.execute(Watched(), "BEGIN IMMEDIATE")  # type: ignore[arg-type]
    releasing.join()
    sqlite_busy.execute(waiter, "INSERT INTO t VALUES (2)")
    sqlite_busy.execute(waiter, "COMMIT")
    assert [n for (n,) in holder.execute("SELECT n FROM t ORDER BY n")] == [1, 2]


def test_a_lock_held_past_the_timeout_is_sqlites_busy_error(tmp_path: Path) -> None:
    holder, waiter = connect(tmp_path / "q.sqlite3"), connect(tmp_path / "q.sqlite3")
    holder.execute("BEGIN IMMEDIATE")
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        sqlite_busy.execute(waiter, "BEGIN IMMEDIATE", timeout_s=0.05)
    holder.execute("ROLLBACK")
    sqlite_busy.execute(waiter, "BEGIN IMMEDIATE")
    sqlite_busy.execute(waiter, "ROLLBACK")


def test_a_short_wait_only_yields_the_core(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A transaction of the other process that ends within SPIN_S is followed at the waiter's next turn on the
    core, not after a sleep (one is ~0.1 ms at least, longer than such a transaction): the other side commits
    only from within the third yield."""
    holder, waiter = connect(tmp_path / "q.sqlite3"), connect(tmp_path / "q.sqlite3")
    holder.execute("BEGIN IMMEDIATE")
    yields: list[int] = []

    def other_side_commits_on_the_third_yield() -> None:
        yields.append(1)
        if len(yields) == 3:
            holder.execute("COMMIT")

    monkeypatch.setattr(sqlite_busy, "_yield", other_side_commits_on_the_third_yield)
    monkeypatch.setattr(sqlite_busy, "SPIN_S", 60.0)  # a slow machine's tries stay within it
    sqlite_busy.execute(waiter, "BEGIN IMMEDIATE")
    sqlite_busy.execute(waiter, "ROLLBACK")
    assert len(yields) == 3
