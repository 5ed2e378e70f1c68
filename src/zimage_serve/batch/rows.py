"""The rows of a batch file: CSV with a header, or JSON Lines with one object per line."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zimage_serve.errors import ZImageError

EXPLICIT = "params"  # a JSONL row's object of parameter values, each of which must be a parameter


class BatchFileError(ZImageError):
    """The file cannot be read as rows at all (not one bad row: that is reported in the manifest)."""


@dataclass(frozen=True)
class Row:
    number: int  # 1-based: the data row in a CSV, the line in a JSONL file
    fields: dict[str, Any] = field(default_factory=dict)  # columns: parameter values, or names for patterns
    params: dict[str, Any] = field(default_factory=dict)  # a JSONL row's "params": parameters only
    error: str | None = None  # why the row itself cannot be used
    from_text: bool = False  # CSV: every value is text, an empty cell means "not given"


def read_rows(path: Path) -> list[Row]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise BatchFileError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BatchFileError(f"{path}: cannot be read as UTF-8 text ({exc})") from None
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        return _jsonl(text)
    if path.suffix.lower() in (".csv", ".tsv", ".txt"):
        return _csv(text, path)
    raise BatchFileError(f"{path}: a batch file is .csv or .jsonl")


def _jsonl(text: str) -> list[Row]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except ValueError as exc:
            rows.append(Row(number, error=f"not JSON ({exc})"))
            continue
        if not isinstance(data, dict):
            rows.append(Row(number, error="a row is a JSON object"))
            continue
        explicit = data.pop(EXPLICIT, {})
        if not isinstance(explicit, dict):
            rows.append(Row(number, error=f"{EXPLICIT}: must be an object of parameter name → value"))
            continue
        rows.append(Row(number, fields=data, params=explicit))
    return rows


def _csv(text: str, path: Path) -> list[Row]:
    dialect = "excel-tab" if path.suffix.lower() == ".tsv" else "excel"
    reader = csv.DictReader(text.splitlines(keepends=True), dialect=dialect)
    if not reader.fieldnames:
        raise BatchFileError(f"{path}: no header line naming the columns")
    names = [name.strip() for name in reader.fieldnames]
    if len(set(names)) != len(names) or "" in names:
        raise BatchFileError(f"{path}: every column needs a name of its own ({', '.join(names)})")
    rows = []
    try:
        for number, record in enumerate(reader, start=1):
            if None in record:
                rows.append(Row(number, error=f"more cells than the {len(names)} columns"))
                continue
            values = dict(zip(names, (record[k] for k in reader.fieldnames), strict=True))
            rows.append(Row(number, fields={k: v for k, v in values.items() if v is not None}, from_text=True))
    except csv.Error as exc:
        raise BatchFileError(f"{path}: line {reader.line_num}: {exc}") from None
    return rows
