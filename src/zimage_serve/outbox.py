"""What the queue file's outboxes share (webhook deliveries, output uploads): a connection of their own beside
the queue's, the time as SQL reads it, and the backoff between tries.

The outboxes' rows are written by triggers in the transaction that changes a job, and emptied by tasks of
the API node that claim them with a lease, so no event or file is lost to a crash and none is handled by two
nodes at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from zimage_serve import sqlite_busy
from zimage_serve.private import private_file

T = TypeVar("T")

NOW = "((julianday('now') - 2440587.5) * 86400.0)"  # Unix time, in SQLite before unixepoch('subsec')


def connect(path: Path, tables: str) -> sqlite3.Connection:
    """A connection to the queue file (made private when this makes it), with `tables` made if missing.

    An existing file is never opened and closed around the connection: the queue may have it open in this
    process, and closing another descriptor of it would drop that connection's locks (POSIX record locks are
    per process)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():  # secrets and users' file names are in it: private from the start
        private_file(path)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA wal_autocheckpoint=4000")  # rarely: the queue's own thread checkpoints the log
    db.execute(f"PRAGMA busy_timeout={int(sqlite_busy.BUSY_TIMEOUT_S * 1000)}")
    db.executescript(tables)  # the queue makes the same tables, and fits the triggers, as it opens the file
    db.execute("PRAGMA busy_timeout=0")
    return db


class OutboxFile:
    """An outbox's tables in the queue file; thread-safe: a connection and a lock for writes, another pair
    for the reads requests make on the event loop, which never wait for the writes (WAL readers do not)."""

    TABLE = ""  # the outbox's table: rows with seq, next_at, lease_until, last_error and dead

    def __init__(self, path: Path, tables: str) -> None:
        self._db = connect(path, tables)
        self._lock = threading.Lock()
        self._reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._reader.row_factory = sqlite3.Row
        self._read_lock = threading.Lock()

    def close(self) -> None:
        with self._lock, self._read_lock:
            self._db.close()
            self._reader.close()

    def retry_or_give_up(self, seq: int, lease: float, error: str, retry_at: float | None) -> None:
        """A try that failed: tried again at `retry_at`, or given up on (dead) when None. Fenced by the claim's
        lease: a try that outlived it records nothing (the row was taken again)."""
        with self._writing():
            if retry_at is None:
                sql, moment = f"UPDATE {self.TABLE} SET dead = ?", time.time()
            else:
                sql, moment = f"UPDATE {self.TABLE} SET next_at = ?", retry_at
            self._execute(
                sql + ", last_error = ?, lease_until = NULL WHERE seq = ? AND lease_until = ?",
                (moment, error[:500], seq, lease),
            )

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._read_lock:
            return sqlite_busy.execute(self._reader, sql, args).fetchall()

    def _execute(self, sql: str, args: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        return sqlite_busy.execute(self._db, sql, args)

    def _writing(self) -> Any:
        return sqlite_busy.transaction(self._db, self._lock)


async def drain(
    claim: Callable[[], Awaitable[list[T]]],
    handle: Callable[[T], Awaitable[None]],
    concurrency: int,
    poll_s: float,
    due: asyncio.Event,
    what: str,
) -> None:
    """Claim and handle an outbox's rows until cancelled: at most `concurrency` at once, looking again at once
    while rows come, after `due` is set or `poll_s` otherwise. A claim that fails (the database away a moment:
    a long lock, a full disk) is tried again a few seconds later; the loop never dies of it."""
    slots = asyncio.Semaphore(concurrency)
    tasks: set[asyncio.Task[None]] = set()

    async def handled(row: T) -> None:
        try:
            await handle(row)
        finally:
            slots.release()

    try:
        while True:
            try:
                claimed = await claim()
            except Exception:
                logging.getLogger(__name__).exception("%s could not be read; trying again in a few seconds", what)
                await asyncio.sleep(5)
                continue
            for row in claimed:
                await slots.acquire()
                task = asyncio.create_task(handled(row))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if not claimed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(due.wait(), poll_s)
                due.clear()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def retry_delay(
    attempts: int, first_delay_s: float, max_delay_s: float, draw: Callable[[], float] = random.random
) -> float:
    """Exponential backoff with full jitter: up to first_delay · 2^(attempts-1), capped, never below half the
    first delay."""
    ceiling = min(max_delay_s, first_delay_s * 2.0 ** max(0, attempts - 1))
    return float(max(first_delay_s / 2, ceiling * draw()))


def text(value: Any) -> str:
    """A Redis reply as text, whether the client decodes replies or not."""
    return value.decode() if isinstance(value, bytes) else str(value)
