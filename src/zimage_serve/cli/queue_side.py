"""Where the admin commands find the stores kept with the queue (webhooks, uploads): the data folder's
SQLite file, or a cluster's Redis (`--queue`, ZIMAGE_QUEUE)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from zimage_serve.settings import DATA_DIR_ENV, default_data_dir

if TYPE_CHECKING:
    from zimage_serve.queue.redis_queue import RedisQueue

DataDirOption = Annotated[Path | None, typer.Option(help=f"The server's data folder [env {DATA_DIR_ENV}]")]
QueueOption = Annotated[
    str | None,
    typer.Option(envvar="ZIMAGE_QUEUE", help="A cluster's queue, redis://HOST:PORT/DB [default: the data folder's]"),
]


@dataclass
class QueueSide:
    """The queue file's path, or a connection to a cluster's Redis (closed by `close`)."""

    path: Path
    cluster: RedisQueue | None = None

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.close()


def queue_side(data_dir: Path | None, queue: str | None) -> QueueSide:
    """The data folder's queue file, or the cluster's Redis that `--queue` names (a bad URL names --queue)."""
    from zimage_serve.config import ConfigError
    from zimage_serve.queue import backends

    try:
        choice = backends.choose(queue)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="--queue") from exc
    path = (data_dir or default_data_dir()) / "queue.sqlite3"
    if choice.kind != "redis":
        return QueueSide(path)
    from zimage_serve.queue.redis_queue import RedisQueue

    return QueueSide(path, RedisQueue(choice.url, prefix=choice.prefix))
