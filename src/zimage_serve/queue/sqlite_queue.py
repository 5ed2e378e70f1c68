"""The persistent queue and history: one SQLite file (WAL) under the data dir.

A job is a row that moves pending → running → success / error / interrupted. Claiming the next job
reads and marks it in one write transaction, so a job is handed out once even with several workers; a
crash leaves rows in `running`, and `recover()` at the next start puts them back in the queue (or marks
them failed) so every accepted job ends exactly once. Priorities are ComfyUI's: the lowest `number` runs
first, ties in submission order.

Counts per state live in the file too, kept by triggers in the same transactions as the rows, so they
are right for every process using the file (the server and its device worker) and reading
`queue_remaining` never counts rows.

A job has an owner (the user who queued it; "" with authentication off) and the rest of who queued it
(`context`); listings, deletes and quotas can be narrowed to one owner. A trigger copies each job's end
into the audit log's outbox in the transaction that records it (security/audit.py).
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from zimage_serve import sqlite_busy, strict_json
from zimage_serve.identity import JobContext
from zimage_serve.private import private_file
from zimage_serve.queue.jobs import (
    FINISHED,
    LEASE_S,
    NUMBER_LIMIT,
    RETRY_QUEUED_S,
    STATES,
    DuplicateJob,
    HistoryLimits,
    Job,
    NewJob,
    QueueFull,
    QuotaExceeded,
    comfy_number,
    day_of,
    seconds_to_midnight,
    worker_gone,
)
from zimage_serve.queue.sqlite_schema import DONE, LIVE, STRICT_VERSION, create_or_upgrade
from zimage_serve.security.audit_files import REQUEST_STATE
from zimage_serve.sqlite_checkpoints import BACKSTOP_PAGES, Checkpoints
from zimage_serve.workflow.events import execution_error

log = logging.getLogger(__name__)

OWNED = "owner = ? AND owner <> ''"
PENDING_ORDER = f"{LIVE} AND state = 'pending' ORDER BY number, seq"
# Running jobs are found on the way through jobs_live (no index of their own to update per job), by start.
RUNNING_ORDER = f"{LIVE} AND state = 'running' ORDER BY started"
# The next job by the jobs_live index: past the few running ones, however many wait. Read, then marked
# running in the same write transaction; not one UPDATE ... RETURNING, for which SQLite fills a temporary
# table on every call (13 thousand instructions more per job, counted with callgrind).
NEXT_PENDING = f"SELECT * FROM jobs WHERE {PENDING_ORDER} LIMIT 1"
# Fair share (`_next_pending`), each by the per-owner indexes: the jobs each owner runs, the next owner in
# name order, and an owner's first waiting job.
RUNNING_PER_OWNER = "SELECT owner, COUNT(*) FROM jobs WHERE state = 'running' AND owner <> '' GROUP BY owner"
NEXT_OWNER = f"SELECT owner FROM jobs WHERE {LIVE} AND owner <> '' AND owner > ? ORDER BY owner LIMIT 1"
OWNERS_FIRST = f"SELECT * FROM jobs WHERE {OWNED} AND {PENDING_ORDER} LIMIT 1"
OWNED_LIVE = f"SELECT COUNT(*) FROM jobs WHERE {LIVE} AND owner <> ''"  # from the index alone
# Whether anyone but the first waiting job's owner (`?1`) has a job waiting: an owner before it, one after
# it (two seeks in the per-owner index), or the local operator (live jobs that are nobody's). When nobody
# has, fair share has nothing to weigh: the queue's first job is the next.
OTHERS_WAITING = f"""SELECT
    EXISTS(SELECT 1 FROM jobs WHERE {LIVE} AND owner <> '' AND owner < ?1 AND state = 'pending'),
    EXISTS(SELECT 1 FROM jobs WHERE {LIVE} AND owner <> '' AND owner > ?1 AND state = 'pending'),
    ?1 <> '' AND COALESCE((SELECT SUM(n) FROM state_counts WHERE state = 'pending' OR state = 'running'), 0)
        > (SELECT COUNT(*) FROM jobs WHERE {LIVE} AND owner <> '')"""
LOCAL_FIRST = f"SELECT * FROM jobs WHERE owner = '' AND {PENDING_ORDER} LIMIT 1"
MARK_RUNNING = (
    "UPDATE jobs SET state = 'running', started = ?, attempts = attempts + 1, worker = ?, lease = ? WHERE seq = ?"
)


class _Claim(NamedTuple):
    """A pending job's row as a claim read it, and the values the claim marked it running with."""

    row: sqlite3.Row
    started: float
    worker: str
    lease: float


class SQLiteQueue:
    keeps_records = True  # the audit tables are in the queue file (security/audit_files.py)

    def __init__(
        self,
        path: Path,
        max_pending: int = 10000,
        clock: Callable[[], float] = time.time,
        history: HistoryLimits | None = None,
    ) -> None:
        """`clock`: the time of submissions, starts, ends and leases (seconds since the epoch); tests pass
        their own, to move time on without sleeping."""
        self.path, self.max_pending, self.clock = private_file(path), max_pending, clock
        self.history_limits = history or HistoryLimits()
        self._lock = threading.Lock()
        self._unreadable_claims: list[tuple[_Claim, str]] = []  # see _quarantine_unreadable_claims
        self._unreadable_lock = threading.Lock()
        self._number_lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives a process crash (SIGKILL); only a power cut can lose the
        # last transactions. That is the trade ComfyUI users ask for at 1000s of submissions per second.
        self._db.execute("PRAGMA synchronous=NORMAL")
        # No checkpoint inside a commit but as a backstop: one waits for the disk, and the request or job that
        # happened to commit then waited with it (~21 ms). A thread checkpoints instead (sqlite_checkpoints),
        # twice a second at most, so that each hot page (the table and index leaves, the state counts) is
        # copied once for many commits.
        self._db.execute(f"PRAGMA wal_autocheckpoint={BACKSTOP_PAGES}")
        self._checkpoints = Checkpoints(self.path)
        # No memory-mapped reads: the other process (server or worker) commits between almost every two
        # transactions of this one, and SQLite then unmaps and maps the file again, which costs more than
        # reading the few pages back (measured, enqueue 149 → 128 µs, finish and claim 229 → 208 µs).
        self._db.execute("PRAGMA mmap_size=0")
        self._db.execute(f"PRAGMA busy_timeout={int(sqlite_busy.BUSY_TIMEOUT_S * 1000)}")  # setting up, once
        create_or_upgrade(self._db)
        if self._db.execute("PRAGMA user_version").fetchone()[0] < STRICT_VERSION:
            self._quarantine_unreadable()
            self._db.execute(f"PRAGMA user_version={STRICT_VERSION}")
        self._db.execute("PRAGMA busy_timeout=0")  # from now on waits for locks are sqlite_busy's, see there
        # The counter is saved on close; after a crash, one past the highest number still stored (numbers a
        # client gave are floats: only those a counter could have made count).
        saved = self._db.execute("SELECT value FROM counters WHERE name = 'number' AND typeof(value) = 'integer'")
        highest = self._db.execute(
            "SELECT MAX(number) FROM jobs WHERE number < ? AND number > ?", (NUMBER_LIMIT, -NUMBER_LIMIT)
        ).fetchone()[0]
        counted = saved.fetchone()
        self._number = max(int(counted[0]) if counted else 0, int(highest) + 1 if highest is not None else 0)

    def _quarantine_unreadable(self) -> None:
        """Move every row this version cannot read back as strict JSON out of the jobs table, once per file."""
        with self._writing():
            rows = self._execute("SELECT * FROM jobs").fetchall()
            for row in rows:
                reason = _unreadable(row, strict=True)
                if reason is not None:
                    self._quarantine(row, reason)

    def close(self) -> None:
        self._checkpoints.close()
        with self._lock, self._number_lock:
            self._execute(
                "INSERT INTO counters (name, value) VALUES ('number', ?) "
                "ON CONFLICT(name) DO UPDATE SET value = max(value, excluded.value)",
                (self._number,),
            )
            self._db.close()

    # -- submitting --------------------------------------------------------------------------------
    def next_number(self) -> int:
        """ComfyUI's server counter, kept across restarts (saved on close, else read back from the jobs)."""
        with self._number_lock:  # not the database lock: a commit in progress must not hold up numbering
            self._number += 1
            return self._number - 1

    def enqueue_many(self, jobs: Sequence[NewJob]) -> list[Job | QueueFull | DuplicateJob | QuotaExceeded]:
        """Store new jobs in one transaction (one commit for a burst of submissions); each one comes
        back stored, or as the error that kept it out (the queue full, its owner's quota, its id taken).
        An owner's jobs and images of the day are counted in the same transaction."""
        now = self.clock()
        found: list[Job | QueueFull | DuplicateJob | QuotaExceeded] = []
        used: dict[str, list[int]] = {}  # owner → [jobs, images] stored in this transaction
        with self._writing():
            pending = self._count("pending")
            for new in jobs:
                job = new.job
                if pending >= self.max_pending:
                    found.append(QueueFull(self.max_pending))
                    continue
                over = self._over_quota(new, now, used.get(job.owner, [0, 0])[1]) if job.owner else None
                if over is not None:
                    found.append(over)
                    continue
                # ON CONFLICT, not INSERT OR IGNORE: that would also drop, silently, a row that breaks a NOT
                # NULL constraint (a NaN number reads as NULL), answered as a duplicate.
                inserted = self._execute(
                    "INSERT INTO jobs (id, number, prompt, extra_data, outputs, state, created, owner, context) "
                    "VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, ?) ON CONFLICT(id) DO NOTHING",
                    (job.id, job.number, *new.texts[:3], now, job.owner, new.texts.context),  # prompt, extra, outputs
                ).rowcount
                if not inserted:
                    found.append(DuplicateJob(job.id))
                    continue
                if new.record is not None:  # the request's audit record, in the commit that answers it
                    self._execute(
                        "INSERT INTO audit_outbox (job_id, owner, context, state, record) VALUES (?, ?, '', ?, ?)",
                        (job.id, job.owner, REQUEST_STATE, new.record),
                    )
                if job.owner:
                    counted = used.setdefault(job.owner, [0, 0])
                    counted[0] += 1
                    counted[1] += new.images
                pending += 1
                found.append(
                    Job(
                        job.id,
                        job.number,
                        job.prompt,
                        job.extra_data,
                        job.outputs,
                        created=now,
                        owner=job.owner,
                        context=job.context,
                    )
                )
            for owner, (count, images) in used.items():  # one row change per user, not per job
                self._execute(
                    "INSERT INTO usage (owner, day, jobs, images) VALUES (?, ?, ?, ?) ON CONFLICT(owner, day) "
                    "DO UPDATE SET jobs = jobs + excluded.jobs, images = images + excluded.images",
                    (owner, day_of(now), count, images),
                )
        return found

    def _over_quota(self, new: NewJob, now: float, images_so_far: int) -> QuotaExceeded | None:
        """Within the enqueue transaction: the quota this job would break, if any (`images_so_far`: the
        owner's images stored earlier in the same transaction, not yet in the usage table)."""
        job, quota = new.job, new.quota
        if quota is None:
            return None
        if quota.max_queued is not None:
            queued = self._execute(f"SELECT COUNT(*) FROM jobs WHERE {OWNED} AND {LIVE}", (job.owner,)).fetchone()[0]
            if queued + 1 > quota.max_queued:
                return QuotaExceeded("max_queued", queued + 1, quota.max_queued, RETRY_QUEUED_S)
        if quota.images_per_day is not None:
            row = self._execute("SELECT images FROM usage WHERE owner = ? AND day = ?", (job.owner, day_of(now)))
            today = row.fetchone()
            used = (today[0] if today else 0) + images_so_far + new.images
            if used > quota.images_per_day:
                return QuotaExceeded("images_per_day", used, quota.images_per_day, seconds_to_midnight(now))
        return None

    def count_images(
        self, owner: str, images: int, when: float | None = None, allowed: int | None = None
    ) -> QuotaExceeded | None:
        now = self.clock() if when is None else when
        day = day_of(now)
        with self._writing():
            row = self._execute("SELECT images FROM usage WHERE owner = ? AND day = ?", (owner, day)).fetchone()
            used = (row[0] if row else 0) + images
            if images > 0 and allowed is not None and used > allowed:
                return QuotaExceeded("images_per_day", used, allowed, seconds_to_midnight(now))
            self._execute(
                "INSERT INTO usage (owner, day, jobs, images) VALUES (?, ?, 0, max(0, ?)) ON CONFLICT(owner, day) "
                "DO UPDATE SET images = max(0, images + ?)",
                (owner, day, images, images),
            )
        return None

    def usage(self, owner: str | None = None, day: str | None = None) -> list[dict[str, Any]]:
        """Jobs and images queued per owner on `day` (today, UTC), with each owner's jobs queued now."""
        day = day or day_of(self.clock())
        where, args = ("owner = ? AND day = ?", (owner, day)) if owner is not None else ("day = ?", (day,))
        with self._lock:
            rows = self._execute(f"SELECT owner, jobs, images FROM usage WHERE {where} ORDER BY owner", args).fetchall()
            queued = dict(
                self._execute(
                    f"SELECT owner, COUNT(*) FROM jobs WHERE {LIVE} AND owner <> ''"
                    + (" AND owner = ?" if owner is not None else "")
                    + " GROUP BY owner",
                    (owner,) if owner is not None else (),
                ).fetchall()
            )
        found = {o: {"user": o, "day": day, "jobs_today": j, "images_today": i, "queued": 0} for o, j, i in rows}
        for o, n in queued.items():
            found.setdefault(o, {"user": o, "day": day, "jobs_today": 0, "images_today": 0, "queued": 0})["queued"] = n
        return [found[o] for o in sorted(found)]

    # -- working -----------------------------------------------------------------------------------
    def claim(self, worker: str = "", lease_s: float = LEASE_S) -> Job | None:
        """Hand out the next pending job (lowest number, then oldest) and mark it running, leased to
        `worker` for `lease_s` seconds."""
        self._quarantine_unreadable_claims()
        while True:
            with self._writing():
                claimed = self._claim_next(worker, lease_s)
            if claimed is None:
                return None
            job = self._read_claimed(claimed)
            if job is not None:
                return job

    def finish(
        self,
        job_id: str,
        state: str,
        result: dict[str, Any],
        claim_next: bool = False,
        worker: str = "",
        lease_s: float = LEASE_S,
    ) -> Job | None:
        """Record a running job's end and its history entry (outputs and status messages), and with
        `claim_next` hand out the next job to `worker` in the same transaction (one commit per job, not two)."""
        if state not in FINISHED:
            raise ValueError(f"not a final state: {state}")
        stored = strict_json.dumps(result)  # before the write lock, which the server's submissions wait for
        with self._writing():
            ended = self._execute(
                # Fenced: a worker whose lease ran out, and whose job another worker took, records nothing.
                "UPDATE jobs SET state = ?, finished = ?, result = ? WHERE id = ? AND state = 'running' "
                "AND (? = '' OR worker = ?) RETURNING owner",
                (state, self.clock(), stored, job_id, worker, worker),
            ).fetchone()
            if ended is not None:
                self._trim_history(str(ended[0]))
            claimed = self._claim_next(worker, lease_s) if claim_next else None
        if claimed is None:
            return None
        job = self._read_claimed(claimed)
        return job if job is not None else self.claim(worker, lease_s)

    def cancel_waiting(self, job_id: str, result: dict[str, Any]) -> bool:
        with self._writing():
            ended = self._execute(
                "UPDATE jobs SET state = 'interrupted', finished = ?, result = ? WHERE id = ? AND state = 'pending' "
                "RETURNING owner",
                (self.clock(), strict_json.dumps(result), job_id),
            ).fetchone()
            if ended is not None:
                self._trim_history(str(ended[0]))
        return ended is not None

    def holds(self, job_id: str, worker: str) -> bool:
        with self._lock:
            row = self._execute(
                f"SELECT 1 FROM jobs WHERE id = ? AND {LIVE} AND state = 'running' AND worker = ?", (job_id, worker)
            ).fetchone()
        return row is not None

    def heartbeat(self, worker: str, lease_s: float = LEASE_S) -> int:
        """`worker` is alive: its running jobs' leases hold `lease_s` seconds more. How many it runs."""
        with self._writing():
            return self._execute(
                f"UPDATE jobs SET lease = ? WHERE {LIVE} AND state = 'running' AND worker = ?",
                (self.clock() + lease_s, worker),
            ).rowcount

    def recover(
        self,
        retry: bool = True,
        max_attempts: int = 2,
        cause: str = "the server stopped",
        worker: str | None = None,
    ) -> list[Job]:
        """Jobs whose worker is gone go back to the queue, or fail once tried `max_attempts` times (a
        prompt that crashes the worker twice is not run a third time); `cause` says what stopped them.

        Gone: `worker` when named (its process died); otherwise every worker whose lease ran out, that ran
        on this host in a process that no longer exists, or that took no lease (older files). A job a live
        worker elsewhere holds is left to it."""
        with self._writing():
            rows = self._execute(f"SELECT * FROM jobs WHERE {RUNNING_ORDER}").fetchall()
            now = self.clock()
            jobs = [
                job
                for job in self._readable(rows)
                if (job.worker == worker if worker is not None else worker_gone(job.worker, job.lease, now))
            ]
            for job in jobs:
                if retry and job.attempts < max_attempts:
                    self._execute(
                        "UPDATE jobs SET state = 'pending', started = NULL, worker = '', lease = NULL WHERE id = ?",
                        (job.id,),
                    )
                    job.state = "pending"
                else:
                    message = (
                        f"{cause} while this prompt ran"
                        + (f" ({job.attempts} times)" if job.attempts > 1 else "")
                        + "; it was not run again"
                    )
                    error = execution_error(job.id, message, "ServerRestart")
                    result = {"outputs": {}, "messages": [["execution_error", error]]}
                    self._execute(
                        "UPDATE jobs SET state = 'error', finished = ?, result = ? WHERE id = ?",
                        (self.clock(), strict_json.dumps(result), job.id),
                    )
                    job.state = "error"
            return jobs

    def requeue(self, job_id: str) -> bool:
        """Put a running job back in the queue as if it had not been started (a shutdown cut it off: that
        is no attempt of its own). True if it was running."""
        with self._writing():
            return bool(
                self._execute(
                    "UPDATE jobs SET state = 'pending', started = NULL, attempts = max(0, attempts - 1), "
                    "worker = '', lease = NULL WHERE id = ? AND state = 'running'",
                    (job_id,),
                ).rowcount
            )

    def quarantined(self) -> list[dict[str, Any]]:
        """The rows taken out of the queue because they could not be read: id, state, reason, when."""
        with self._lock:
            rows = self._execute("SELECT id, state, reason, quarantined FROM quarantine ORDER BY seq").fetchall()
        return [{"id": i, "state": st, "reason": r, "quarantined": t} for i, st, r, t in rows]

    # -- reading -----------------------------------------------------------------------------------
    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        found = self._read_outside(None if row is None else [row])
        return found[0] if found else None

    def pending(self) -> list[Job]:
        return self._select(PENDING_ORDER)

    def running(self) -> list[Job]:
        return self._select(RUNNING_ORDER)

    def queue_items_json(
        self, state: str, limit: int | None = None, offset: int = 0, owner: str | None = None
    ) -> list[str]:
        """ComfyUI's QueueItems of the running or pending jobs, in order (`limit` of them from `offset`;
        only `owner`'s when given), as JSON texts spliced from the stored JSON: a long queue is not parsed
        and encoded again for every GET /queue. Stored JSON is strict (see `strict_json`, and the scan of
        older files at open)."""
        where = {"pending": PENDING_ORDER, "running": RUNNING_ORDER}[state]
        page: tuple[Any, ...] = (-1 if limit is None else limit, offset)
        if owner is not None:
            where, page = f"{OWNED} AND {where}", (owner, *page)
        with self._lock:
            rows = self._execute(
                f"SELECT number, id, prompt, extra_data, outputs FROM jobs WHERE {where} LIMIT ? OFFSET ?", page
            ).fetchall()
        return [
            f"[{json.dumps(comfy_number(number))}, {json.dumps(job_id)}, {prompt}, {extra}, {outputs}]"
            for number, job_id, prompt, extra, outputs in rows
        ]

    def position(self, job_id: str, owner: str | None = None) -> int | None:
        with self._lock:
            row = self._execute(
                f"SELECT number, seq FROM jobs WHERE id = ? AND {LIVE} AND state = 'pending'", (job_id,)
            ).fetchone()
            if row is None:
                return None
            ahead = "(number < ? OR (number = ? AND seq < ?))"
            args: tuple[Any, ...] = (row["number"], row["number"], row["seq"])
            if owner is None:
                sql = f"SELECT COUNT(*) FROM jobs WHERE {LIVE} AND state = 'pending' AND {ahead}"
            else:
                sql = f"SELECT COUNT(*) FROM jobs WHERE {OWNED} AND {LIVE} AND state = 'pending' AND {ahead}"
                args = (owner, *args)
            return int(self._execute(sql, args).fetchone()[0]) + 1

    def count(self, state: str, owner: str | None = None) -> int:
        """Jobs in `state` (everyone's from the kept counts, or `owner`'s, counted)."""
        with self._lock:
            if owner is None:
                return self._count(state)
            found = self._execute(f"SELECT COUNT(*) FROM jobs WHERE {OWNED} AND {LIVE} AND state = ?", (owner, state))
            return int(found.fetchone()[0])

    def history(self, max_items: int | None = None, offset: int | None = None, owner: str | None = None) -> list[Job]:
        """Finished jobs oldest first (`owner`'s only, when given); `max_items` alone means the newest N
        (ComfyUI's rule)."""
        total = self.count_finished(owner)
        if offset is None:
            offset = max(0, total - max_items) if max_items is not None else 0
        limit = max_items if max_items is not None else -1
        if owner is None:
            return self._select(f"{DONE} ORDER BY finished, seq LIMIT ? OFFSET ?", (limit, max(0, offset)))
        return self._select(
            f"{OWNED} AND {DONE} ORDER BY finished, seq LIMIT ? OFFSET ?", (owner, limit, max(0, offset))
        )

    def jobs_page(
        self,
        states: Collection[str],
        owner: str | None = None,
        offset: int = 0,
        limit: int | None = None,
        newest_first: bool = True,
    ) -> tuple[list[Job], int]:
        chosen = [state for state in STATES if state in states]
        if not chosen or owner == "":
            return [], 0
        where = f"({' OR '.join('state = ?' for _ in chosen)})" + (f" AND {OWNED}" if owner is not None else "")
        args: tuple[Any, ...] = (*chosen, *((owner,) if owner is not None else ()))
        with self._lock:
            total = int(self._execute(f"SELECT COUNT(*) FROM jobs WHERE {where}", args).fetchone()[0])
        order = "DESC" if newest_first else "ASC"
        page = self._select(
            f"{where} ORDER BY seq {order} LIMIT ? OFFSET ?", (*args, -1 if limit is None else limit, max(0, offset))
        )
        return page, total

    def count_finished(self, owner: str | None = None) -> int:
        with self._lock:
            if owner is None:
                return self._count_finished()
            return int(self._execute(f"SELECT COUNT(*) FROM jobs WHERE {OWNED} AND {DONE}", (owner,)).fetchone()[0])

    # -- removing ----------------------------------------------------------------------------------
    def delete_pending(self, ids: Iterable[str] | None = None, owner: str | None = None) -> int:
        """Remove waiting jobs (all of them when `ids` is None; only `owner`'s when given); running and
        finished ones stay."""
        return self._delete(f"{LIVE} AND state = 'pending'", ids, owner)

    def delete_history(self, ids: Iterable[str] | None = None, owner: str | None = None) -> int:
        return self._delete(DONE, ids, owner)

    def _delete(self, where: str, ids: Iterable[str] | None, owner: str | None) -> int:
        args: tuple[Any, ...] = ()
        if owner is not None:
            where, args = f"{OWNED} AND {where}", (owner,)
        with self._lock:
            if ids is None:
                return self._execute(f"DELETE FROM jobs WHERE {where}", args).rowcount
            return sum(self._execute(f"DELETE FROM jobs WHERE id = ? AND {where}", (i, *args)).rowcount for i in ids)

    # -- internals ---------------------------------------------------------------------------------
    def _execute(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Cursor:
        """Run a statement, waiting in short steps while another process holds the lock it needs."""
        return sqlite_busy.execute(self._db, sql, args)

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """One write transaction under this store's lock: committed at the end, rolled back on any error."""
        with sqlite_busy.transaction(self._db, self._lock):
            yield
        self._checkpoints.committed()

    def _next_pending(self) -> sqlite3.Row | None:
        """Within a write transaction: the next job by fair share. With no owners (authentication off) that
        is the queue's order, from one index entry. With owners, the first waiting job (by its number) of
        the owner with the fewest jobs running, ties to the owner whose that job was submitted first: a
        number or `front` orders only the owner's own jobs, never another's; each owner is found by
        one seek in the per-owner index; the local operator's jobs (from before authentication was on, say)
        count as one more owner's."""
        head: sqlite3.Row | None = self._execute(NEXT_PENDING).fetchone()
        if head is None or not any(self._execute(OTHERS_WAITING, (head[12],)).fetchone()):
            return head
        running = dict(self._execute(RUNNING_PER_OWNER).fetchall())
        running[""] = self._count("running") - sum(running.values())
        candidates: list[sqlite3.Row] = [head]
        owner = ""
        if head[12] != "":  # is a job of the local operator waiting, not first? (counted only then)
            local_live = self._count("pending") + self._count("running") - self._execute(OWNED_LIVE).fetchone()[0]
            local = self._execute(LOCAL_FIRST).fetchone() if local_live > running[""] else None
            if local is not None:
                candidates.append(local)
        while (found := self._execute(NEXT_OWNER, (owner,)).fetchone()) is not None:
            owner = found[0]
            first = self._execute(OWNERS_FIRST, (owner,)).fetchone()
            if first is not None and first[1] != head[1]:
                candidates.append(first)
        # row[12] is the owner, row[0] the submission sequence (sqlite_schema.JOBS_COLUMNS' order)
        return min(candidates, key=lambda row: (running.get(row[12], 0), row[0]))

    def _claim_next(self, worker: str = "", lease_s: float = LEASE_S) -> _Claim | None:
        """Within a write transaction: the next pending job's row, now marked running and leased to `worker`.
        Its JSON is read by `_read_claimed` once the transaction is over: the other process's transactions
        wait for this one, and reading a prompt is the longest part of a claim."""
        row = self._next_pending()
        if row is None:
            return None
        started = self.clock()
        self._execute(MARK_RUNNING, (started, worker, started + lease_s, row[0]))  # seq
        return _Claim(row, started, worker, started + lease_s)

    def _read_claimed(self, claim: _Claim) -> Job | None:
        """The job a claim took, running; None if its row cannot be read (then quarantined: a row no worker
        could run is put out of the way, never crash-looped on)."""
        try:
            job = self._job(claim.row)
            job.attempts += 1
        except Exception as exc:  # anything a damaged row can raise
            with self._unreadable_lock:
                self._unreadable_claims.append((claim, _reason(exc)))
            self._quarantine_unreadable_claims()
            return None
        job.state, job.started = "running", claim.started
        job.worker, job.lease = claim.worker, claim.lease
        return job

    def _quarantine_unreadable_claims(self) -> None:
        """Quarantine the rows claims took and could not read. Each is quarantined only while it is still its
        claim's: its lease may have run out and another worker taken it. A claim whose quarantine fails (the
        file locked past the timeout, say) is tried again by the next claim: the row, marked running by this
        worker, whose heartbeats renew its lease, would otherwise stay running for good."""
        if not self._unreadable_claims:
            return
        with self._unreadable_lock:  # taken before the store's lock, never after
            while self._unreadable_claims:
                claim, reason = self._unreadable_claims[0]
                with self._writing():
                    still = self._execute(
                        "SELECT 1 FROM jobs WHERE seq = ? AND state = 'running' AND worker = ? AND started = ?",
                        (claim.row[0], claim.worker, claim.started),
                    ).fetchone()
                    if still is not None:
                        self._quarantine(claim.row, reason)
                self._unreadable_claims.pop(0)

    def _count(self, state: str) -> int:
        row = self._execute("SELECT n FROM state_counts WHERE state = ?", (state,)).fetchone()
        return int(row[0]) if row is not None else 0

    def _count_finished(self) -> int:
        # All states but the two live ones; no `state IN (...)`, for which SQLite builds a temporary table on
        # every call (~1 % of a queued job's instructions, counted with callgrind).
        row = self._execute("SELECT SUM(n) FROM state_counts WHERE state <> 'pending' AND state <> 'running'")
        return int(row.fetchone()[0] or 0)

    def _trim_history(self, owner: str) -> None:
        """`owner` keeps their newest entries (HistoryLimits.per_owner); past the total for everyone, the
        largest owners lose their oldest first, down to 99 % of it (so this is not paid per job)."""
        limits = self.history_limits
        row = self._execute("SELECT n FROM history_owners WHERE owner = ?", (owner,)).fetchone()
        if row is not None and row[0] > limits.per_owner:
            self._drop_oldest(owner, row[0] - limits.per_owner)
        total = self._count_finished()
        if total <= limits.total:
            return
        target = limits.total - limits.total // 100
        while total > target:
            largest = self._execute("SELECT owner, n FROM history_owners ORDER BY n DESC LIMIT 2").fetchall()
            if not largest or largest[0][1] <= 0:
                return
            runner_up = largest[1][1] if len(largest) > 1 else 0
            self._drop_oldest(str(largest[0][0]), min(total - target, max(1, largest[0][1] - runner_up)))
            left = self._count_finished()
            if left == total:
                return
            total = left

    def _drop_oldest(self, owner: str, count: int) -> None:
        mine = OWNED if owner else "owner = ?"  # owner <> '': SQLite may use the per-owner index
        self._execute(
            f"DELETE FROM jobs WHERE seq IN (SELECT seq FROM jobs WHERE {mine} AND {DONE} "
            "ORDER BY finished, seq LIMIT ?)",
            (owner, count),
        )

    def _select(self, where: str, args: tuple[Any, ...] = ()) -> list[Job]:
        with self._lock:
            rows = self._execute(f"SELECT * FROM jobs WHERE {where}", args).fetchall()
        return self._read_outside(rows)

    def _read_outside(self, rows: list[sqlite3.Row] | None) -> list[Job]:
        """Jobs from rows read outside a write transaction; rows that cannot be read are quarantined."""
        if not rows:
            return []
        jobs: list[Job] = []
        bad: list[tuple[sqlite3.Row, str]] = []
        for row in rows:
            try:
                jobs.append(self._job(row))
            except Exception as exc:  # anything a damaged row can raise; it is quarantined, never fatal
                bad.append((row, _reason(exc)))
        if bad:
            with self._writing():
                for row, reason in bad:
                    self._quarantine(row, reason)
        return jobs

    def _readable(self, rows: list[sqlite3.Row]) -> list[Job]:
        """Within a write transaction: jobs from rows, the unreadable ones quarantined."""
        jobs: list[Job] = []
        for row in rows:
            try:
                jobs.append(self._job(row))
            except Exception as exc:  # anything a damaged row can raise; it is quarantined, never fatal
                self._quarantine(row, _reason(exc))
        return jobs

    def _quarantine(self, row: sqlite3.Row, reason: str) -> None:
        """Within a write transaction: move a row the queue cannot use out of it, keeping its text."""
        seq, job_id, state = row[0], row[1], row[6]
        log.error("queue row %s (prompt %s, %s) cannot be read and was quarantined: %s", seq, job_id, state, reason)
        kept = json.dumps({key: _plain(value) for key, value in zip(row.keys(), row, strict=True)})
        self._execute(
            "INSERT OR REPLACE INTO quarantine (seq, id, state, row, reason, quarantined) VALUES (?, ?, ?, ?, ?, ?)",
            (seq, _plain(job_id), _plain(state), kept, reason, self.clock()),
        )
        self._execute("DELETE FROM jobs WHERE seq = ?", (seq,))

    @staticmethod
    def _job(row: sqlite3.Row) -> Job:
        """A job from a `SELECT *` row, whose columns come in sqlite_schema.JOBS_COLUMNS' order: unpacked by
        position, as reading eleven columns by name costs SQLite's row a search through the names for each. Raises
        (ValueError, TypeError ...) for a row that does not hold a job."""
        _, job_id, number, prompt, extra_data, outputs, state, attempts, created, started, finished, result = row[:12]
        owner, context, worker, lease = row[12], row[13], row[14], row[15]
        job = Job(
            id=job_id,
            number=number,
            prompt=json.loads(prompt),
            extra_data=json.loads(extra_data),
            outputs=json.loads(outputs),
            state=state,
            attempts=attempts,
            created=created,
            started=started,
            finished=finished,
            result=json.loads(result) if result else {},
            owner=owner,
            context=JobContext.from_json(json.loads(context)) if context != "{}" else JobContext(),
            worker=worker,
            lease=lease,
        )
        shapes = (
            (job.prompt, dict),
            (job.extra_data, dict),
            (job.outputs, list),
            (job.result, dict),
            (job.id, str),
            (job.owner, str),
        )
        if not all(isinstance(value, kind) for value, kind in shapes) or not isinstance(number, float | int):
            raise TypeError(
                "a column does not hold what a job needs (prompt, extra_data and result objects, outputs a list)"
            )
        return job


def _unreadable(row: sqlite3.Row, strict: bool) -> str | None:
    """Why a row cannot be used as a job (read strictly: NaN and the like refused), or None."""
    try:
        SQLiteQueue._job(row)
        if strict:
            for column in ("prompt", "extra_data", "outputs", "result", "context"):
                if row[column]:
                    strict_json.loads(row[column], max_depth=strict_json.MAX_DEPTH + 8)
            if not -NUMBER_LIMIT < row["number"] < NUMBER_LIMIT:
                raise ValueError(f"number {row['number']} is not within ±2**63")
    except Exception as exc:  # a damaged row may raise anything
        return _reason(exc)
    return None


def _reason(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc)[:300]}"


def _plain(value: Any) -> Any:
    """A column's value as JSON can hold it."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
