"""Everything one server process holds: settings, folders, the store, the executor, the worker, the hub."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from zimage_serve.identity import LOCAL, USER, Identity
from zimage_serve.image_safety import use_bomb_limit
from zimage_serve.limits import StorageLimits
from zimage_serve.metrics import ClusterCollector, node_registry, serve_on
from zimage_serve.queue.jobs import STATES, QueueUnavailable
from zimage_serve.security.audit import iso
from zimage_serve.security.guard import Security, SecuritySettings
from zimage_serve.security.storage import Storage
from zimage_serve.security.tokens import Token
from zimage_serve.server.backend import WorkerPlan, open_backend
from zimage_serve.server.hub import Hub
from zimage_serve.server.service import QueueService
from zimage_serve.server.stored_outputs import StoredOutputs
from zimage_serve.server.submissions import SubmissionBatcher
from zimage_serve.server.v2.feeds import JobFeeds
from zimage_serve.server.v2.job_view import JobViews
from zimage_serve.server.waits import JobWaits
from zimage_serve.storage.bucket import Bucket, OutputStoreSettings
from zimage_serve.storage.uploads import Upload
from zimage_serve.templates import TemplateLibrary
from zimage_serve.templates.library import USERS
from zimage_serve.webhooks.delivery import DeliveryPolicy
from zimage_serve.webhooks.store import Delivery
from zimage_serve.worker.build import RunSettings, WorkerConfig
from zimage_serve.workflow.events import CLOSING
from zimage_serve.workflow.folders import Folders
from zimage_serve.workflow.nodes import NODES
from zimage_serve.workflow.output_journal import journal_folder
from zimage_serve.workflow.tokens import PromptTokens
from zimage_serve.workflow.validate import Validator

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class ServerSettings:
    data_dir: Path
    models: list[Path] = field(default_factory=list)
    listen: str = "127.0.0.1"
    port: int = 8188
    run: RunSettings = field(default_factory=RunSettings)  # how this node's workers run prompts
    max_queue: int = 10000
    worker_process: bool = True  # run prompts in a child process (False: threads in this one)
    max_body_bytes: int = 8 * 1024 * 1024  # JSON requests
    max_upload_bytes: int = 100 * 1024 * 1024
    retry_after_s: int = 5
    security: SecuritySettings = field(default_factory=SecuritySettings)
    queue: str | None = None  # None: the SQLite file in the data dir; redis://...: a cluster's (queue/backends.py)
    workers: int = 1  # with a Redis queue: workers this node runs (0: an API node only)
    metrics_port: int | None = None  # /metrics also on this loopback port (local workers: the ports after it)
    node_name: str = ""  # with a Redis queue: this API node's name (its audit log's folder); default host-port
    job_retention_s: float = 30 * 86400.0  # how long v2 says a job is kept after it ends (its expires_at)
    event_streams: int = 100  # v2 event streams one user may hold open at once
    webhooks: DeliveryPolicy = field(default_factory=DeliveryPolicy)  # how job events reach their endpoints
    outputs: OutputStoreSettings | None = None  # outputs uploaded to an S3-compatible store (storage/)


class Runtime:
    """Built once per process (the composition root); routes talk to `service`, `hub`, `folders` and `settings`.

    The server process imports neither torch nor diffusers (the worker process does): it starts
    answering in about a second, while the worker loads the models' code and the default model."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        data = settings.data_dir
        self.folders = Folders.default(data, settings.models)
        for folder in (self.folders.input, self.folders.output, self.folders.temp):
            folder.mkdir(parents=True, exist_ok=True)
        self.hub = Hub()
        self.templates = TemplateLibrary(data / "templates")
        self.journal_folder = journal_folder(data)  # the files each running prompt wrote
        self.node_name = settings.node_name or f"{socket.gethostname()}-{settings.port}"
        plan = WorkerPlan(settings.worker_process, settings.workers, settings.metrics_port)
        self.backend = open_backend(settings.queue, data, settings.max_queue, plan, self.node_name)
        self.store = self.backend.queue
        self.records = self.backend.records
        audit_folder, audit_head = self.backend.audit_place(data)
        self.security = Security(
            settings.security, settings.listen, settings.port, data, audit_head, settings.run.limits, audit_folder
        )
        self.storage = Storage(self.stored_by, settings.security.user_storage)
        use_bomb_limit(settings.run.limits.upload_pixels)
        self.validator = Validator(NODES, self.folders, settings.run.limits, PromptTokens(self.folders))
        self.worker = self.backend.workers(self._worker_config(), self, self.hub)
        self.webhooks = self.backend.webhook_store()
        bucket = Bucket(settings.outputs) if settings.outputs is not None else None
        self.uploads = self.backend.upload_outbox()
        if self.uploads is not None:
            self.uploads.use(bucket.location if bucket is not None else None)  # for the jobs that end from now on
        self.outputs = StoredOutputs(bucket, self.uploads)
        self.service = QueueService(
            self.store, self.validator, self.worker, self.folders, self.security.blocklist, self.webhooks
        )
        self.submissions = SubmissionBatcher(self.service, remote=self.backend.shared)
        self.waits = JobWaits(lambda job_id: self.service.get(job_id, LOCAL))
        self.waits.on_count = lambda count: self._ends_wanted()
        self.feeds = JobFeeds(on_watched=self.hub.streams_changed)
        self.v2_jobs = JobViews(
            self.store, self.records, self.folders, self.feeds, settings.job_retention_s, self.outputs
        )
        self.metrics = node_registry(ClusterCollector(lambda: {s: self.store.count(s) for s in STATES}, self.workers))
        self.large_bodies = asyncio.Semaphore(1)  # POST /prompt bodies parsed off the event loop, one at a time
        # An asset file's records and the file change together: storing bytes and recording them, or
        # forgetting a record and removing the bytes it was the last to hold, never interleave here.
        self.asset_files = asyncio.Lock()
        self._started = self._stopped = False
        self.webhooks_due: Callable[[], None] = lambda: None  # wakes the webhook dispatcher (app.py sets it)
        self.uploads_due: Callable[[], None] = lambda: None  # wakes the uploader (app.py sets it)

    async def quick(self, call: Callable[..., T], *args: Any) -> T:
        """A short call on the queue's store or the records: on the event loop for this machine's SQLite
        files (a statement of well under a millisecond costs less than the hop to a thread), in a thread
        for a cluster's Redis, which the event loop never waits on."""
        if self.backend.shared:
            return await asyncio.to_thread(call, *args)
        return call(*args)

    # -- what users store ------------------------------------------------------------------------------
    def userdata_folder(self, user: str) -> Path:
        """Where a user's saved workflows and settings are (the local operator's: `default`)."""
        return self.settings.data_dir / "userdata" / (user or "default")

    def stored_by(self, user: str) -> list[Path]:
        """The folders of what `user` stores (their storage limits count these): uploads, userdata, templates."""
        space = self.folders.space(user)
        return [space.input, space.temp, self.userdata_folder(user), self.templates.root / USERS / user]

    def storage_limits(self, identity: Identity, token: Token | None) -> StorageLimits | None:
        return self.storage.limits_of(
            identity, token.max_storage if token else None, token.max_files if token else None
        )

    def _worker_config(self) -> WorkerConfig:
        """What every worker of this server is built from, whichever way it runs."""
        return WorkerConfig(
            models=self.folders.models,
            input=self.folders.input,
            output=self.folders.output,
            temp=self.folders.temp,
            run=self.settings.run,
            journal=self.journal_folder,
            preview_maps=self.settings.data_dir / "previews",
            log_level=logging.getLogger().getEffectiveLevel(),
        )

    def workers(self) -> list[dict[str, Any]]:
        """Every worker serving this node's queue, as /system_stats lists them."""
        return self.backend.workers_shown(self.worker)

    def start(self) -> None:
        """Recover what a crash left running, then start the worker; once (later calls do nothing)."""
        if self._started:
            return
        self._started = True
        self.security.announce()
        try:
            recovered = self.store.recover()
        except QueueUnavailable as exc:  # a cluster's Redis is down: answer 503 until it is back
            log.error("%s; requests that need the queue are answered 503 until it is back", exc)
            recovered = []
        for job in recovered:
            log.warning(
                "prompt %s was running when the server stopped: %s",
                job.id,
                "queued again" if job.state == "pending" else "marked failed",
            )
        self._ends_wanted()
        self.worker.start()
        self.backend.start()
        if self.settings.metrics_port is not None:
            serve_on(self.settings.metrics_port, self.metrics)

    async def revoked(self, user: str) -> None:
        """The token of `user` (a user id) was revoked (here, by another node, or on the command line): its
        sockets are closed, its waiting jobs deleted and its running ones interrupted, as the audit log
        records."""
        await self.hub.close_user(user)
        self.feeds.close_holder(user)
        owner = Identity(user, role=USER)
        deleted = await asyncio.to_thread(self.service.delete_pending, None, owner)
        interrupted = await asyncio.to_thread(self.service.interrupt, None, owner)
        if not deleted and not interrupted:
            return
        log.warning(
            "the token of user %s was revoked: %d waiting job(s) deleted%s",
            user,
            deleted,
            ", its running ones interrupted" if interrupted else "",
        )
        self.audit("revocation", user=user, deleted=deleted, interrupted=interrupted)

    def files_stored(self, job_id: str) -> None:
        """A job's files are in the output store, or given up on: its held job.succeeded webhooks go now."""
        if self.webhooks is not None:
            self.webhooks.release(job_id, time.time())
        self.webhooks_due()

    def audit(self, kind: str, **fields: Any) -> None:
        """A record in the audit log, now (any thread; its writer appends it)."""
        self.security.audit.add({"time": iso(time.time()), "kind": kind, **fields})

    def audit_delivery(self, delivery: Delivery, outcome: str, error: str | None) -> None:
        """A webhook's delivery, its first failed try, and its giving up: which event of which job went to
        which endpoint, and how it went (not every retry: an endpoint away for a day would fill the log)."""
        if outcome == "retried" and delivery.attempts > 1:
            return
        found: dict[str, Any] = {
            "user": delivery.owner,
            "job_id": delivery.job_id,
            "outcome": outcome,
            "event": delivery.event,
            "endpoint": delivery.endpoint.name,
            "webhook_id": delivery.id,
            "attempts": delivery.attempts,
        }
        if error:
            found["error"] = error[:200]
        self.audit("webhook", **found)

    def audit_upload(self, upload: Upload, outcome: str, detail: list[str] | str) -> None:
        """A job's files stored (their keys), its first failed try and its giving up (why)."""
        if outcome == "retried" and upload.attempts > 1:
            return
        found: dict[str, Any] = {"user": upload.owner, "job_id": upload.job_id, "outcome": outcome}
        found.update({"files": detail} if isinstance(detail, list) else {"error": detail[:200]})
        self.audit("output_store", **found, attempts=upload.attempts)

    def stop(self) -> None:
        if not self._started or self._stopped:
            return
        self._stopped = True
        if not self.worker.stop(timeout=self.settings.run.shutdown_grace_s):
            log.error("the running prompt did not stop; it will be run again at the next start")
        self.backend.stop()
        self.security.stop()
        if self.webhooks is not None:
            self.webhooks.close()
        if self.uploads is not None:
            self.uploads.close()
        self.store.close()

    # -- Listener: worker → clients ------------------------------------------------------------------
    def job_event(
        self, prompt_id: str, client_id: str | None, event: str, data: dict[str, Any], owner: str = ""
    ) -> None:
        self.hub.publish(event, data, client_id, owner)
        self.feeds.publish(prompt_id, event, data)
        if event in CLOSING:  # recorded in the queue before it is sent: whoever waits may read it now
            self.waits.ended(prompt_id)
            self.uploads_due()
            self.webhooks_due()

    def listening(self) -> bool:
        return self.hub.audience() > 0

    def _ends_wanted(self) -> None:
        """Tell the worker how many here wait for job ends as they happen, beyond sockets and streams: routes
        waiting for their jobs, and the webhooks and uploads that follow each job's end."""
        webhooks = self.webhooks is not None and self.webhooks.has_endpoints
        self.worker.ends_wanted(self.waits.count + int(webhooks) + int(self.outputs.bucket is not None))

    def queue_changed(self) -> None:
        self._ends_wanted()  # the webhooks may have an endpoint now: as the job queued ends, they want it
        self.webhooks_due()  # a job queued: its event may be in the outbox
        # While the queue is away, sockets get its state with the next change, or as they connect.
        with contextlib.suppress(QueueUnavailable):
            self.hub.broadcast_by_view("status", self.status)

    def status(self, identity: Identity = LOCAL) -> dict[str, Any]:
        """ComfyUI's `status` message, as `identity` sees the queue (its own prompts; all, for an admin)."""
        return {"status": {"exec_info": {"queue_remaining": self.service.remaining(identity)}}}
