"""The registered endpoints and the outbox of deliveries, in the queue's SQLite file (webhooks/schema.py).

Deliveries are claimed with a lease, so that two API nodes sharing the file never send one at the same
time, and each is removed once its endpoint answered 2xx: an event is delivered at least once (a node
that dies after the receiver's answer and before the removal sends it again, with the same webhook-id).
"""

from __future__ import annotations

import base64
import re
import secrets
import sqlite3
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from zimage_serve import outbox
from zimage_serve.errors import ZImageError
from zimage_serve.storage import schema as storage_schema
from zimage_serve.webhooks.schema import EVENTS, TABLES, fit_triggers, upgrade

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_URL = 2048
SECRET_BYTES = 32
DUE = "dead IS NULL AND next_at <= ? AND (lease_until IS NULL OR lease_until < ?)"  # and not leased
HELD_S = 300.0  # a job.succeeded held for its files is looked at again after this, if `release` did not come
HOLD_ROUNDS, HOLD_BATCH = 8, 256  # a claim holds up to about 2,000 of an endpoint's events on its way


class WebhookError(ZImageError):
    """An endpoint that cannot be registered as asked; the message names the field."""


@dataclass(frozen=True)
class Endpoint:
    id: str
    name: str
    url: str
    events: tuple[str, ...]
    owner: str  # '' : any user's jobs may name it
    subscribe: bool  # every job of `owner` (of everyone for '') goes to it, named or not
    created: float

    def public(self) -> dict[str, Any]:
        """What the admin API and the CLI show: everything but the secret."""
        return {
            "id": self.id,
            "name": self.name,
            "url": self.url,
            "events": list(self.events),
            "user": self.owner or None,
            "subscribe": self.subscribe,
            "created": self.created,
        }


@dataclass(frozen=True)
class Delivery:
    """One event for one endpoint, claimed for sending."""

    seq: int
    id: str  # webhook-id
    event: str
    job_id: str
    owner: str
    state: str
    result: str | None
    created: float
    attempts: int  # tries of this delivery, this one included
    endpoint: Endpoint
    secret: str
    attempt: int = 0  # the job's run it reports on (a job run again after a crash starts again)
    window_from: float = 0.0  # its retry window starts here: the event, or its replay
    lease_until: float = 0.0  # the claim's lease: the fence its outcome is recorded under
    metadata: str | None = None  # the job's labels, as JSON


def checked_events(events: list[str] | None) -> tuple[str, ...]:
    if not events or events == ["all"]:
        return EVENTS
    unknown = [e for e in events if e not in EVENTS]
    if unknown:
        raise WebhookError(f"events: {', '.join(unknown)} not among all, {', '.join(EVENTS)}")
    return tuple(e for e in EVENTS if e in events)


def checked_url(url: str) -> str:
    """An http(s) URL with a host (its IDNA form must exist) and a port that is one, and nothing a header
    could not carry (no spaces, no control characters)."""
    if len(url) > MAX_URL or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise WebhookError(
            f"url: {url[:80]!r} is longer than {MAX_URL} characters or holds spaces or control characters"
        )
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookError(f"url: {url[:80]!r} is not an http(s) URL with a host")
    if parts.username or parts.password:
        raise WebhookError("url: credentials in the URL are not kept; the signature authenticates the sender")
    try:
        parts.hostname.encode("idna")
        port = parts.port
    except (UnicodeError, ValueError) as exc:
        raise WebhookError(f"url: {url[:80]!r} has no usable host or port ({exc})") from None
    if port == 0:
        raise WebhookError(f"url: {url[:80]!r} has port 0")
    return url


class Webhooks(Protocol):
    """The endpoints and the outbox of deliveries, kept with the queue: in its SQLite file (`WebhookStore`) or
    in its Redis (`redis_store.RedisWebhookStore`); tests/test_webhooks.py holds both to the same contract."""

    has_endpoints: bool  # whether an endpoint was registered when the outbox was last looked at

    def close(self) -> None: ...

    def add(
        self, name: str, url: str, events: list[str] | None = None, owner: str = "", subscribe: bool = False
    ) -> tuple[Endpoint, str]:
        """Register an endpoint; (it, its signing secret), the secret shown this once."""
        ...

    def endpoints(self) -> list[Endpoint]: ...

    def endpoint(self, name: str) -> Endpoint | None: ...

    def usable(self, name: str, owner: str) -> bool:
        """Whether a job of `owner` may name this endpoint."""
        ...

    def remove(self, name: str) -> bool:
        """Remove an endpoint with its deliveries, waiting and dead (nothing could send them any more)."""
        ...

    def claim(
        self,
        now: float,
        limit: int = 16,
        lease_s: float = 60.0,
        per_endpoint: int | None = None,
        in_flight: Mapping[str, int] | None = None,
    ) -> list[Delivery]:
        """Due deliveries, oldest first, leased to the caller for `lease_s` (another node takes them only after
        that). No endpoint gets more than `per_endpoint` tries in flight, counting `in_flight` (the caller's,
        by endpoint id), so a slow endpoint never takes every sender; a job's `succeeded` waits until its
        files are in the output store (or given up on). A delivery's retry window starts at its first claim."""
        ...

    def delivered(self, done: list[tuple[int, float]]) -> None:
        """These deliveries (seq, lease) got their 2xx: out of the outbox."""
        ...

    def failed(self, delivery: Delivery, error: str, retry_at: float | None) -> None:
        """A try that did not get a 2xx: tried again at `retry_at`, or given up on (dead) when None; fenced by
        the claim's lease (a try that outlived it records nothing)."""
        ...

    def release(self, job_id: str, now: float) -> None:
        """The job's files are stored (or given up on): its job.succeeded deliveries, held for them, are due."""
        ...

    def forget_dead(self, before: float) -> int: ...

    def waiting(self) -> int: ...

    def dead_letters(self, limit: int = 1000) -> list[dict[str, Any]]: ...

    def replay(self, ids: list[str] | None = None) -> int:
        """Dead letters (these, or all) go back to the outbox, to be tried again now with fresh attempts."""
        ...


def new_endpoint(name: str, url: str, events: list[str] | None, owner: str, subscribe: bool) -> tuple[Endpoint, str]:
    """An endpoint as asked, checked (a WebhookError names the field), and its new signing secret."""
    if not NAME.fullmatch(name):
        raise WebhookError(f"name: {name[:80]!r} must be 1 to 64 letters, digits, '.', '_' or '-'")
    endpoint = Endpoint(
        "ep_" + uuid.uuid4().hex, name, checked_url(url), checked_events(events), owner, subscribe, time.time()
    )
    return endpoint, "whsec_" + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


class NamedEndpoints:
    """What both stores answer from their list of endpoints."""

    def endpoints(self) -> list[Endpoint]:
        raise NotImplementedError

    def endpoint(self, name: str) -> Endpoint | None:
        return next((e for e in self.endpoints() if e.name == name), None)

    def usable(self, name: str, owner: str) -> bool:
        """Whether a job of `owner` may name this endpoint."""
        found = self.endpoint(name)
        return found is not None and found.owner in ("", owner)


class WebhookStore(outbox.OutboxFile, NamedEndpoints):
    """The webhook tables of one queue file; thread-safe."""

    TABLE = "webhook_outbox"

    def __init__(self, path: Path) -> None:
        super().__init__(path, TABLES + storage_schema.TABLES)  # the claim reads the uploads' outbox
        with self._writing():
            upgrade(self._db)
        # Whether an endpoint was registered when the outbox was last looked at: while none is, a job's
        # change writes no event, and the dispatcher need not be woken for it (its poll finds a new endpoint).
        self.has_endpoints = True

    # -- endpoints -------------------------------------------------------------------------------------
    def add(
        self, name: str, url: str, events: list[str] | None = None, owner: str = "", subscribe: bool = False
    ) -> tuple[Endpoint, str]:
        """Register an endpoint; (it, its signing secret), the secret shown this once."""
        endpoint, secret = new_endpoint(name, url, events, owner, subscribe)
        try:
            with self._writing():
                self._execute(
                    "INSERT INTO webhook_endpoints (id, name, url, secret, events, owner, subscribe, created) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (endpoint.id, name, endpoint.url, secret, _events_text(endpoint.events), owner,
                     int(subscribe), endpoint.created),
                )  # fmt: skip
                fit_triggers(self._execute)
        except sqlite3.IntegrityError:
            raise WebhookError(f"name: an endpoint named {name!r} exists already") from None
        self.has_endpoints = True
        return endpoint, secret

    def endpoints(self) -> list[Endpoint]:
        rows = self._read("SELECT * FROM webhook_endpoints ORDER BY created")
        return [_endpoint(row) for row in rows]

    def remove(self, name: str) -> bool:
        """Remove an endpoint with its deliveries, waiting and dead (nothing could send them any more)."""
        with self._writing():
            row = self._execute("SELECT id FROM webhook_endpoints WHERE name = ?", (name,)).fetchone()
            if row is None:
                return False
            self._execute("DELETE FROM webhook_outbox WHERE endpoint = ?", (row[0],))
            self._execute("DELETE FROM webhook_endpoints WHERE id = ?", (row[0],))
            fit_triggers(self._execute)
        return True

    # -- deliveries ------------------------------------------------------------------------------------
    def claim(
        self,
        now: float,
        limit: int = 16,
        lease_s: float = 60.0,
        per_endpoint: int | None = None,
        in_flight: Mapping[str, int] | None = None,
    ) -> list[Delivery]:
        """As `Webhooks.claim`. A plain read first: with nothing due (no endpoint, say) the write lock is never
        taken. It also notes whether any endpoint is registered (`has_endpoints`)."""
        flying = in_flight or {}
        full = sorted(e for e, n in flying.items() if per_endpoint is not None and n >= per_endpoint)
        [(endpoints_now, due)] = self._read(
            "SELECT EXISTS (SELECT 1 FROM webhook_endpoints), EXISTS (SELECT 1 FROM webhook_outbox "
            f"WHERE {DUE} AND endpoint NOT IN ({_marks(full)}))",
            (now, now, *full),
        )
        self.has_endpoints = bool(endpoints_now)
        if not due:  # nothing due, or only for endpoints with no room: the write lock is not taken
            return []
        with self._writing():
            endpoints = {row["id"]: row for row in self._execute("SELECT * FROM webhook_endpoints").fetchall()}
            chosen: list[tuple[float, int]] = []
            for endpoint in endpoints:
                room = limit if per_endpoint is None else per_endpoint - flying.get(endpoint, 0)
                chosen += self._oldest(endpoint, min(room, limit), now)
            chosen = sorted(chosen)[:limit]
            rows = self._execute(
                "UPDATE webhook_outbox SET lease_until = ?, attempts = attempts + 1, "
                f"retry_from = coalesce(retry_from, ?) WHERE seq IN ({_marks(chosen)}) RETURNING *",
                (now + lease_s, now, *(seq for _, seq in chosen)),
            ).fetchall()
        claimed = []
        for row in sorted(rows, key=lambda r: r["seq"]):
            endpoint = endpoints.get(row["endpoint"])
            if endpoint is None:  # removed meanwhile
                continue
            claimed.append(
                Delivery(row["seq"], row["id"], row["event"], row["job_id"], row["owner"], row["state"],
                         row["result"], row["created"], row["attempts"], _endpoint(endpoint), endpoint["secret"],
                         row["attempt"], row["retry_from"], row["lease_until"], row["metadata"])
            )  # fmt: skip
        return claimed

    def _oldest(self, endpoint: str, room: int, now: float) -> list[tuple[float, int]]:
        """(next_at, seq) of an endpoint's oldest due deliveries, `room` of them at most (in the claim's
        transaction). A job.succeeded whose job's files are still being stored is held on the way, for
        HELD_S or until `release`, and takes no room: held events never stand in front of the others."""
        found: dict[int, float] = {}
        for _ in range(HOLD_ROUNDS if room > 0 else 0):
            window = room + HOLD_BATCH  # the ones found already come first again: they are not leased yet
            rows = self._execute(
                f"SELECT seq, event, job_id, next_at FROM webhook_outbox WHERE endpoint = ? AND {DUE} "
                "ORDER BY next_at, seq LIMIT ?",
                (endpoint, now, now, window),
            ).fetchall()
            succeeded = sorted({row["job_id"] for row in rows if row["event"] == "succeeded"})
            waiting = {
                row[0]
                for row in self._execute(
                    "SELECT job_id FROM output_outbox WHERE dead IS NULL AND EXISTS (SELECT 1 FROM output_store) "
                    f"AND job_id IN ({_marks(succeeded)})",
                    tuple(succeeded),
                ).fetchall()
            }
            held: list[int] = []
            for row in rows:
                if row["seq"] in found:
                    continue
                if row["event"] == "succeeded" and row["job_id"] in waiting:
                    held.append(row["seq"])
                elif len(found) < room:
                    found[row["seq"]] = row["next_at"]
                else:
                    break
            self._execute(f"UPDATE webhook_outbox SET next_at = ? WHERE seq IN ({_marks(held)})", (now + HELD_S, *held))
            if len(found) >= room or not held or len(rows) < window:
                break
        return [(next_at, seq) for seq, next_at in found.items()]

    def delivered(self, done: list[tuple[int, float]]) -> None:
        """These deliveries (seq, lease) got their 2xx: out of the outbox, in one transaction."""
        with self._writing():
            for seq, lease in done:
                self._execute("DELETE FROM webhook_outbox WHERE seq = ? AND lease_until = ?", (seq, lease))

    def failed(self, delivery: Delivery, error: str, retry_at: float | None) -> None:
        """A try that did not get a 2xx: tried again at `retry_at`, or given up on (dead) when None."""
        self.retry_or_give_up(delivery.seq, delivery.lease_until, error, retry_at)

    def release(self, job_id: str, now: float) -> None:
        """The job's files are stored (or given up on): its held job.succeeded deliveries are due now."""
        with self._writing():
            self._execute(
                "UPDATE webhook_outbox SET next_at = ? WHERE job_id = ? AND event = 'succeeded' AND dead IS NULL "
                "AND (lease_until IS NULL OR lease_until < ?)",
                (now, job_id, now),
            )

    def forget_dead(self, before: float) -> int:
        """Dead letters older than `before` go (they are kept for an admin to see, not forever)."""
        with self._writing():
            return int(self._execute("DELETE FROM webhook_outbox WHERE dead < ?", (before,)).rowcount)

    def waiting(self) -> int:
        with self._lock:
            return int(self._execute("SELECT COUNT(*) FROM webhook_outbox WHERE dead IS NULL").fetchone()[0])

    def dead_letters(self, limit: int = 1000) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._execute(
                "SELECT o.*, e.name AS endpoint_name FROM webhook_outbox o LEFT JOIN webhook_endpoints e "
                "ON e.id = o.endpoint WHERE o.dead IS NOT NULL ORDER BY o.seq DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [
            {"id": r["id"], "endpoint": r["endpoint_name"], "event": r["event"], "job_id": r["job_id"],
             "attempts": r["attempts"], "error": r["last_error"], "created": r["created"], "dead": r["dead"]}
            for r in rows
        ]  # fmt: skip

    def replay(self, ids: list[str] | None = None) -> int:
        """Dead letters (these, or all) go back to the outbox, to be tried again now with fresh attempts."""
        with self._writing():
            if ids is None:
                cursor = self._execute(
                    "UPDATE webhook_outbox SET dead = NULL, attempts = 0, next_at = ?, retry_from = ?, "
                    "lease_until = NULL WHERE dead IS NOT NULL AND endpoint IN (SELECT id FROM webhook_endpoints)",
                    (time.time(), time.time()),
                )
                return int(cursor.rowcount)
            count = 0
            for message in ids:
                count += self._execute(
                    "UPDATE webhook_outbox SET dead = NULL, attempts = 0, next_at = ?, retry_from = ?, "
                    "lease_until = NULL WHERE id = ? AND dead IS NOT NULL "
                    "AND endpoint IN (SELECT id FROM webhook_endpoints)",
                    (time.time(), time.time(), message),
                ).rowcount
            return count


def _marks(values: Sequence[Any]) -> str:
    """The placeholders of an IN list (`IN ()` is valid SQLite: it matches nothing)."""
    return ",".join("?" * len(values))


def _events_text(events: tuple[str, ...]) -> str:
    return "," + ",".join(events) + ","


def _endpoint(row: sqlite3.Row) -> Endpoint:
    events = tuple(e for e in row["events"].split(",") if e)
    return Endpoint(row["id"], row["name"], row["url"], events, row["owner"], bool(row["subscribe"]), row["created"])
