"""`zimage batch FILE --template NAME`: one image job per CSV or JSONL row, here or on a server."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from zimage_serve.batch.plan import DEFAULT_PATTERN
from zimage_serve.cli.common import ModelsRootOption, console_err, models_roots
from zimage_serve.settings import DATA_DIR_ENV, default_data_dir

if TYPE_CHECKING:
    from zimage_serve.batch.backends import Backend
    from zimage_serve.batch.runner import Summary

TOKEN_ENV = "ZIMAGE_TOKEN"
INTERRUPTED = 130


def batch(
    file: Annotated[Path, typer.Argument(help="CSV (with a header) or JSONL: one job per row")],
    template: Annotated[str, typer.Option("--template", "-t", help="A template's name, or a template file")],
    version: Annotated[int | None, typer.Option(help="The template's version (default: the latest)", min=1)] = None,
    out: Annotated[Path | None, typer.Option(help="Where images and manifest.jsonl go [default: outputs/FILE]")] = None,
    name: Annotated[
        str,
        typer.Option("--name", help="File name pattern: {row}, {seed}, any column or parameter, e.g. '{sku}_{seed}'"),
    ] = DEFAULT_PATTERN,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="A parameter for every row: NAME=VALUE; {column} takes the row's value"),
    ] = None,
    server: Annotated[str | None, typer.Option(help="Run on this server (ours or ComfyUI), not here")] = None,
    token: Annotated[
        str | None, typer.Option(help=f"The server's API token [env {TOKEN_ENV}]", envvar=TOKEN_ENV)
    ] = None,
    concurrency: Annotated[int, typer.Option(help="Jobs in flight at once on a server", min=1, max=64)] = 1,
    webhook: Annotated[
        str | None, typer.Option(help="With --server: a registered webhook endpoint each row's job reports to")
    ] = None,
    input_dir: Annotated[
        Path | None, typer.Option(help="Where image parameters' files are [default: FILE's folder]")
    ] = None,
    models: ModelsRootOption = None,
    data_dir: Annotated[Path | None, typer.Option(help=f"Templates' data folder, here [env {DATA_DIR_ENV}]")] = None,
    device: Annotated[str, typer.Option(help="Here: auto, cpu, cuda, cuda:N or mps")] = "auto",
    dtype: Annotated[str, typer.Option(help="Here: auto, bf16, fp16 or fp32")] = "auto",
) -> None:
    """Make an image per row; finished rows are skipped when run again, so a stopped batch resumes.

    Each row's outcome (status, error, seconds, seed, files) is in OUT/manifest.jsonl. A bad row is
    reported there and the batch goes on; the exit status is 1 when a row failed, 130 when stopped.
    """
    from zimage_serve.batch.plan import check_pattern, parse_sets
    from zimage_serve.batch.rows import read_rows
    from zimage_serve.batch.runner import Batch

    rows = read_rows(file)
    check_pattern(name)
    folder = out if out is not None else Path("outputs") / file.stem
    base = input_dir if input_dir is not None else file.parent
    if concurrency > 1 and server is None:
        console_err.print("[yellow]note:[/] --concurrency is for --server; here, rows run one by one", highlight=False)
    if webhook is not None and server is None:
        raise typer.BadParameter("webhooks are sent by a server: use it with --server", param_hint="--webhook")
    backend = _backend(server, token, folder, base, models, data_dir, device, dtype, webhook)

    async def main() -> Summary:
        try:
            await backend.check()  # a wrong --server or a missing --token: one line, before any row
            chosen = await backend.template(template, version)
            job = Batch(rows, chosen, parse_sets(set_ or [], chosen), name, folder, base, concurrency)
            loop = asyncio.get_running_loop()

            def stop() -> None:
                console_err.print("stopping: the rows in flight are cancelled; run again to resume", highlight=False)
                job.stop()
                loop.remove_signal_handler(signal.SIGINT)  # a second Ctrl-C ends at once

            loop.add_signal_handler(signal.SIGINT, stop)
            bar = _Bar(chosen.name, backend.where)
            try:
                return await job.run(backend, bar)
            finally:
                bar.stop()
        finally:
            await backend.close()

    summary = asyncio.run(main())
    parts = [f"{summary.done} done ({summary.images} images)", f"{summary.failed} failed"]
    if summary.skipped:
        parts.append(f"{summary.skipped} finished earlier, skipped")
    left = summary.total - summary.done - summary.failed - summary.skipped
    if left:
        parts.append(f"{left} not run")
    console_err.print(f"{', '.join(parts)}; manifest: {folder / 'manifest.jsonl'}", highlight=False)
    if summary.interrupted:
        raise typer.Exit(INTERRUPTED)
    if summary.failed:
        raise typer.Exit(1)


def _backend(
    server: str | None,
    token: str | None,
    out: Path,
    base: Path,
    models: list[Path] | None,
    data_dir: Path | None,
    device: str,
    dtype: str,
    webhook: str | None = None,
) -> Backend:
    if server is not None:
        from zimage_serve.batch.backends import RemoteBackend

        return RemoteBackend(server, token, TOKEN_ENV, webhook)
    from zimage_serve.batch.backends import LocalBackend

    work = out / ".zimage-work"
    return LocalBackend(data_dir or default_data_dir(), models_roots(models), work, base, device, dtype)


class _Bar:
    """The progress bar with ETA; a failed row is printed above it."""

    def __init__(self, template: str, where: str) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.template, self.where = template, where
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console_err,
            transient=not console_err.is_terminal,
        )
        self.task: Any = None

    def start(self, total: int, skipped: int) -> None:
        if skipped:
            console_err.print(f"resuming: {skipped} of {total} rows finished earlier are skipped", highlight=False)
        self.progress.start()
        self.task = self.progress.add_task(f"{self.template} on {self.where}", total=total, completed=skipped)

    def warning(self, text: str) -> None:
        console_err.print(f"[yellow]warning:[/] {text}", highlight=False)

    def row_done(self, record: dict[str, Any]) -> None:
        if record["status"] != "ok":
            self.progress.console.print(f"[red]row {record['row']} failed:[/] {record['error']}", highlight=False)
        self.progress.advance(self.task)

    def stop(self) -> None:
        self.progress.stop()
