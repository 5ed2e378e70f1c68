"""The worker loop's own promises: a job queued while it goes idle is not left waiting for its idle timeout,
and the output fence asks the queue only once a lease may have run out."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.jobs import wait_until
from tests.support.listeners import Quiet
from tests.support.queues import enqueue
from zimage_serve.engine.placement import Placement
from zimage_serve.queue.jobs import LEASE_S, Job
from zimage_serve.queue.sqlite_queue import SQLiteQueue
from zimage_serve.worker import loop
from zimage_serve.worker.loop import Worker
from zimage_serve.workflow.execute import Executor
from zimage_serve.workflow.folders import Folders
from zimage_serve.workflow.nodes import NODES


class WatchedQueue(SQLiteQueue):
    """A queue that runs `after_empty_claim` once, right after a claim that found nothing (before the worker
    goes to sleep), and counts the fence's questions."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.after_empty_claim: Callable[[], None] | None = None
        self.after_claim: Callable[[], None] | None = None  # run right after a claim that took a job
        self.asked_holds = 0

    def claim(self, worker: str = "", lease_s: float = LEASE_S) -> Job | None:
        job = super().claim(worker, lease_s)
        hook, self.after_empty_claim = (self.after_empty_claim, None) if job is None else (None, None)
        if hook is not None:
            hook()
        if job is not None and self.after_claim is not None:
            self.after_claim()
        return job

    def holds(self, job_id: str, worker: str) -> bool:
        self.asked_holds += 1
        return super().holds(job_id, worker)


def picture(prefix: str) -> dict[str, Any]:
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


def test_a_job_queued_between_an_empty_claim_and_the_sleep_runs_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loop, "IDLE_WAIT_S", 600.0)  # a lost wake-up would leave the job for ten minutes
    store = WatchedQueue(tmp_path / "queue.sqlite3")
    worker = Worker(store, Executor(NODES, Folders.default(tmp_path / "data"), Placement.choose("cpu")), Quiet())

    def queued_meanwhile() -> None:  # as the server does: store the job, then wake the worker
        enqueue(store, "meanwhile", 1, picture("meanwhile"), {}, ["2"])
        worker.notify()

    store.after_empty_claim = queued_meanwhile
    worker.start()
    try:
        wait_until(lambda: (job := store.get("meanwhile")) is not None and job.state == "success", 30)
    finally:
        worker.stop(10)


def test_the_fence_asks_the_queue_only_past_half_a_lease(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]  # the workers' lease clock, moved by the test
    monkeypatch.setattr(loop, "lease_clock", lambda: now[0])
    store = WatchedQueue(tmp_path / "queue.sqlite3")
    executor = Executor(NODES, Folders.default(tmp_path / "data"), Placement.choose("cpu"), journal=None)
    worker = Worker(store, executor, Quiet(), lease_s=60)
    for number in range(3):
        enqueue(store, f"fresh{number}", number, picture("fresh"), {}, ["2"])
    worker.start()
    try:
        wait_until(lambda: all(store.get(f"fresh{n}").state == "success" for n in range(3)), 30)  # type: ignore[union-attr]
        assert store.asked_holds == 0  # each run well within its lease: the queue is not asked

        def frozen() -> None:  # the worker stops for 45 s right after its claim: past half its lease
            now[0] += 45.0

        store.after_claim = frozen
        enqueue(store, "late", 9, picture("late"), {}, ["2"])
        worker.notify()
        wait_until(lambda: store.get("late").state == "success", 30)  # type: ignore[union-attr]
    finally:
        worker.stop(10)
    assert store.asked_holds >= 1  # asked, and it still held the job: its end is recorded
