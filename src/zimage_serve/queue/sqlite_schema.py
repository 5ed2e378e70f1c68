"""The SQLite queue file's tables, indexes and triggers, and the upgrade of files older versions wrote.

`create_or_upgrade` runs once per connection as the queue opens the file; everything it does is idempotent.
"""

from __future__ import annotations

import sqlite3

from zimage_serve.queue.jobs import STATES
from zimage_serve.security.audit_files import AUDIT_TABLES, AUDIT_TRIGGER, upgrade_audit_tables
from zimage_serve.storage import schema as storage
from zimage_serve.webhooks import schema as webhooks

# The allowed states as a chain of equalities, not `state IN (...)`: SQLite builds a temporary index of an
# IN list each time it checks one, on every insert and change of state (70 thousand instructions per job,
# a sixth of the queue file's work, counted with callgrind).
STATE_CHECK = " OR ".join(f"state = '{state}'" for state in STATES)
JOBS_TABLE = f"""
CREATE TABLE IF NOT EXISTS {{name}} (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    number REAL NOT NULL,
    prompt TEXT NOT NULL,
    extra_data TEXT NOT NULL,
    outputs TEXT NOT NULL,
    state TEXT NOT NULL CHECK ({STATE_CHECK}),
    attempts INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    result TEXT,
    owner TEXT NOT NULL DEFAULT '',
    context TEXT NOT NULL DEFAULT '{{{{}}}}',
    worker TEXT NOT NULL DEFAULT '',
    lease REAL
);"""
# Files from before owners or leases lack the columns after `result`; they are added at the end, where `_job`
# reads them.
LEGACY_COLUMNS = "seq, id, number, prompt, extra_data, outputs, state, attempts, created, started, finished, result"
OWNER_COLUMNS = (("owner", "TEXT NOT NULL DEFAULT ''"), ("context", "TEXT NOT NULL DEFAULT '{}'"))
# Which worker runs a job, and until when its lease holds (heartbeats extend it); appended after the owners.
LEASE_COLUMNS = (("worker", "TEXT NOT NULL DEFAULT ''"), ("lease", "REAL"))
ADDED_COLUMNS = (*OWNER_COLUMNS, *LEASE_COLUMNS)
JOBS_COLUMNS = LEGACY_COLUMNS + ", " + ", ".join(name for name, _ in ADDED_COLUMNS)  # `_job` reads them in this order
SCHEMA = (
    JOBS_TABLE.format(name="jobs")
    + """
CREATE INDEX IF NOT EXISTS jobs_live ON jobs (number, seq) WHERE finished IS NULL;
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (finished, seq) WHERE finished IS NOT NULL;
CREATE TABLE IF NOT EXISTS usage (
    owner TEXT NOT NULL,
    day TEXT NOT NULL,
    jobs INTEGER NOT NULL DEFAULT 0,
    images INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (owner, day)
) WITHOUT ROWID;
DROP INDEX IF EXISTS jobs_pending;
DROP INDEX IF EXISTS jobs_running;
DROP INDEX IF EXISTS jobs_history;
DROP INDEX IF EXISTS jobs_state;
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS quarantine (
    seq INTEGER PRIMARY KEY,
    id TEXT,
    state TEXT,
    row TEXT NOT NULL,
    reason TEXT NOT NULL,
    quarantined REAL NOT NULL
);
"""
    + AUDIT_TABLES
    + """
CREATE TABLE IF NOT EXISTS state_counts (state TEXT PRIMARY KEY, n INTEGER NOT NULL);
CREATE TRIGGER IF NOT EXISTS jobs_counted_in AFTER INSERT ON jobs BEGIN
    UPDATE state_counts SET n = n + 1 WHERE state = NEW.state;
END;
CREATE TRIGGER IF NOT EXISTS jobs_counted_out AFTER DELETE ON jobs BEGIN
    UPDATE state_counts SET n = n - 1 WHERE state = OLD.state;
END;
CREATE TRIGGER IF NOT EXISTS jobs_counted_moved AFTER UPDATE OF state ON jobs WHEN OLD.state != NEW.state BEGIN
    UPDATE state_counts SET n = n - 1 WHERE state = OLD.state;
    UPDATE state_counts SET n = n + 1 WHERE state = NEW.state;
END;
"""
)
# A job has a `finished` time exactly when its state is one of FINISHED (finish and recover set both), and
# jobs are found by it: finished ones for the history, live ones (pending or running) for the queue. An
# index whose condition was `state IN (...)` made SQLite test that list on every change to a row, nearly
# a quarter of the queue file's work per job (counted with callgrind). One index for both live states,
# not one each: a claim then changes no index entry and a job's end removes one, so each commit writes
# one page fewer.
DONE = "finished IS NOT NULL"
LIVE = "finished IS NULL"
# Per-owner indexes hold only jobs that have an owner (authentication on): the local operator's jobs cost
# them nothing. A query names `owner <> ''` in its text, so SQLite sees that it may use them.
OWNER_INDEXES = """
CREATE INDEX IF NOT EXISTS jobs_owner_live ON jobs (owner, number, seq) WHERE finished IS NULL AND owner <> '';
CREATE INDEX IF NOT EXISTS jobs_owner_done ON jobs (owner, finished, seq) WHERE finished IS NOT NULL AND owner <> '';
CREATE INDEX IF NOT EXISTS jobs_owner_running ON jobs (owner) WHERE state = 'running' AND owner <> '';
"""
# History entries per owner, kept by triggers, so that each owner's history is trimmed to its own limit and
# the largest owners are found at once when everyone's together is over the total (queue/jobs.py).
HISTORY_OWNERS = f"""
CREATE TABLE IF NOT EXISTS history_owners (owner TEXT PRIMARY KEY, n INTEGER NOT NULL);
CREATE TRIGGER IF NOT EXISTS jobs_history_in AFTER INSERT ON jobs WHEN NEW.{DONE} BEGIN
    INSERT INTO history_owners (owner, n) VALUES (NEW.owner, 1) ON CONFLICT(owner) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER IF NOT EXISTS jobs_history_out AFTER DELETE ON jobs WHEN OLD.{DONE} BEGIN
    UPDATE history_owners SET n = n - 1 WHERE owner = OLD.owner;
END;
CREATE TRIGGER IF NOT EXISTS jobs_history_moved AFTER UPDATE OF finished ON jobs
WHEN (OLD.finished IS NULL) <> (NEW.finished IS NULL) BEGIN
    INSERT INTO history_owners (owner, n) VALUES (NEW.owner, CASE WHEN NEW.{DONE} THEN 1 ELSE -1 END)
    ON CONFLICT(owner) DO UPDATE SET n = n + excluded.n;
END;
"""
# Files from before strict JSON may hold rows that are not JSON (NaN) or cannot be read back; such a file
# is read through once, and its bad rows quarantined, when it is first opened by this version.
STRICT_VERSION = 2


def create_or_upgrade(db: sqlite3.Connection) -> None:
    """Make what is missing (a new file), and bring an older file to this version's tables."""
    _rebuild_older_jobs_table(db)
    db.executescript(SCHEMA)
    _add_owner_columns(db)
    db.executescript(OWNER_INDEXES)
    db.executescript(HISTORY_OWNERS)
    upgrade_audit_tables(db)
    db.executescript(AUDIT_TRIGGER)
    db.executescript(webhooks.TABLES)
    webhooks.upgrade(db)
    db.executescript(storage.TABLES)
    db.execute("BEGIN IMMEDIATE")
    webhooks.fit_triggers(db.execute)  # in this transaction: no moment without them while an endpoint exists
    storage.fit_triggers(db.execute)
    if db.execute("SELECT COUNT(*) FROM state_counts").fetchone()[0] == 0:  # a new or older file
        found = dict(db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
        db.executemany("INSERT INTO state_counts (state, n) VALUES (?, ?)", [(s, found.get(s, 0)) for s in STATES])
    if db.execute("SELECT COUNT(*) FROM history_owners").fetchone()[0] == 0:  # a file from before it
        db.execute(
            f"INSERT INTO history_owners (owner, n) SELECT owner, COUNT(*) FROM jobs WHERE {DONE} GROUP BY owner"
        )
    db.execute("COMMIT")


def _rebuild_older_jobs_table(db: sqlite3.Connection) -> None:
    """A file whose jobs table checks states with `IN (...)` gets the table made again, once, with every
    row, and the sequence as it was (a new job's seq stays above any deleted one). One transaction: a
    crash leaves the older table as it was. Indexes and triggers are made again by SCHEMA."""
    row = db.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'jobs'").fetchone()
    if row is None or "state IN (" not in row[0]:
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute(JOBS_TABLE.format(name="jobs_rebuilt"))
        db.execute(f"INSERT INTO jobs_rebuilt ({LEGACY_COLUMNS}) SELECT {LEGACY_COLUMNS} FROM jobs")
        sequence = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'jobs'").fetchone()
        db.execute("DROP TABLE jobs")
        db.execute("ALTER TABLE jobs_rebuilt RENAME TO jobs")
        if sequence is not None:
            db.execute("UPDATE sqlite_sequence SET seq = max(seq, ?) WHERE name = 'jobs'", (sequence[0],))
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _add_owner_columns(db: sqlite3.Connection) -> None:
    """A file from before owners (or leases) gets their columns (its jobs are the local operator's)."""
    present = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
    for name, declaration in ADDED_COLUMNS:
        if name not in present:
            db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {declaration}")
