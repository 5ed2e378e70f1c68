"""The webhook tables in the queue's SQLite file, and the triggers that fill the outbox.

The triggers write a job's events in the transaction that changes the job, so no event is lost to a crash
between the two: queued (a job stored), started (taken by a worker), succeeded, failed or canceled (its
end, or a waiting job deleted). One row per event and endpoint: every endpoint subscribed to the job's
owner (or to every job), and the one the job names in `extra_data.webhook` if its owner may use it. With
no endpoint registered there are no triggers (`fit_triggers`): a job's change then costs nothing more.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from zimage_serve.outbox import NOW
from zimage_serve.sqlite_triggers import Execute, keep_while

EVENTS = ("queued", "started", "succeeded", "failed", "canceled")
TABLES = """
CREATE TABLE IF NOT EXISTS webhook_endpoints (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    url TEXT NOT NULL,
    secret TEXT NOT NULL,
    events TEXT NOT NULL,          -- ',queued,succeeded,': the events it receives
    owner TEXT NOT NULL DEFAULT '', -- '' : any user's jobs may use it; else that user's only
    subscribe INTEGER NOT NULL DEFAULT 0, -- 1: every job of `owner` (of everyone for ''), named or not
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS webhook_outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,       -- the webhook-id a receiver deduplicates by: one per event and endpoint
    endpoint TEXT NOT NULL,
    event TEXT NOT NULL,
    job_id TEXT NOT NULL,
    owner TEXT NOT NULL,
    state TEXT NOT NULL,
    result TEXT,                   -- the job's history entry at its end (outputs, status)
    attempt INTEGER NOT NULL DEFAULT 0, -- the job's run: a job run again after a crash starts again
    created REAL NOT NULL,
    retry_from REAL,               -- a replayed dead letter's retry window starts here, not at `created`
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    lease_until REAL,
    last_error TEXT,
    dead REAL,                     -- when it was given up on (the dead-letter list), else NULL
    metadata TEXT                  -- the job's own labels (JSON), sent with each of its events
);
CREATE INDEX IF NOT EXISTS webhook_outbox_due ON webhook_outbox (next_at) WHERE dead IS NULL;
CREATE INDEX IF NOT EXISTS webhook_outbox_endpoint ON webhook_outbox (endpoint, next_at) WHERE dead IS NULL;
CREATE INDEX IF NOT EXISTS webhook_outbox_job ON webhook_outbox (job_id) WHERE dead IS NULL;
"""
ADDED_COLUMNS = (("metadata", "TEXT"),)  # files from before a column have it added (`upgrade`)
METADATA_BYTES = 16 * 1024  # a job's labels larger than this are not sent


def upgrade(db: sqlite3.Connection) -> None:
    """Bring a file an older version wrote to these tables: its missing columns, added at the end."""
    have = {row[1] for row in db.execute("PRAGMA table_info(webhook_outbox)")}
    for name, kind in ADDED_COLUMNS:
        if name not in have:
            db.execute(f"ALTER TABLE webhook_outbox ADD COLUMN {name} {kind}")


def _json_at(text: str, path: str) -> str:
    """The JSON text at `path` in `text` (NULL where there is none, or a JSON null), in SQL that SQLite 3.35
    reads (its `->` operator came in 3.38)."""
    at = f"json_extract({text}, '{path}')"
    return (
        f"CASE json_type({text}, '{path}') WHEN 'object' THEN {at} WHEN 'array' THEN {at} "
        f"WHEN 'text' THEN json_quote({at}) WHEN 'true' THEN 'true' WHEN 'false' THEN 'false' "
        f"WHEN 'null' THEN NULL ELSE CAST({at} AS TEXT) END"
    )


def _metadata(row: str) -> str:
    """A job's labels, as JSON: a v2 job's `metadata`, or `extra_data.metadata` on /prompt (zimage batch puts
    each row's fields there); none when larger than METADATA_BYTES (UTF-8 bytes)."""
    extra = f"{row}.extra_data"
    labels = (
        f"CASE WHEN json_valid({extra}) THEN "
        f"coalesce({_json_at(extra, '$.comfy_api_v2.metadata')}, {_json_at(extra, '$.metadata')}) END"
    )
    return f"(SELECT m FROM (SELECT {labels} AS m) WHERE length(CAST(m AS BLOB)) <= {METADATA_BYTES})"


def job_labels(extra_data: Any) -> tuple[str, str]:
    """(the endpoint a job names, its labels as JSON) as the triggers read them from `extra_data`, for a queue
    that stores them beside the job (Redis: its scripts do no JSON work on what users send); '' for none."""
    if not isinstance(extra_data, dict):
        return "", ""
    named = extra_data.get("webhook")
    v2 = extra_data.get("comfy_api_v2")
    labels = v2.get("metadata") if isinstance(v2, dict) and v2.get("metadata") is not None else None
    if labels is None:
        labels = extra_data.get("metadata")
    text = "" if labels is None else json.dumps(labels, separators=(",", ":"))  # as the queue file keeps it
    return (named if isinstance(named, str) else ""), (text if len(text.encode()) <= METADATA_BYTES else "")


def _insert(event: str, row: str, result: str) -> str:
    """The rows of one event of job `row` (NEW or OLD), for every endpoint it goes to."""
    named = f"CASE WHEN json_valid({row}.extra_data) THEN json_extract({row}.extra_data, '$.webhook') END"
    return f"""
    INSERT INTO webhook_outbox (id, endpoint, event, job_id, owner, state, result, attempt, created, next_at,
                                metadata)
    SELECT 'msg_' || lower(hex(randomblob(16))), e.id, {event}, {row}.id, {row}.owner, {row}.state, {result},
           {row}.attempts, {NOW}, {NOW}, {_metadata(row)}
    FROM webhook_endpoints e
    WHERE instr(e.events, ',' || {event} || ',') > 0
      AND (e.owner = '' OR e.owner = {row}.owner)
      AND (e.subscribe = 1 OR e.name = {named});"""


ANY_ENDPOINT = "EXISTS (SELECT 1 FROM webhook_endpoints)"
ENDED = "CASE NEW.state WHEN 'success' THEN 'succeeded' WHEN 'error' THEN 'failed' ELSE 'canceled' END"
# name → statement, as SQLite keeps it (`sqlite_triggers.keep_while` compares them). They exist while an
# endpoint does (`fit_triggers`); the WHEN clause still asks, for a file an older version changed.
TRIGGERS = {
    "jobs_webhook_queued": f"""CREATE TRIGGER jobs_webhook_queued AFTER INSERT ON jobs
WHEN NEW.finished IS NULL AND {ANY_ENDPOINT} BEGIN {_insert("'queued'", "NEW", "NULL")}
END""",
    "jobs_webhook_started": f"""CREATE TRIGGER jobs_webhook_started AFTER UPDATE OF state ON jobs
WHEN NEW.state = 'running' AND OLD.state <> 'running' AND {ANY_ENDPOINT} BEGIN {_insert("'started'", "NEW", "NULL")}
END""",
    "jobs_webhook_ended": f"""CREATE TRIGGER jobs_webhook_ended AFTER UPDATE OF finished ON jobs
WHEN OLD.finished IS NULL AND NEW.finished IS NOT NULL AND {ANY_ENDPOINT} BEGIN {_insert(ENDED, "NEW", "NEW.result")}
END""",
    "jobs_webhook_deleted": f"""CREATE TRIGGER jobs_webhook_deleted AFTER DELETE ON jobs
WHEN OLD.finished IS NULL AND {ANY_ENDPOINT} BEGIN {_insert("'canceled'", "OLD", "NULL")}
END""",
}


def fit_triggers(execute: Execute) -> None:
    """Within a write transaction: the job triggers exist, as this version writes them, while an endpoint
    is registered, and not otherwise (see `sqlite_triggers`)."""
    keep_while(execute, f"SELECT {ANY_ENDPOINT}", TRIGGERS)
