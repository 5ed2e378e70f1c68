"""Job time limits kept by one watchdog thread, not a timer thread per job.

Starting and cancelling a `threading.Timer` for every job costs a thread's creation each time (with a
limit now on by default on every device, that doubled the worker's CPU per job on the model-free graph).
Here a job's deadline is an entry in a dict; one thread sleeps until the nearest one and is woken only
when a nearer deadline arrives, so a job costs an insert and a delete.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Deadlines:
    """Calls `expired(key)` once for each key whose deadline passes before it is removed."""

    def __init__(self, expired: Callable[[str], None], clock: Callable[[], float] = time.monotonic) -> None:
        self._expired = expired
        self._clock = clock  # seconds; a test's own clock shows the deadlines' order without waiting on time
        self._due: dict[str, float] = {}
        self._changed = threading.Condition()
        self._wakes_at = float("inf")
        self._thread: threading.Thread | None = None

    def add(self, key: str, seconds: float) -> None:
        due = self._clock() + seconds
        with self._changed:
            self._due[key] = due
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="zimage-deadlines", daemon=True)
                self._thread.start()
            elif due < self._wakes_at:  # sooner than the watchdog means to look: wake it
                self._changed.notify()

    def remove(self, key: str) -> None:
        with self._changed:
            self._due.pop(key, None)

    def _watch(self) -> None:
        while True:
            fired: list[str] = []
            with self._changed:
                now = self._clock()
                fired = [key for key, due in self._due.items() if due <= now]
                for key in fired:
                    del self._due[key]
                self._wakes_at = min(self._due.values(), default=float("inf"))
                if not fired:
                    wait = self._wakes_at - now
                    self._changed.wait(None if wait == float("inf") else wait)
                    continue
            for key in fired:
                self._expired(key)
