"""What the queue a server uses brings with it, opened in the one place that tells the two apart.

- **One machine** (`LocalBackend`): the SQLite file in the data dir, the audit log's head and outbox in
  that same file, and one worker: a child process (the default) or threads of the server.
- **A cluster** (`ClusterBackend`): the shared Redis, the workers this node starts as processes of its
  own (`--workers N`, one GPU each with `--device cuda`), the register of every worker in the cluster,
  and a relay that feeds this node's own audit log the job ends the workers record.

The runtime composes the server from what `open_backend` returns and never asks which one it got.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from zimage_serve.config import ConfigError
from zimage_serve.queue import backends
from zimage_serve.queue.audit_relay import AuditRelay, audit_file
from zimage_serve.queue.contract import JobQueue
from zimage_serve.queue.redis_queue import RedisQueue
from zimage_serve.queue.sqlite_queue import SQLiteQueue
from zimage_serve.records.contract import Records
from zimage_serve.records.redis_records import RedisRecords
from zimage_serve.records.sqlite_records import SQLiteRecords
from zimage_serve.security.audit import log_place
from zimage_serve.server.service import DeviceWorker
from zimage_serve.storage.redis_uploads import RedisUploadOutbox
from zimage_serve.storage.uploads import UploadOutbox, Uploads
from zimage_serve.webhooks.redis_store import RedisWebhookStore
from zimage_serve.webhooks.store import Webhooks, WebhookStore
from zimage_serve.worker.build import WorkerConfig, build_worker
from zimage_serve.worker.cluster_workers import ClusterWorkers
from zimage_serve.worker.process import WorkerProcess

if TYPE_CHECKING:
    from zimage_serve.server.hub import Hub
    from zimage_serve.worker.loop import Listener

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerPlan:
    """How this node runs its workers (from the server's settings)."""

    worker_process: bool  # one machine: a child process runs the prompts (True), or the server's threads
    count: int  # a cluster: the workers this node starts (0: an API node only)
    metrics_port: int | None  # a cluster: worker i serves its /metrics on metrics_port + 1 + i


class Backend(Protocol):
    shared: bool  # other machines' nodes share the queue (a cluster)
    kind: str  # sqlite or redis, as /api/zimage/cluster says

    @property
    def queue(self) -> JobQueue: ...

    @property
    def records(self) -> Records:
        """Comfy API v2's idempotency keys and asset records."""
        ...

    def audit_place(self, data_dir: Path) -> tuple[Path, Path]:
        """Where this node's audit log is: its folder, and the database of its head and outbox."""
        ...

    def workers(self, config: WorkerConfig, listener: Listener, hub: Hub) -> DeviceWorker: ...

    def webhook_store(self) -> Webhooks | None:
        """The webhook endpoints and the outbox the queue writes job events to (None: none for this queue)."""
        ...

    def upload_outbox(self) -> Uploads | None:
        """The outbox of uploads to the output store the queue's job ends fill (None: none for this queue)."""
        ...

    def workers_shown(self, worker: DeviceWorker) -> list[dict[str, Any]]:
        """Every worker serving the queue, as /system_stats lists them."""
        ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


def open_backend(url: str | None, data_dir: Path, max_pending: int, plan: WorkerPlan, node_name: str) -> Backend:
    """The queue `url` names (`--queue`; none: this machine's SQLite file), with all that comes with it."""
    choice = backends.choose(url)
    if choice.shared:
        return ClusterBackend(
            RedisQueue(choice.url, max_pending=max_pending, prefix=choice.prefix), choice, plan, node_name
        )
    if plan.count != 1:
        raise ConfigError(
            "a node of its own runs one worker; more (or none) need a shared queue (--queue redis://...)", "--workers"
        )
    queue = SQLiteQueue(data_dir / "queue.sqlite3", max_pending=max_pending)
    return LocalBackend(queue, SQLiteRecords(data_dir / "records.sqlite3"), plan)


class LocalBackend:
    shared, kind = False, "sqlite"

    def __init__(self, queue: SQLiteQueue, records: SQLiteRecords, plan: WorkerPlan) -> None:
        self.queue, self.records, self.plan = queue, records, plan

    def audit_place(self, data_dir: Path) -> tuple[Path, Path]:
        return log_place(data_dir, None)  # the head and outbox in the queue file: a job's end and its record are one

    def webhook_store(self) -> Webhooks | None:
        """The endpoints and the outbox, in the queue file (its triggers write the outbox)."""
        return WebhookStore(self.queue.path)

    def upload_outbox(self) -> Uploads | None:
        return UploadOutbox(self.queue.path)  # also without a store: it says so to the file's trigger

    def workers(self, config: WorkerConfig, listener: Listener, hub: Hub) -> DeviceWorker:
        if not self.plan.worker_process:
            return build_worker(config, self.queue, listener)
        process = WorkerProcess(config.with_changes(queue=str(self.queue.path)), listener, self.queue)
        hub.on_audience = process.audience_changed  # sockets and event streams: who wants every event
        return process

    def workers_shown(self, worker: DeviceWorker) -> list[dict[str, Any]]:
        # From the queue, not asked of the worker process (which answers only between its steps, and
        # not at all while it loads a model: /system_stats must not wait for that).
        running = [{"prompt_id": job.id, "node": None} for job in self.queue.running()]
        shown = {
            "id": getattr(worker, "id", "local"),
            "heartbeat_age_s": 0.0,
            "host": socket.gethostname(),
            "state": worker.state(),
            "device": worker.device_stats(),
            "running": running,
        }
        return [shown]

    def start(self) -> None:
        pass

    def stop(self) -> None:
        self.records.close()


class ClusterBackend:
    shared, kind = True, "redis"

    def __init__(self, queue: RedisQueue, choice: backends.QueueChoice, plan: WorkerPlan, node_name: str) -> None:
        self.queue, self.choice, self.plan, self.node_name = queue, choice, plan, node_name
        self.records = RedisRecords(queue)
        self.relay: AuditRelay | None = None

    def webhook_store(self) -> Webhooks | None:
        """The endpoints and the outbox, in Redis (the queue's scripts write the outbox)."""
        return RedisWebhookStore(self.queue.redis, self.queue.prefix, self.queue.call)

    def upload_outbox(self) -> Uploads | None:
        return RedisUploadOutbox(self.queue.redis, self.queue.prefix, self.queue.call)

    def audit_place(self, data_dir: Path) -> tuple[Path, Path]:
        # Every API node keeps its own log (one chain per writer), fed the job ends by the relay.
        folder, head = log_place(data_dir, self.node_name)
        audit_file(head)
        self.relay = AuditRelay(self.queue, head, self.node_name)
        return folder, head

    def workers(self, config: WorkerConfig, listener: Listener, hub: Hub) -> DeviceWorker:
        several_gpus = config.run.device == "cuda" and self.plan.count > 1
        port = self.plan.metrics_port

        def worker_config(index: int) -> WorkerConfig:
            return config.with_changes(
                queue=self.choice.url,
                prefix=self.choice.prefix,
                run=config.run.with_changes(device=f"cuda:{index}") if several_gpus else config.run,
                metrics_port=None if port is None else port + 1 + index,
            )

        local = [worker_config(i) for i in range(self.plan.count)]
        return ClusterWorkers(self.queue, listener, local, audience=hub.audience)

    def workers_shown(self, worker: DeviceWorker) -> list[dict[str, Any]]:
        assert isinstance(worker, ClusterWorkers)
        return [record.shown() for record in worker.workers()]

    def start(self) -> None:
        for warning in self.queue.durability_warnings():
            log.warning("%s", warning)
        if self.relay is not None:
            self.relay.start()

    def stop(self) -> None:
        if self.relay is not None:
            self.relay.stop()
