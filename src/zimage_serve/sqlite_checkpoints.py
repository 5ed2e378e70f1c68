"""Checkpoints of a SQLite file's write-ahead log, made by a thread of their own, not inside a commit.

SQLite copies the log back into the database file (a checkpoint) inside the commit that takes the log past
`wal_autocheckpoint` pages, and a checkpoint waits for the disk twice (the log, then the database). On a
cloud disk that took ~21 ms (measured: 20,000 small commits, 15 of them checkpointing, 0.016 ms each for the
others), paid by whichever request or job happened to commit then: at a thousand jobs a second, one request in
a few hundred. So the queue's connections leave that to a log far longer than this thread lets it grow
(BACKSTOP_PAGES), and each process that writes the file checkpoints it from this thread, at most
EVERY_S after the first commit since its last checkpoint. A PASSIVE checkpoint takes no lock a writer needs:
commits go on while it runs.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path

log = logging.getLogger(__name__)

EVERY_S = 0.5  # at a thousand jobs a second the log then stays under ~9,000 pages (~36 MB)
BACKSTOP_PAGES = 50_000  # should the thread fail, a commit still checkpoints a log this long (~200 MB)
IDLE_S = 30.0  # the thread ends after this long without a commit (the next one starts it again)


class Checkpoints:
    """The checkpoint thread of one database file in this process: started by a commit, ended by IDLE_S
    without one, or by `close`. `committed` after each commit costs a flag's test, and once per round a lock."""

    def __init__(self, path: Path, every_s: float = EVERY_S, idle_s: float = IDLE_S) -> None:
        self.path, self.every_s, self.idle_s = path, every_s, idle_s
        self.done = 0  # checkpoints made (for tests and curious operators)
        self._due = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # `_due` set, and the thread started or ended, together
        self._thread: threading.Thread | None = None  # the thread that checkpoints, while it does
        self._last: threading.Thread | None = None  # the latest started (`close` waits for it)

    def committed(self) -> None:
        """A commit was made: the log is checkpointed within `every_s`."""
        if self._due.is_set():
            return
        with self._lock:
            self._due.set()
            if self._thread is None and not self._stopping.is_set():
                thread = threading.Thread(target=self._run, name="zimage-checkpoints", daemon=True)
                try:
                    thread.start()
                except RuntimeError as exc:  # no thread to be had now: the commit stands; the next one tries again
                    log.warning("could not start the checkpoints of %s: %s", self.path, exc)
                    self._due.clear()
                    return
                self._thread = self._last = thread

    @property
    def running(self) -> bool:
        """Whether this file's checkpoint thread lives now."""
        return self._last is not None and self._last.is_alive()

    def close(self, timeout_s: float = 10.0) -> None:
        with self._lock:
            self._stopping.set()
            self._due.set()
            thread = self._last  # one that is ending on its own too: it still closes its connection
        if thread is not None:
            thread.join(timeout_s)

    def _run(self) -> None:
        try:
            db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        except sqlite3.Error as exc:  # out of file descriptors, say: the next commit starts a thread again
            log.warning("could not open %s to checkpoint it: %s", self.path, exc)
            self._ended()
            return
        try:
            while True:
                if not self._due.wait(self.idle_s):
                    with self._lock:
                        if not self._due.is_set():
                            self._thread = None
                            return
                if self._stopping.wait(self.every_s):  # the commits of this interval share one checkpoint
                    return
                self._due.clear()  # before it runs: a commit made meanwhile asks for the next one
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    self.done += 1
                except sqlite3.Error as exc:  # a full disk, say: the log grows until a later try succeeds
                    log.warning("could not checkpoint %s (tried again after the next commit): %s", self.path, exc)
        except BaseException:
            self._ended()
            raise
        finally:
            db.close()

    def _ended(self) -> None:
        """This thread stops before its time: the next commit starts another."""
        with self._lock:
            if self._thread is threading.current_thread():
                self._thread = None
                self._due.clear()
