"""Reading the audit log from outside the server (`zimage audit`): checking its chain, and its records.

`verify` may run while the server writes. It reads the database's state, then the segments, then the
state again: records the server added meanwhile, and a batch it is appending, are not damage. With the
state unchanged, lines past the recorded end that no batch in flight accounts for were added by
something other than the server.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zimage_serve.security.audit import canonical
from zimage_serve.security.audit_files import GENESIS, LogState, audit_files, iso, read_records, read_state_file

SETTLE_S = 0.5  # far longer than the server takes to append a batch and record it
CSV_COLUMNS = (
    "seq",
    "time",
    "kind",
    "user",
    "address",
    "method",
    "route",
    "status",
    "outcome",
    "job_id",
    "duration_ms",
    "prompt",
    "prompt_sha256",
    "parameters",
    "files",
    "rule",
    "hash",
)


@dataclass
class Problem:
    file: str
    line: int
    seq: int | None
    why: str

    def __str__(self) -> str:
        at = f"record {self.seq}" if self.seq is not None else "a record"
        return f"{self.file}:{self.line}: {at}: {self.why}"


def verify(folder: Path, queue_file: Path) -> tuple[int, Problem | None]:
    """Walk the chain from the first kept record; (records checked, the first problem or None)."""
    before = read_state_file(queue_file)
    cut_seq, cut_hash = (before.cut_seq, before.cut_hash) if before else (0, GENESIS)
    checked, problem, last, torn = _walk(folder, cut_seq, cut_hash)
    after = read_state_file(queue_file)
    if problem is not None:
        return checked, problem
    if after is None:
        if last.seq:
            return checked, Problem(last.file, last.line, None, "the queue database records no head for this log")
        return checked, None
    live = before != after  # the server wrote meanwhile: what was read is a prefix of its log
    if torn is not None and not live and not _finishing(queue_file, after, torn.file):
        why = "a write cut short (a crash or a full disk): the server sets it aside at its next start"
        return checked, Problem(torn.file, torn.line, None, why)
    # All that was written before the files were read must be in them (on a live server, no more).
    written = (before.seq if before is not None else 0) if live else after.seq
    if last.seq < written:
        return checked, Problem(
            last.file or "(no file)",
            last.line,
            written,
            f"the log ends at record {last.seq}, but {written} were written: records were cut from the end",
        )
    if live:
        return checked, None
    if last.seq == after.seq and last.hash != after.head:
        why = f"the log does not end at the recorded head (record {after.seq})"
        return checked, Problem(last.file, last.line, last.seq, why)
    if last.seq > after.seq and not (last.seq == after.pending_seq and last.hash == after.pending_hash):
        extra = last.seq - after.seq
        why = f"{extra} records after the recorded head (record {after.seq}) were not written by the server"
        return checked, Problem(last.file, last.line, after.seq + 1, why)
    return checked, None


@dataclass
class _Last:
    file: str = ""
    line: int = 0
    seq: int = 0
    hash: str = GENESIS


def _walk(folder: Path, cut_seq: int, cut_hash: str) -> tuple[int, Problem | None, _Last, _Last | None]:
    """(records checked, first problem, the last good record, a last line cut short if any)."""
    expected_seq, prev, checked = cut_seq + 1, cut_hash, 0
    last, torn = _Last(seq=cut_seq, hash=cut_hash), None
    for path in audit_files(folder):
        for number, record, complete in read_records(path):
            if not complete:
                torn = _Last(path.name, number)
                continue
            seq = record.get("seq")
            if isinstance(seq, int) and seq <= cut_seq:
                continue  # a segment retention was removing when the server stopped
            claimed = record.pop("hash", None)
            if not record or not isinstance(seq, int):
                why = "not a record (the line was edited or damaged)"
                return checked, Problem(path.name, number, None, why), last, torn
            if seq != expected_seq:
                why = (
                    f"expected record {expected_seq}: records are missing before it"
                    if seq > expected_seq
                    else f"expected record {expected_seq}: records are out of order or repeated"
                )
                return checked, Problem(path.name, number, seq, why), last, torn
            if record.get("prev") != prev:
                why = "does not follow the record before it (prev hash)"
                return checked, Problem(path.name, number, seq, why), last, torn
            if hashlib.sha256(canonical(record)).hexdigest() != claimed:
                return checked, Problem(path.name, number, seq, "its content was changed (hash mismatch)"), last, torn
            prev, expected_seq, checked = str(claimed), expected_seq + 1, checked + 1
            last = _Last(path.name, number, seq, prev)
    return checked, None, last, torn


def _finishing(queue_file: Path, state: LogState, file: str) -> bool:
    """Whether a line cut short at the end of `file` is a batch being appended right now: one is said to be
    (before it is written) and the server records its end a moment later. A crash leaves it said, for good."""
    if state.pending_file != file:
        return False
    time.sleep(SETTLE_S)
    return read_state_file(queue_file) != state


def records(folder: Path, user: str | None = None, since: float | None = None) -> Iterator[dict[str, Any]]:
    since_text = iso(since) if since is not None else None
    for path in audit_files(folder):
        for _, record, _ in read_records(path):
            if not record:
                continue
            if user is not None and record.get("user") != user:
                continue
            if since_text is not None and str(record.get("time", "")) < since_text:
                continue
            yield record


def export(out: io.TextIOBase | Any, found: Iterable[dict[str, Any]], form: str) -> int:
    count = 0
    if form == "jsonl":
        for record in found:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
        return count
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    for record in found:
        row = []
        for column in CSV_COLUMNS:
            value = record.get(column)
            row.append(json.dumps(value, ensure_ascii=False) if isinstance(value, dict | list) else value)
        writer.writerow(row)
        count += 1
    return count
