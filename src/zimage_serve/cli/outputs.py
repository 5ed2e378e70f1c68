"""`zimage outputs`: the uploads to the output store that are waiting or were given up on, and trying those
again (after the store was fixed, say). A running server picks retried uploads up at once."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from zimage_serve.cli.common import console, console_err
from zimage_serve.cli.queue_side import DataDirOption, QueueOption, QueueSide, queue_side

if TYPE_CHECKING:
    from zimage_serve.storage.uploads import Uploads

app = typer.Typer(help="Outputs in the object store: uploads waiting or given up on.", no_args_is_help=True)


def _uploads(data_dir: Path | None, queue: str | None) -> tuple[Uploads, QueueSide]:
    side = queue_side(data_dir, queue)
    if side.cluster is not None:
        from zimage_serve.storage.redis_uploads import RedisUploadOutbox

        return RedisUploadOutbox(side.cluster.redis, side.cluster.prefix, side.cluster.call), side
    from zimage_serve.storage.uploads import UploadOutbox

    return UploadOutbox(side.path), side


@app.command("pending")
def pending(data_dir: DataDirOption = None, queue: QueueOption = None) -> None:
    """Jobs whose files are not all stored: waiting (with their last error) or given up on (`dead`), one JSON
    object a line, oldest first."""
    uploads, side = _uploads(data_dir, queue)
    try:
        for row in uploads.pending():
            console.print(json.dumps(row), highlight=False)
    finally:
        uploads.close()
        side.close()


@app.command("retry")
def retry(
    jobs: Annotated[
        list[str] | None, typer.Argument(help="Job ids to try again [default: every one given up on]")
    ] = None,
    data_dir: DataDirOption = None,
    queue: QueueOption = None,
) -> None:
    """Try uploads given up on again, with a fresh retry window."""
    uploads, side = _uploads(data_dir, queue)
    try:
        count = uploads.retry(jobs or None, time.time())
    finally:
        uploads.close()
        side.close()
    console_err.print(f"{count} uploads back in the outbox")
