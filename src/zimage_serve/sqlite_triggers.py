"""Triggers on the jobs table that exist only while what they feed is in use.

A trigger costs SQLite a sub-program call for every row its statement changes, even when its WHEN clause is
false: the webhook and output-store triggers, whose bodies build JSON, cost ~78,000 instructions a job
(counted with callgrind) with no endpoint and no store, most of it inside the worker's transaction, which
the server's submissions wait for. So they are made when the first endpoint (or the store) is, and dropped
with the last, in the same transaction: the file's triggers always agree with its tables, whichever
process changed them.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping
from typing import Any

Execute = Callable[..., sqlite3.Cursor]


def keep_while(execute: Execute, in_use: str, triggers: Mapping[str, str], on: str = "jobs") -> None:
    """Within the caller's write transaction: `triggers` (name → its CREATE TRIGGER statement, as SQLite
    keeps it: no IF NOT EXISTS, no final semicolon) exist, exactly so, while the query `in_use` (one value)
    is true, and not at all otherwise. Only what differs is changed, since a change of the schema makes every
    other connection to the file prepare its statements again. A file without the table `on` yet (an
    endpoint registered before the queue ever opened it) gets them when the queue makes that table."""
    if execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (on,)).fetchone() is None:
        return
    wanted = bool(execute(in_use).fetchone()[0])
    names = list(triggers)
    marks = ", ".join("?" for _ in names)
    rows: list[Any] = execute(
        f"SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND name IN ({marks})", names
    ).fetchall()
    present = {str(name): sql for name, sql in rows}
    for name, create in triggers.items():
        if wanted and present.get(name) == create:
            continue
        if name in present:
            execute(f"DROP TRIGGER {name}")
        if wanted:
            execute(create)
