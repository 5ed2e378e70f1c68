"""Queues as the tests drive them: one job in, and a clock that moves only when told."""

from __future__ import annotations

import time
from typing import Any

from zimage_serve.queue.contract import JobQueue
from zimage_serve.queue.jobs import Job, NewJob


def enqueue(
    store: JobQueue, job_id: str, number: float, prompt: dict[str, Any], extra_data: dict[str, Any], outputs: list[str]
) -> Job:
    """One job stored, or its refusal raised (QueueFull, DuplicateJob, QuotaExceeded)."""
    [stored] = store.enqueue_many([NewJob.of(Job(job_id, number, prompt, extra_data, outputs))])
    if isinstance(stored, Exception):
        raise stored
    return stored


class Clock:
    """A queue's clock for lease tests: starts at this machine's time, moves by `advance` alone."""

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
