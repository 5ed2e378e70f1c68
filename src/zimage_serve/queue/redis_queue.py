"""The queue and history in Redis: the cluster's one queue, shared by every API node and worker.

It keeps the contract of `queue/contract.JobQueue` as the SQLite file does: each change is one Lua
script (`queue/redis_scripts.py`), atomic and one round trip, so a job is handed out once whichever
worker asks, a claim is a lease renewed by heartbeats, and every job's end is recorded once. Delivery is
at least once: a worker that dies holds its jobs only until its lease runs out, then any worker's
recovery queues them again. With AOF on (`appendonly yes`, `appendfsync everysec` or `always`), a Redis
restart keeps every job it acknowledged (every second's worth at worst with `everysec`).

While Redis cannot be reached every call raises `QueueUnavailable` (the API answers 503 with
Retry-After; workers wait and try again); the connection pool reconnects by itself.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from zimage_serve import strict_json
from zimage_serve.errors import ZImageError
from zimage_serve.identity import JobContext
from zimage_serve.metrics import QUEUE_UNAVAILABLE
from zimage_serve.queue import redis_scripts
from zimage_serve.queue.jobs import (
    FINISHED,
    LEASE_S,
    RETRY_QUEUED_S,
    STATES,
    DuplicateJob,
    HistoryLimits,
    Job,
    NewJob,
    QueueFull,
    QueueUnavailable,
    QuotaExceeded,
    comfy_number,
    day_of,
    seconds_to_midnight,
    worker_gone,
)
from zimage_serve.webhooks.schema import job_labels
from zimage_serve.workflow.events import execution_error

log = logging.getLogger(__name__)
DEFAULT_PREFIX = "zimage:"
FAIL_FAST_S = 1.0
_UNREACHABLE = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.BusyLoadingError, OSError)
T = TypeVar("T")


def connect(url: str) -> redis.Redis:
    """A client for `url` whose calls fail within seconds, not minutes, while Redis is down, and that
    reconnects by itself once it is back (one quick retry covers a connection that went stale).

    A URL without a password takes it from ZIMAGE_REDIS_PASSWORD, or from the file ZIMAGE_REDIS_PASSWORD_FILE
    names (a systemd credential, a Kubernetes secret): that way it is in no command line and no log."""
    password = None if urlsplit(url).password else configured_password()
    return redis.Redis.from_url(
        url,
        **({"password": password} if password else {}),
        decode_responses=True,
        protocol=2,
        socket_connect_timeout=2,
        socket_timeout=10,
        health_check_interval=15,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 1),
        retry_on_error=[redis.ConnectionError],
    )


def configured_password() -> str | None:
    if password := os.environ.get("ZIMAGE_REDIS_PASSWORD"):
        return password
    if name := os.environ.get("ZIMAGE_REDIS_PASSWORD_FILE"):
        try:
            return Path(name).read_text(encoding="utf-8").strip() or None
        except (OSError, UnicodeDecodeError) as exc:
            raise ZImageError(f"ZIMAGE_REDIS_PASSWORD_FILE: cannot read {name}: {exc}") from None
    return None


class RedisQueue:
    keeps_records = False  # each API node keeps its own audit log, in a file of its own

    def __init__(
        self,
        url: str,
        max_pending: int = 10000,
        prefix: str = DEFAULT_PREFIX,
        client: redis.Redis | None = None,
        clock: Callable[[], float] | None = None,
        history: HistoryLimits | None = None,
    ) -> None:
        """`clock`: where leases and times are read (seconds since the epoch); None, Redis' own TIME, which
        every machine of a cluster shares. Tests pass their own, to move time on without sleeping."""
        self.url, self.max_pending, self.prefix, self.clock = url, max_pending, prefix, clock
        self.history_limits = history or HistoryLimits()
        self._history_args = (self.history_limits.per_owner, self.history_limits.total)
        self.redis = client if client is not None else connect(url)
        self._down_until = 0.0
        scripts = (
            "ENQUEUE", "COUNT_IMAGES", "CLAIM", "FINISH", "HEARTBEAT", "RELEASE", "DELETE", "PAGE", "CANCEL_WAITING"
        )  # fmt: skip
        self._scripts = {name: self.redis.register_script(getattr(redis_scripts, name)) for name in scripts}

    def _run(self, script: str, *args: Any) -> Any:
        with self._reachable():
            clock = "" if self.clock is None else f"{self.clock():.6f}"
            return self._scripts[script](args=[self.prefix, clock, *args])

    @contextmanager
    def _reachable(self) -> Iterator[None]:
        """Calls fail fast for a second after one found Redis unreachable: an outage costs each caller
        one connect timeout a second at most, not one per call."""
        if time.monotonic() < self._down_until:
            raise QueueUnavailable(f"the queue (Redis at {self._where()}) could not be reached a moment ago")
        try:
            yield
        except _UNREACHABLE as exc:
            self._down_until = time.monotonic() + FAIL_FAST_S
            QUEUE_UNAVAILABLE.labels("unreachable").inc()
            raise QueueUnavailable(f"the queue (Redis at {self._where()}) cannot be reached: {exc}") from exc
        except redis.ResponseError as exc:
            # At its maxmemory, Redis refuses writes (scripts included): nothing was stored; try again later.
            if not isinstance(exc, redis.exceptions.OutOfMemoryError) and not str(exc).startswith("OOM"):
                raise
            QUEUE_UNAVAILABLE.labels("out_of_memory").inc()
            raise QueueUnavailable(
                f"the queue (Redis at {self._where()}) is full: it is at its maxmemory",
                "the queue is full just now (its store is out of memory); try again shortly",
            ) from exc

    def _where(self) -> str:
        kwargs = self.redis.connection_pool.connection_kwargs
        return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}" if "host" in kwargs else str(kwargs.get("path"))

    def call(self, call: Callable[[], T]) -> T:
        """Run a Redis call: its answer, or QueueUnavailable while Redis cannot be reached."""
        with self._reachable():
            return call()

    def close(self) -> None:
        self.redis.close()

    def durability_warnings(self) -> list[str]:
        """What in this Redis's settings could lose accepted jobs: no append-only file, or an eviction
        policy that may drop keys when memory runs short. Nothing is said where CONFIG is not allowed
        (managed services): their documentation says what they keep."""
        try:
            found = {**self.redis.config_get("appendonly"), **self.redis.config_get("maxmemory-policy")}
        except (redis.RedisError, OSError):
            return []
        warnings = []
        if found.get("appendonly") != "yes":
            warnings.append("Redis has no append-only file (appendonly no): a Redis restart loses the queue")
        policy = found.get("maxmemory-policy", "noeviction")
        if policy != "noeviction":
            warnings.append(f"Redis may evict keys (maxmemory-policy {policy}): jobs can vanish; use noeviction")
        return warnings

    def ping(self) -> bool:
        try:
            return bool(self.redis.ping())
        except _UNREACHABLE:
            return False

    # -- submitting ----------------------------------------------------------------------------------
    def next_number(self) -> int:
        """ComfyUI's counter, shared by every API node (a job's number orders it for the whole cluster)."""
        return int(self.call(lambda: self.redis.incr(self.prefix + "number"))) - 1

    def _now(self) -> float:
        """The time leases are measured by: the clock given, or Redis' own."""
        if self.clock is not None:
            return self.clock()
        seconds, micros = self.call(self.redis.time)
        return float(seconds + micros / 1e6)

    def _now_here(self) -> float:
        """This machine's time (the clock given, if any): days of quotas, as the SQLite queue counts them."""
        return self.clock() if self.clock is not None else time.time()

    def enqueue_many(self, jobs: Sequence[NewJob]) -> list[Job | QueueFull | DuplicateJob | QuotaExceeded]:
        if not jobs:
            return []
        if any(new.record is not None for new in jobs):
            raise ValueError("the Redis queue keeps no audit records: each API node writes its own log")
        now = self._now_here()
        args: list[Any] = [self.max_pending, day_of(now)]
        for new in jobs:
            job, quota = new.job, new.quota
            args += [job.id, repr(float(job.number)), *new.texts, job.owner]
            args += [_limit(quota.max_queued if quota else None), _limit(quota.images_per_day if quota else None)]
            args.append(new.images)
            args += job_labels(job.extra_data)
        answers = self._run("ENQUEUE", *args)
        found: list[Job | QueueFull | DuplicateJob | QuotaExceeded] = []
        for new, answer in zip(jobs, answers, strict=True):
            job = new.job
            kind, _, rest = answer.partition(":")
            if kind == "ok":
                stored = Job(job.id, job.number, job.prompt, job.extra_data, job.outputs, created=float(rest))
                stored.owner, stored.context = job.owner, job.context
                found.append(stored)
            elif kind == "full":
                found.append(QueueFull(self.max_pending))
            elif kind == "dup":
                found.append(DuplicateJob(job.id))
            else:
                which, _, used = rest.partition(":")
                assert new.quota is not None
                if which == "max_queued":
                    assert new.quota.max_queued is not None
                    found.append(QuotaExceeded(which, int(used), new.quota.max_queued, RETRY_QUEUED_S))
                else:
                    assert new.quota.images_per_day is not None
                    allowed = new.quota.images_per_day
                    found.append(QuotaExceeded(which, int(used), allowed, seconds_to_midnight(now)))
        return found

    def count_images(
        self, owner: str, images: int, when: float | None = None, allowed: int | None = None
    ) -> QuotaExceeded | None:
        now = self._now_here() if when is None else when
        answer = self._run("COUNT_IMAGES", owner, day_of(now), images, _limit(allowed))
        if answer == "ok":
            return None
        assert allowed is not None
        return QuotaExceeded("images_per_day", int(answer), allowed, seconds_to_midnight(now))

    def usage(self, owner: str | None = None, day: str | None = None) -> list[dict[str, Any]]:
        day = day or day_of(self._now_here())

        def read() -> tuple[dict[str, str], dict[str, int]]:
            counted = _texts(self.redis.hgetall(f"{self.prefix}usage:{day}"))
            owners = [owner] if owner is not None else sorted(map(str, self.redis.smembers(self.prefix + "owners")))
            with self.redis.pipeline(transaction=False) as pipe:
                for name in owners:
                    pipe.zcard(self._owned(name, "pending"))
                    pipe.zcard(self._owned(name, "running"))
                sizes = pipe.execute()
            queued = {name: sizes[2 * i] + sizes[2 * i + 1] for i, name in enumerate(owners)}
            return counted, queued

        counted, queued = self.call(read)
        found: dict[str, dict[str, Any]] = {}

        def row(name: str) -> dict[str, Any]:
            return found.setdefault(name, {"user": name, "day": day, "jobs_today": 0, "images_today": 0, "queued": 0})

        for field_name, value in counted.items():
            kind, _, name = field_name.partition(":")
            if owner is None or name == owner:
                row(name)["jobs_today" if kind == "jobs" else "images_today"] = int(value)
        for name, n in queued.items():
            if n:
                row(name)["queued"] = n
        return [found[name] for name in sorted(found)]

    # -- working ---------------------------------------------------------------------------------------
    def claim(self, worker: str = "", lease_s: float = LEASE_S) -> Job | None:
        return self._job_or_none(self._run("CLAIM", worker, repr(lease_s)))

    def finish(
        self,
        job_id: str,
        state: str,
        result: dict[str, Any],
        claim_next: bool = False,
        worker: str = "",
        lease_s: float = LEASE_S,
    ) -> Job | None:
        if state not in FINISHED:
            raise ValueError(f"not a final state: {state}")
        text = strict_json.dumps(result)
        fields = self._run(
            "FINISH", job_id, state, text, "1" if claim_next else "0", worker, repr(lease_s), *self._history_args
        )
        return self._job_or_none(fields)

    def cancel_waiting(self, job_id: str, result: dict[str, Any]) -> bool:
        return bool(self._run("CANCEL_WAITING", job_id, strict_json.dumps(result), *self._history_args))

    def holds(self, job_id: str, worker: str) -> bool:
        state, holder = self.call(lambda: self.redis.hmget(f"{self.prefix}job:{job_id}", "state", "worker"))
        return bool(state == "running" and holder == worker)  # the client decodes replies: text

    def heartbeat(self, worker: str, lease_s: float = LEASE_S) -> int:
        return int(self._run("HEARTBEAT", worker, repr(lease_s)))

    def requeue(self, job_id: str) -> bool:
        return bool(self._run("RELEASE", job_id, "requeue", "", "*", "*", *self._history_args))

    def recover(
        self, retry: bool = True, max_attempts: int = 2, cause: str = "the server stopped", worker: str | None = None
    ) -> list[Job]:
        """As the SQLite queue's: the jobs of gone workers (lease run out by Redis' clock, a dead process on
        this host, or `worker`), each moved only if it is still held as it was read, so two nodes
        recovering at once move a job once, and a heartbeat that came meanwhile keeps it."""
        now = self._now()
        moved: list[Job] = []
        for row in self._run("PAGE", "running", 0, -1, "*"):
            fields = _pairs(row)
            job, lease = _job(fields), fields.get("lease", "")
            gone = job.worker == worker if worker is not None else worker_gone(job.worker, job.lease, now)
            if not gone:
                continue
            if retry and job.attempts < max_attempts:
                if self._run("RELEASE", job.id, "retry", "", job.worker, lease, *self._history_args):
                    job.state = "pending"
                    moved.append(job)
                continue
            message = (
                f"{cause} while this prompt ran"
                + (f" ({job.attempts} times)" if job.attempts > 1 else "")
                + "; it was not run again"
            )
            error = execution_error(job.id, message, "ServerRestart")
            result = strict_json.dumps({"outputs": {}, "messages": [["execution_error", error]]})
            if self._run("RELEASE", job.id, "fail", result, job.worker, lease, *self._history_args):
                job.state = "error"
                moved.append(job)
        return moved

    # -- reading ---------------------------------------------------------------------------------------
    def get(self, job_id: str) -> Job | None:
        fields = self.call(lambda: self.redis.hgetall(f"{self.prefix}job:{job_id}"))
        return _job(_texts(fields)) if fields else None

    def pending(self) -> list[Job]:
        return self._jobs("pending", 0, -1)

    def running(self) -> list[Job]:
        return self._jobs("running", 0, -1)

    def queue_items_json(
        self, state: str, limit: int | None = None, offset: int = 0, owner: str | None = None
    ) -> list[str]:
        if state not in ("pending", "running"):
            raise ValueError(f"not a live state: {state}")
        start, stop = offset, -1 if limit is None else offset + limit - 1
        if owner == "" or stop < -1 or (limit is not None and limit <= 0):
            return []
        key = state if owner is None else self._owned(owner, state, prefixed=False)
        rows = self._run("PAGE", key, start, stop, "number", "id", "prompt", "extra_data", "outputs")
        return [
            f"[{json.dumps(comfy_number(float(number)))}, {json.dumps(job_id)}, {prompt}, {extra}, {outputs}]"
            for number, job_id, prompt, extra, outputs in rows
        ]

    def position(self, job_id: str, owner: str | None = None) -> int | None:
        def read() -> Any:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hget(f"{self.prefix}job:{job_id}", "m")
            pipe.hget(f"{self.prefix}job:{job_id}", "state")
            return pipe.execute()

        member, state = self.call(read)
        if member is None or state != "pending":
            return None
        key = self.prefix + "pending" if owner is None else self._owned(owner, "pending")
        rank: Any = self.call(lambda: self.redis.zrank(key, member))
        return None if rank is None else int(rank) + 1

    def count(self, state: str, owner: str | None = None) -> int:
        if owner is None:
            return int(self.call(lambda: self.redis.hget(self.prefix + "counts", state)) or 0)
        if state not in ("pending", "running") or not owner:
            return 0
        return int(self.call(lambda: self.redis.zcard(self._owned(owner, state))))

    def counts(self) -> dict[str, int]:
        """Jobs per state, for the whole cluster (one read)."""
        found = self.call(lambda: self.redis.hgetall(self.prefix + "counts"))
        return {state: int(found.get(state, 0)) for state in ("pending", "running", *FINISHED)}

    def count_finished(self, owner: str | None = None) -> int:
        if owner is not None and not owner:
            return 0
        key = self.prefix + "history" if owner is None else self._owned(owner, "history")
        return int(self.call(lambda: self.redis.zcard(key)))

    def history(self, max_items: int | None = None, offset: int | None = None, owner: str | None = None) -> list[Job]:
        if owner is not None and not owner:
            return []
        total = self.count_finished(owner)
        if offset is None:
            offset = max(0, total - max_items) if max_items is not None else 0
        offset = max(0, offset)
        stop = -1 if max_items is None else offset + max_items - 1
        if max_items is not None and max_items <= 0:
            return []
        key = "history" if owner is None else self._owned(owner, "history", prefixed=False)
        return self._jobs(key, offset, stop)

    def jobs_page(
        self,
        states: Collection[str],
        owner: str | None = None,
        offset: int = 0,
        limit: int | None = None,
        newest_first: bool = True,
    ) -> tuple[list[Job], int]:
        if owner == "" or not set(states) & set(STATES):
            return [], 0
        done = [state for state in FINISHED if state in states]
        keys = [state for state in ("pending", "running") if state in states] + (["history"] if done else [])

        def read() -> tuple[list[Job], int]:
            # Members are the submission sequence and the id ('%016d:id'): ordered as text, in submission order.
            with self.redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.zrange(self.prefix + key if owner is None else self._owned(owner, key), 0, -1)
                found: list[list[str]] = pipe.execute()
            members = [m for listed in found[: len(keys) - bool(done)] for m in listed]
            finished = found[-1] if done else []
            if 0 < len(done) < 3 and finished:  # some finished states only: each one's state decides
                with self.redis.pipeline(transaction=False) as pipe:
                    for m in finished:
                        pipe.hget(f"{self.prefix}job:{m[17:]}", "state")
                    finished = [m for m, state in zip(finished, pipe.execute(), strict=True) if state in done]
            members += finished
            members.sort(reverse=newest_first)
            chosen = members[max(0, offset) :][: limit if limit is not None else None]
            with self.redis.pipeline(transaction=False) as pipe:
                for m in chosen:
                    pipe.hgetall(f"{self.prefix}job:{m[17:]}")
                rows = pipe.execute()
            return [_job(_texts(row)) for row in rows if row], len(members)

        return self.call(read)

    # -- removing --------------------------------------------------------------------------------------
    def delete_pending(self, ids: Iterable[str] | None = None, owner: str | None = None) -> int:
        return self._delete("pending", ids, owner)

    def delete_history(self, ids: Iterable[str] | None = None, owner: str | None = None) -> int:
        return self._delete("history", ids, owner)

    def _delete(self, which: str, ids: Iterable[str] | None, owner: str | None) -> int:
        chosen = None if ids is None else list(ids)
        if chosen is not None and not chosen:
            return 0
        if owner is not None and not owner:
            return 0
        return int(self._run("DELETE", which, "*" if owner is None else owner, *(chosen or ())))

    # -- internals -------------------------------------------------------------------------------------
    def _owned(self, owner: str, state: str, prefixed: bool = True) -> str:
        key = f"owner:{owner}:{state}"
        return self.prefix + key if prefixed else key

    def _jobs(self, key: str, start: int, stop: int) -> list[Job]:
        rows = self._run("PAGE", key, start, stop, "*")
        return [_job(_pairs(row)) for row in rows]

    def _job_or_none(self, fields: Any) -> Job | None:
        return _job(_pairs(fields)) if fields else None


def _limit(value: int | None) -> str:
    return "" if value is None else str(value)


def _texts(found: dict[bytes | str, bytes | str]) -> dict[str, str]:
    """A hash as read (the client decodes every reply, so all of it is text)."""
    return {str(key): str(value) for key, value in found.items()}


def _pairs(flat: list[str]) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _time(text: str | None) -> float | None:
    return float(text) if text else None


def _job(fields: dict[str, str]) -> Job:
    context = fields.get("context", "{}")
    return Job(
        id=fields["id"],
        number=float(fields["number"]),
        prompt=json.loads(fields["prompt"]),
        extra_data=json.loads(fields["extra_data"]),
        outputs=json.loads(fields["outputs"]),
        state=fields["state"],
        attempts=int(fields.get("attempts") or 0),
        created=float(fields.get("created") or 0.0),
        started=_time(fields.get("started")),
        finished=_time(fields.get("finished")),
        result=json.loads(fields["result"]) if fields.get("result") else {},
        owner=fields.get("owner", ""),
        context=JobContext.from_json(json.loads(context)) if context != "{}" else JobContext(),
        worker=fields.get("worker", ""),
        lease=_time(fields.get("lease")),
    )
