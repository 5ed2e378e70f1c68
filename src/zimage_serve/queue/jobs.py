"""A job and the refusals a queue answers with: what every queue implementation stores and returns."""

from __future__ import annotations

import os
import secrets
import socket
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from zimage_serve import strict_json
from zimage_serve.errors import ZImageError
from zimage_serve.identity import JobContext

STATES = ("pending", "running", "success", "error", "interrupted")
FINISHED = ("success", "error", "interrupted")
NUMBER_LIMIT = 2.0**63  # a job's number (priority) is a float within ±2**63
LEASE_S = 30.0  # how long a claim holds without a heartbeat; a worker renews it every third of that
HISTORY_LIMIT = 10000  # history entries each owner keeps (ComfyUI keeps as many for everyone together)
HISTORY_TOTAL = 50000  # everyone's together: beyond, the largest owners' oldest entries go first


@dataclass(frozen=True)
class HistoryLimits:
    """How much history a queue keeps: each owner's newest `per_owner` entries, and no more than `total`
    for everyone (then trimmed, largest owners first, to 99 % of it, so the trim is not paid per job)."""

    per_owner: int = HISTORY_LIMIT
    total: int = HISTORY_TOTAL


RETRY_QUEUED_S = 5  # Retry-After for a full per-user queue: about when one of the user's jobs ends
RETRY_UNAVAILABLE_S = 5  # Retry-After while the queue cannot be reached


class QueueUnavailable(ZImageError):
    """The queue cannot take calls now (its Redis is down, restarting or full): 503, try again shortly.
    The message names the Redis and is logged; `shown` is what clients are told."""

    retry_after = RETRY_UNAVAILABLE_S

    def __init__(self, message: str, shown: str = "the queue cannot be reached just now; try again shortly") -> None:
        super().__init__(message)
        self.shown = shown


class QueueFull(ZImageError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the queue is full ({limit} jobs waiting); try again later")
        self.limit = limit


class QuotaExceeded(ZImageError):
    """A token's quota (queued jobs, images a day) keeps a job out: 429, with the seconds until it may
    fit again."""

    def __init__(self, quota: str, used: int, allowed: int, retry_after: int) -> None:
        what = {"max_queued": "jobs waiting or running", "images_per_day": "images today (UTC)"}[quota]
        super().__init__(f"{quota}: {used:,} {what} with this one; the token allows {allowed:,}")
        self.quota, self.used, self.allowed, self.retry_after = quota, used, allowed, retry_after


@dataclass(frozen=True)
class Quota:
    """What a token allows its owner in the queue; checked as a job is stored, in the same transaction."""

    max_queued: int | None = None
    images_per_day: int | None = None


class DuplicateJob(ZImageError):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"prompt_id {job_id} already exists")
        self.job_id = job_id


@dataclass
class Job:
    id: str
    number: float
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    outputs: list[str]
    state: str = "pending"
    attempts: int = 0
    created: float = 0.0
    started: float | None = None
    finished: float | None = None
    result: dict[str, Any] = field(default_factory=dict)
    owner: str = ""  # the user who queued it ("" with authentication off)
    context: JobContext = field(default_factory=JobContext)  # the rest of who queued it, and what they may
    worker: str = ""  # the worker running it (`worker_id` below), "" when none
    lease: float | None = None  # until when that worker's claim holds, unless renewed by a heartbeat

    def stored_texts(self) -> StoredTexts:
        """Its prompt, extra_data, outputs and context as the JSON texts a queue stores (strict JSON:
        ValueError for NaN and the like)."""
        return StoredTexts(
            strict_json.dumps(self.prompt),
            strict_json.dumps(self.extra_data),
            strict_json.dumps(self.outputs),
            strict_json.dumps(self.context.to_json()) if self.context != JobContext() else "{}",
        )

    def queue_item(self) -> list[Any]:
        """ComfyUI's QueueItem: [number, prompt_id, prompt, extra_data, outputs_to_execute]."""
        return [comfy_number(self.number), self.id, self.prompt, self.extra_data, self.outputs]

    def history_entry(self) -> dict[str, Any]:
        outputs = self.result.get("outputs", {})
        # ComfyUI's meta names each output node; ours are never inside a subgraph, so it follows from the
        # outputs and is not stored (entries stored with one keep it).
        meta = self.result.get("meta") or {
            n: {"node_id": n, "display_node": n, "parent_node": None, "real_node_id": n} for n in outputs
        }
        return {
            "prompt": self.queue_item(),
            "outputs": outputs,
            "status": {
                "status_str": "success" if self.state == "success" else "error",
                "completed": self.state == "success",
                "messages": self.result.get("messages", []),
            },
            "meta": meta,
        }


class StoredTexts(NamedTuple):
    prompt: str
    extra_data: str
    outputs: str
    context: str


@dataclass(frozen=True)
class NewJob:
    """A job on its way into the queue: its texts, made ahead where a large prompt is off the event loop
    (not in the commit that stores a whole batch), and what its owner's token allows, checked as it is
    stored and never stored itself."""

    job: Job
    texts: StoredTexts
    quota: Quota | None = None
    # The audit record of the request that queues it (JSON), stored in the same transaction, by a queue
    # that keeps the audit log's outbox in its own file (`JobQueue.keeps_records`).
    record: str | None = None

    @classmethod
    def of(cls, job: Job, quota: Quota | None = None) -> NewJob:
        """ValueError for a value that is not JSON (NaN): such a job is never stored."""
        return cls(job, job.stored_texts(), quota if job.owner else None)

    @property
    def images(self) -> int:
        """The images its owner is charged for it now (the graph's count: workflow/image_count.py)."""
        return self.job.context.images


def comfy_number(number: float) -> float | int:
    """Whole numbers as integers, as ComfyUI shows them."""
    return int(number) if float(number).is_integer() else number


def worker_gone(worker: str, lease: float | None, now: float) -> bool:
    """Whether the worker that holds a job can no longer finish it (see `worker_id` for its form)."""
    if lease is None or lease < now or not worker:
        return True
    host, _, rest = worker.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another machine's: its lease decides
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # a process of another user holds the number: alive, not ours to judge
        return False
    return False


def day_of(now: float) -> str:
    """The UTC day a quota counts in."""
    return time.strftime("%Y-%m-%d", time.gmtime(now))


def seconds_to_midnight(now: float) -> int:
    return max(1, 86400 - int(now) % 86400)


def worker_id() -> str:
    """This process's worker name: host, process id and a random part (a restarted process is another)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
