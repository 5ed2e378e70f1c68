"""Waiting for a job's end, the one way every route that answers with a job's result does it.

A waiter is woken by the job's closing event (`execution_success`, `execution_error` or
`execution_interrupted`), which the server receives from its workers whichever way they run: threads,
a worker process, or a cluster's workers over Redis. The worker records the end in the queue before it
sends that event, so the waiter then reads the job once, off the event loop. Events across the network
are sent at most once, so a waiter also looks at the queue every `RECHECK_S` (off the loop too): a lost
event delays the answer, it never hangs it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from zimage_serve.queue.jobs import Job

RECHECK_S = 5.0
LIVE = ("pending", "running")


class JobWaits:
    def __init__(self, read: Callable[[str], Job | None]) -> None:
        """`read(job_id)`: the job as the queue holds it now (None: not there, or not the caller's)."""
        self.read = read
        self._lock = threading.Lock()
        self._waiting: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
        self._waits = 0  # `wait` calls in progress
        # Told the number of waits in progress when it changes: a worker process sends job ends at once
        # only while someone waits for them (worker/process.py).
        self.on_count: Callable[[int], None] = lambda count: None

    @property
    def count(self) -> int:
        return self._waits

    def _counted(self, change: int) -> None:
        with self._lock:
            self._waits += change
            count = self._waits
        self.on_count(count)

    def ended(self, job_id: str) -> None:
        """A job's closing event arrived (from any thread)."""
        with self._lock:
            waiters = self._waiting.pop(job_id, [])
        for loop, event in waiters:
            loop.call_soon_threadsafe(event.set)

    async def wait(self, job_id: str, gone: Awaitable[None] | None = None) -> Job | None:
        """The job once it has ended (None if it left the queue unrun); with `gone`, an awaitable that
        completes when nobody waits any more (a client that left), the job as it is then."""
        event = asyncio.Event()
        entry = (asyncio.get_running_loop(), event)
        self._counted(1)  # before the job is read: its end, if it comes after, is sent at once
        with self._lock:
            self._waiting.setdefault(job_id, []).append(entry)
        left: asyncio.Future[None] | None = asyncio.ensure_future(gone) if gone is not None else None
        try:
            while True:
                job = await asyncio.to_thread(self.read, job_id)
                if job is None or job.state not in LIVE:
                    return job
                woken: asyncio.Future[bool] = asyncio.ensure_future(event.wait())
                waits: set[asyncio.Future[Any]] = {woken} if left is None else {woken, left}
                done, _ = await asyncio.wait(waits, timeout=RECHECK_S, return_when=asyncio.FIRST_COMPLETED)
                woken.cancel()
                if left is not None and left in done:
                    return job
                event.clear()
                with self._lock:  # woken: `ended` took this waiter out; look at the queue once more
                    listed = self._waiting.setdefault(job_id, [])
                    if entry not in listed:
                        listed.append(entry)
        finally:
            if left is not None:
                left.cancel()
            with self._lock:
                listed = self._waiting.get(job_id, [])
                if entry in listed:
                    listed.remove(entry)
                if not listed:
                    self._waiting.pop(job_id, None)
            self._counted(-1)
