"""What the server, the service and the workers ask of a queue, whatever keeps it.

Two implementations keep it: the SQLite file of one machine (`queue/sqlite_queue.SQLiteQueue`) and a cluster's
Redis (`queue/redis_queue.RedisQueue`). Both pass the same contract tests (`tests/test_queue_contract.py`),
so the layers above never learn which one they talk to. The semantics each method promises:

- Order: the lowest `number` runs first (ComfyUI's priorities, `front` queues below zero), ties in
  submission order; a job is handed out once.
- Every accepted job ends exactly once in history: success, error or interrupted. A claim is a lease to
  one worker, renewed by its heartbeats; a job whose worker is gone (lease run out, process dead) goes
  back to the queue (or fails, once tried `max_attempts` times) when recovered.
- Counts per state are always exact for every connection; history keeps the newest entries.
- Owners: listings, counts, deletes and usage can be narrowed to one owner (the user who queued it).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from typing import Any, Protocol

from zimage_serve.queue.jobs import DuplicateJob, Job, NewJob, QueueFull, QuotaExceeded


class JobQueue(Protocol):
    # Whether the audit log's outbox is in this queue's own store, so that a request's record can be stored
    # in the transaction that stores its job (SQLite's file; not Redis, whose API nodes keep their own logs).
    keeps_records: bool

    # -- submitting --------------------------------------------------------------------------------------
    def next_number(self) -> int:
        """The next number in submission order (counted even if the job is then refused, as ComfyUI does)."""
        ...

    def enqueue_many(self, jobs: Sequence[NewJob]) -> list[Job | QueueFull | DuplicateJob | QuotaExceeded]:
        """Store each job, or say why not (its quota checked in the same transaction), in one transaction:
        each job gets its own answer, the job as stored. A stored job's `record` goes to the audit log's
        outbox in the same transaction (only where `keeps_records`; elsewhere a record is a ValueError)."""
        ...

    def count_images(
        self, owner: str, images: int, when: float | None = None, allowed: int | None = None
    ) -> QuotaExceeded | None:
        """Add `images` (negative: given back) to `owner`'s count of the day of `when` (now: None), never
        below 0. With `allowed`, adding that would pass it adds nothing and answers the quota exceeded."""
        ...

    # -- working -----------------------------------------------------------------------------------------
    def claim(self, worker: str = "", lease_s: float = ...) -> Job | None:
        """The next pending job, now running and leased to `worker` for `lease_s` s; None when none waits."""
        ...

    def finish(
        self,
        job_id: str,
        state: str,
        result: dict[str, Any],
        claim_next: bool = False,
        worker: str = "",
        lease_s: float = ...,
    ) -> Job | None:
        """Record a running job's end and history entry; with `claim_next`, hand `worker` the next job too."""
        ...

    def cancel_waiting(self, job_id: str, result: dict[str, Any]) -> bool:
        """End a waiting job as `interrupted` without running it (its history entry `result`, recorded as any
        job's end is); False if it was not waiting."""
        ...

    def holds(self, job_id: str, worker: str) -> bool:
        """Whether `worker` still runs `job_id` (its lease did not run out and pass the job to another)."""
        ...

    def heartbeat(self, worker: str, lease_s: float = ...) -> int:
        """`worker` lives: its leases hold `lease_s` s more. How many jobs it runs."""
        ...

    def requeue(self, job_id: str) -> bool:
        """A running job back in the queue as if not started (a shutdown cut it off). True if it ran."""
        ...

    def recover(
        self, retry: bool = True, max_attempts: int = 2, cause: str = "the server stopped", worker: str | None = None
    ) -> list[Job]:
        """Jobs whose worker is gone (`worker`, or any whose lease ran out or whose process is dead): queued
        again, or failed once tried `max_attempts` times. Jobs live workers hold are left to them."""
        ...

    # -- reading -----------------------------------------------------------------------------------------
    def get(self, job_id: str) -> Job | None: ...

    def pending(self) -> list[Job]: ...

    def running(self) -> list[Job]: ...

    def queue_items_json(
        self, state: str, limit: int | None = None, offset: int = 0, owner: str | None = None
    ) -> list[str]:
        """ComfyUI's queue items of one state as JSON texts, in queue order."""
        ...

    def position(self, job_id: str, owner: str | None = None) -> int | None:
        """Where a waiting job stands in the queue's order (1: next), among `owner`'s waiting jobs (None:
        everyone's); None when it is not waiting."""
        ...

    def count(self, state: str, owner: str | None = None) -> int: ...

    def count_finished(self, owner: str | None = None) -> int: ...

    def history(self, max_items: int | None = None, offset: int | None = None, owner: str | None = None) -> list[Job]:
        """Finished jobs, oldest first; `max_items` alone gives the newest that many."""
        ...

    def jobs_page(
        self,
        states: Collection[str],
        owner: str | None = None,
        offset: int = 0,
        limit: int | None = None,
        newest_first: bool = True,
    ) -> tuple[list[Job], int]:
        """One page of the jobs in `states` (`owner`'s only, when given), in submission order (newest
        first unless told otherwise), and how many there are in all: read without the jobs off the page."""
        ...

    def usage(self, owner: str | None = None, day: str | None = None) -> list[dict[str, Any]]: ...

    # -- removing ----------------------------------------------------------------------------------------
    def delete_pending(self, ids: Iterable[str] | None = None, owner: str | None = None) -> int: ...

    def delete_history(self, ids: Iterable[str] | None = None, owner: str | None = None) -> int: ...

    def close(self) -> None: ...
