"""SQLite statements that wait for another connection's write transaction in short steps.

SQLite's own busy handler sleeps 1, 2, 5, 10 ms ... between tries: far longer than the write transactions on
the queue file last (about 0.1 ms). Connections that share that file meet each other's locks all the time (the
server's queue beside its worker process's, the audit writer beside both), and with SQLite's waits each of them
would sleep more than it writes; a client that posts one prompt after another would pay those sleeps on every
request. Here a statement first tries again each time it has yielded the core, for SPIN_S (the other process's
transaction is usually over by then, and a sleep, however short, lasts ~0.1 ms or more once the scheduler is
counted: measured, the one-client benchmark's median answer 0.72 → 0.64 ms); then the waits start at 50 µs and
double up to 5 ms. A connection using `execute` sets its own `busy_timeout` to 0 once it is set up, so that
SQLite itself never sleeps.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

BUSY_TIMEOUT_S = 10.0  # how long a statement waits for another connection's transaction
SPIN_S = 0.0003  # first, tries that only yield the core (to the holder, if it waits for one)
_yield = getattr(os, "sched_yield", lambda: time.sleep(0))


def execute(
    db: sqlite3.Connection, sql: str, args: Sequence[Any] = (), timeout_s: float = BUSY_TIMEOUT_S
) -> sqlite3.Cursor:
    """`db.execute(sql, args)`, tried again while another connection holds the lock it needs."""
    delay, started = 0.00005, time.perf_counter()  # a fine clock everywhere (Windows' monotonic ticks at 16 ms)
    while True:
        try:
            return db.execute(sql, args)
        except sqlite3.OperationalError as exc:
            busy = getattr(exc, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_BUSY
            waited = time.perf_counter() - started
            if not busy or waited > timeout_s:
                raise
        if waited < SPIN_S:
            _yield()
            continue
        time.sleep(delay)
        delay = min(delay * 2, 0.005)


@contextmanager
def transaction(db: sqlite3.Connection, lock: threading.Lock) -> Iterator[None]:
    """One write transaction on `db` under `lock` (its connection's, shared by threads): begun as soon as
    the file's write lock can be had, committed at the end, rolled back on any error."""
    with lock:
        execute(db, "BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            execute(db, "ROLLBACK")
            raise
        execute(db, "COMMIT")
