"""`<out>/manifest.jsonl`: what happened to each row, kept across runs.

A run appends one line per row as it ends, written whole and synced, so a crash loses at most the rows
in flight; a torn last line is ignored. When the run ends (or stops), the file is rewritten with the
latest line of each row, in row order, and replaced in one rename.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

OK, FAILED = "ok", "failed"


class Manifest:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: dict[int, dict[str, Any]] = {}
        self._file: Any = None

    def load(self) -> Manifest:
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return self
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line a crash cut short
            if isinstance(record, dict) and isinstance(record.get("row"), int):
                self.records[record["row"]] = record
        return self

    def add(self, record: dict[str, Any]) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.records[record["row"]] = record

    def compact(self, rows: set[int] | None = None) -> None:
        """Rewrite with one line per row (of `rows`, when given: rows the file no longer has are dropped)."""
        self.close()
        kept = [self.records[n] for n in sorted(self.records) if rows is None or n in rows]
        temporary = self.path.with_name(f".{self.path.name}.part")
        with open(temporary, "w", encoding="utf-8") as file:
            file.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in kept)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, self.path)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
