"""The output store's tables in the queue's SQLite file, and the trigger that fills its outbox.

A job that succeeds while an output store is configured (the one row of `output_store`) gets one outbox row,
written by the trigger (there only while a store is configured) in the transaction that records its end, with
the history entry that lists its files: no output is forgotten by a crash between the job's end and its
upload. Each file uploaded is recorded in `output_objects` (the key it went to) for as long as its job is
kept.
"""

from __future__ import annotations

from zimage_serve.outbox import NOW
from zimage_serve.sqlite_triggers import Execute, keep_while

# A job's files are in its owner's space when a user queued it, in the shared folders when an admin did
# (v2's job_space, identity.JobContext: a context without a role is an admin's).
SPACE = "CASE WHEN NEW.owner <> '' AND json_valid(NEW.context) AND json_extract(NEW.context, '$.role') = 'user' " \
    "THEN NEW.owner ELSE '' END"  # fmt: skip
TABLES = """
CREATE TABLE IF NOT EXISTS output_store (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    location TEXT NOT NULL          -- s3://bucket/prefix: present while the server uploads outputs
);
CREATE TABLE IF NOT EXISTS output_outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    owner TEXT NOT NULL DEFAULT '', -- who queued the job (the audit log's user)
    space TEXT NOT NULL,            -- '' : the shared folders; else the user whose folders hold the files
    result TEXT,                    -- the job's history entry at its end: the files to upload
    created REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    lease_until REAL,
    last_error TEXT,
    dead REAL                       -- when it was given up on (its files stay on disk), else NULL
);
CREATE INDEX IF NOT EXISTS output_outbox_due ON output_outbox (next_at) WHERE dead IS NULL;
CREATE INDEX IF NOT EXISTS output_outbox_job ON output_outbox (job_id);
CREATE TABLE IF NOT EXISTS output_objects (
    job_id TEXT NOT NULL,
    space TEXT NOT NULL,
    subfolder TEXT NOT NULL,
    filename TEXT NOT NULL,
    key TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL DEFAULT 0,
    uploaded REAL NOT NULL,
    PRIMARY KEY (job_id, space, subfolder, filename)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS output_objects_file ON output_objects (space, subfolder, filename);
"""
ANY_STORE = "EXISTS (SELECT 1 FROM output_store)"
# name → statement, as SQLite keeps it (`sqlite_triggers.keep_while` compares them). The first exists while a
# store is configured (`fit_triggers`); the WHEN clause still asks, for a file an older version changed.
STORED = {
    "jobs_outputs_stored": f"""CREATE TRIGGER jobs_outputs_stored AFTER UPDATE OF finished ON jobs
WHEN OLD.finished IS NULL AND NEW.finished IS NOT NULL AND NEW.state = 'success'
     AND {ANY_STORE} BEGIN
    INSERT INTO output_outbox (job_id, owner, space, result, created, next_at)
    VALUES (NEW.id, NEW.owner, {SPACE}, NEW.result, {NOW}, {NOW});
END""",
}
# Always: the records of a job's uploaded files go with it, whether a store is configured now or not.
FORGOTTEN = {
    "jobs_outputs_forgotten": """CREATE TRIGGER jobs_outputs_forgotten AFTER DELETE ON jobs
WHEN OLD.finished IS NOT NULL BEGIN
    DELETE FROM output_objects WHERE job_id = OLD.id;
END""",
}


def fit_triggers(execute: Execute) -> None:
    """Within a write transaction: the job triggers as this version writes them, the outbox's only while an
    output store is configured (see `sqlite_triggers`)."""
    keep_while(execute, f"SELECT {ANY_STORE}", STORED)
    keep_while(execute, "SELECT 1", FORGOTTEN)
