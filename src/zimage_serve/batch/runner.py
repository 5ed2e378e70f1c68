"""Running a batch: rows planned, finished ones skipped, the rest run N at a time, each file written once.

A row's images are written to hidden part files first, then its manifest line (status ok, with the
final names), then linked to their final names. So a row is done exactly when its line says so; a run
cut between the line and the links finishes the links on the next start; a file already at a final
name that no finished row claims is never replaced (the row fails and says why).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from zimage_serve.batch.backends import Backend, Interrupted, RowFailed
from zimage_serve.batch.manifest import FAILED, OK, Manifest
from zimage_serve.batch.plan import Assignment, Planned, plan_row
from zimage_serve.batch.rows import EXPLICIT, Row
from zimage_serve.engine.trained_size import size_warning
from zimage_serve.templates.document import Template

PART = ".zimage-part"  # a row's file before it is done: `.<name>.zimage-part.png`


@dataclass
class Summary:
    total: int
    skipped: int = 0
    done: int = 0
    failed: int = 0
    images: int = 0
    interrupted: bool = False
    failures: list[dict[str, Any]] = field(default_factory=list)


class Reporter(Protocol):
    """What the runner tells whoever watches it (the CLI's progress bar)."""

    def start(self, total: int, skipped: int) -> None: ...

    def warning(self, text: str) -> None: ...

    def row_done(self, record: dict[str, Any]) -> None: ...


@dataclass
class Batch:
    rows: list[Row]
    template: Template
    sets: list[Assignment]
    pattern: str
    out: Path
    base: Path  # where relative image paths in the rows are looked up
    concurrency: int = 1
    manifest: Manifest = field(init=False)
    _stopping: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.manifest = Manifest(self.out / "manifest.jsonl").load()

    def stop(self) -> None:
        self._stopping = True

    async def run(self, backend: Backend, reporter: Reporter) -> Summary:
        self.out.mkdir(parents=True, exist_ok=True)
        plans = [plan_row(row, self.template, self.sets, self.pattern) for row in self.rows]
        _claim_names(plans)
        summary = Summary(total=len(plans))
        waiting: list[Planned] = []
        for plan in plans:
            if self._finished(plan.row.number):
                summary.skipped += 1
            else:
                waiting.append(plan)
        for warning in self._size_warnings(waiting):
            reporter.warning(warning)
        reporter.start(len(plans), summary.skipped)
        slots = asyncio.Semaphore(max(1, self.concurrency))

        async def one(plan: Planned) -> None:
            async with slots:
                if self._stopping:
                    return
                record = await self._run_row(plan, backend)
                if record is None:
                    return
                self.manifest.add(record)  # no await from the part files to here: a row is all or nothing
            if record["status"] == OK:
                self._link(record)
                summary.done += 1
                summary.images += len(record["files"])
            else:
                summary.failed += 1
                summary.failures.append(record)
            reporter.row_done(record)

        tasks = [asyncio.create_task(one(plan)) for plan in waiting]
        stopper = asyncio.create_task(self._watch_stop(backend, tasks))
        try:
            results = await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            stopper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stopper
            summary.interrupted = self._stopping
            self.manifest.compact({row.number for row in self.rows})
        bugs = [result for result in results if isinstance(result, Exception)]
        if bugs:
            raise bugs[0]  # not a row's failure (those are records): a bug, shown as one
        return summary

    def _size_warnings(self, plans: list[Planned]) -> list[str]:
        """One warning per size a model trained at one size only is asked for."""
        defaults, found = self.template.defaults(), dict[tuple[int, int], str]()
        for plan in plans:
            if plan.graph is not None:
                width, height = (plan.values.get(k, defaults.get(k)) for k in ("width", "height"))
                if isinstance(width, int | str) and isinstance(height, int | str):
                    size = (int(width), int(height))
                    warning = size_warning(self.template.name, self.template.native_size, *size)
                    if warning is not None:
                        found.setdefault(size, f"{warning} (row {plan.row.number} and others like it)")
        return list(found.values())

    async def _watch_stop(self, backend: Backend, tasks: list[asyncio.Task[None]]) -> None:
        while not self._stopping:
            await asyncio.sleep(0.05)
        await backend.stop()
        for task in tasks:
            task.cancel()

    async def _run_row(self, plan: Planned, backend: Backend) -> dict[str, Any] | None:
        record: dict[str, Any] = {
            "row": plan.row.number,
            "status": FAILED,
            "name": plan.name,
            "fields": _own_fields(plan),
            "seed": plan.seed,
            "template": self.template.name,
            "version": self.template.version,
            "files": [],
            "error": None,
            "seconds": 0.0,
        }
        if plan.error is not None or plan.graph is None:
            return {**record, "error": plan.error}
        started = time.monotonic()
        try:
            graph = await self._with_images(plan, backend)
            labels = {key: record[key] for key in ("row", "name", "fields")}
            images = await backend.run(graph, labels)
            if not images:
                raise RowFailed("the job made no image")
            names = _file_names(plan.name, [image.suffix for image in images])
            taken = [name for name in names if (self.out / name).exists()]
            if taken:
                raise RowFailed(f"{taken[0]} exists already (not from this row); remove it or choose another --name")
            for name, image in zip(names, images, strict=True):
                _write_part(self.out / name, image.data)
        except Interrupted:
            return None
        except RowFailed as exc:
            return {**record, "error": str(exc), "seconds": round(time.monotonic() - started, 3)}
        return {**record, "status": OK, "files": names, "seconds": round(time.monotonic() - started, 3)}

    async def _with_images(self, plan: Planned, backend: Backend) -> dict[str, Any]:
        graph = plan.graph or {}
        for name, parameter in self.template.parameters.items():
            value = plan.values.get(name)
            if parameter.type == "image" and isinstance(value, str):
                used = await backend.image_value(value, self.base)
                if used != value:
                    for target in parameter.targets:
                        if target.node in graph:
                            graph[target.node]["inputs"][target.input] = used
        return graph

    def _finished(self, row: int) -> bool:
        """Whether the row is done; a run cut after its manifest line gets its links finished here."""
        record = self.manifest.records.get(row)
        if record is None or record.get("status") != OK or not record.get("files"):
            return False
        for name in record["files"]:
            final = self.out / name
            if final.exists():
                continue
            if not _part(final).exists():
                return False  # its image was removed: make it again
        self._link(record)
        return True

    def _link(self, record: dict[str, Any]) -> None:
        for name in record["files"]:
            final, part = self.out / name, _part(self.out / name)
            if part.exists():
                with contextlib.suppress(FileExistsError):
                    os.link(part, final)
                part.unlink()


def _claim_names(plans: list[Planned]) -> None:
    """Two rows may not share a name: the later one fails, naming the first."""
    owners: dict[str, int] = {}
    for index, plan in enumerate(plans):
        if plan.error is not None:
            continue
        first = owners.setdefault(plan.name, plan.row.number)
        if first != plan.row.number:
            plans[index] = Planned(
                plan.row, plan.values, None, plan.name, plan.seed, f"the name {plan.name!r} is row {first}'s too"
            )


def _own_fields(plan: Planned) -> dict[str, Any]:
    """The row as its file has it: the CSV columns, or the JSONL object (its "params" included), so that a
    row is found by its own keys (a SKU) whatever became of it."""
    fields: dict[str, Any] = dict(plan.row.fields)
    if plan.row.params:
        fields[EXPLICIT] = dict(plan.row.params)
    return fields


def _file_names(stem: str, suffixes: list[str]) -> list[str]:
    if len(suffixes) == 1:
        return [stem + suffixes[0]]
    return [f"{stem}_{index}{suffix}" for index, suffix in enumerate(suffixes, start=1)]


def _part(final: Path) -> Path:
    return final.with_name(f".{final.stem}{PART}{final.suffix}")


def _write_part(final: Path, data: bytes) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(_part(final), "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
