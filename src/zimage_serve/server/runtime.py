"""Everything one server process holds: settings, folders, the store, the executor, the worker, the hub."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from zimage_serve.config import ConfigError
from zimage_serve.engine.fastpath import FastPath
from zimage_serve.identity import LOCAL, USER, Identity
from zimage_serve.image_safety import use_bomb_limit
from zimage_serve.limits import Limits, StorageLimits
from zimage_serve.metrics import ClusterCollector, node_registry, serve_on
from zimage_serve.queue import backends
from zimage_serve.queue.audit_relay import AuditRelay, audit_file
from zimage_serve.queue.jobs import LEASE_S, STATES, QueueUnavailable
from zimage_serve.queue.redis_queue import RedisQueue
from zimage_serve.queue.store import JobStore
from zimage_serve.security.audit import iso, log_place
from zimage_serve.security.guard import Security, SecuritySettings
from zimage_serve.security.storage import Storage
from zimage_serve.security.tokens import Token
from zimage_serve.server.hub import Hub
from zimage_serve.server.service import DeviceWorker, QueueService
from zimage_serve.server.submissions import SubmissionBatcher
from zimage_serve.server.waits import JobWaits
from zimage_serve.templates import TemplateLibrary
from zimage_serve.templates.library import USERS
from zimage_serve.worker.build import WorkerConfig, build_worker
from zimage_serve.worker.cluster_workers import ClusterWorkers
from zimage_serve.worker.loop import CLOSING
from zimage_serve.worker.process import WorkerProcess
from zimage_serve.workflow.folders import Folders
from zimage_serve.workflow.nodes import NODES
from zimage_serve.workflow.output_journal import journal_folder
from zimage_serve.workflow.tokens import PromptTokens
from zimage_serve.workflow.validate import Validator

log = logging.getLogger(__name__)


@dataclass
class ServerSettings:
    data_dir: Path
    models: list[Path] = field(default_factory=list)
    listen: str = "127.0.0.1"
    port: int = 8188
    device: str = "auto"
    dtype: str = "auto"
    max_queue: int = 10000
    job_timeout: float | None = None  # seconds; None: 30 on a GPU, 1800 elsewhere; 0: no limit
    concurrency: int = 1  # prompts run at once on the device
    worker_process: bool = True  # run prompts in a child process (False: threads in this one)
    fast: FastPath = field(default_factory=FastPath)  # the engine's speed-ups (attention backend, compile)
    memory_mode: str = "auto"  # auto: what fits Z-Image-Turbo on the card (engine/parts.py Placing.choose)
    preload: bool = True  # the worker loads the default model (zimage-nano) at start
    max_body_bytes: int = 8 * 1024 * 1024  # JSON requests
    max_upload_bytes: int = 100 * 1024 * 1024
    retry_after_s: int = 5
    limits: Limits = field(default_factory=Limits)  # what one prompt may ask for (pixels, batch, steps ...)
    shutdown_grace_s: float = 30.0
    security: SecuritySettings = field(default_factory=SecuritySettings)
    queue: str | None = None  # None: the SQLite file in the data dir; redis://...: a cluster's (queue/backends.py)
    workers: int = 1  # with a Redis queue: workers this node runs (0: an API node only)
    lease_s: float = LEASE_S  # how long a worker's claim holds without a heartbeat
    metrics_port: int | None = None  # /metrics also on this loopback port (local workers: the ports after it)
    node_name: str = ""  # with a Redis queue: this API node's name (its audit log's folder); default host-port


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
        self.queue_choice = backends.choose(settings.queue)
        if not self.queue_choice.shared and settings.workers != 1:
            raise ConfigError(
                "a node of its own runs one worker; more (or none) need a shared queue (--queue redis://...)",
                "--workers",
            )
        self.store = backends.open_queue(self.queue_choice, data, settings.max_queue)
        self.node_name = settings.node_name or f"{socket.gethostname()}-{settings.port}"
        self.audit_relay: AuditRelay | None = None
        # One machine: the log's head and outbox are in the queue file. A cluster: every API node keeps its own
        # log (one chain per writer), fed job ends by the relay.
        audit_folder, audit_head = log_place(data, None if isinstance(self.store, JobStore) else self.node_name)
        if not isinstance(self.store, JobStore):
            audit_file(audit_head)
            self.audit_relay = AuditRelay(cast(RedisQueue, self.store), audit_head, self.node_name)
        self.security = Security(
            settings.security, settings.listen, settings.port, data, audit_head, settings.limits, audit_folder
        )
        self.storage = Storage(self.stored_by, settings.security.user_storage)
        use_bomb_limit(settings.limits.upload_pixels)
        self.validator = Validator(NODES, self.folders, settings.limits, PromptTokens(self.folders))
        self.worker = self._worker()
        self.service = QueueService(
            self.store, self.validator, self.worker, self.folders, screen=self.security.blocklist
        )
        self.submissions = SubmissionBatcher(self.service, remote=self.queue_choice.shared)
        self.waits = JobWaits(lambda job_id: self.service.get(job_id, LOCAL))
        self.metrics = node_registry(ClusterCollector(lambda: {s: self.store.count(s) for s in STATES}, self.workers))
        self.large_bodies = asyncio.Semaphore(1)  # POST /prompt bodies parsed off the event loop, one at a time
        self._started = self._stopped = False

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

    def _worker(self) -> DeviceWorker:
        config = self._worker_config()
        if self.queue_choice.shared:
            return ClusterWorkers(
                cast(RedisQueue, self.store),
                self,
                [self._cluster_worker(config, i) for i in range(self.settings.workers)],
                audience=lambda: len(self.hub.sockets),
            )
        if self.settings.worker_process:
            assert isinstance(self.store, JobStore)
            process = WorkerProcess(config.with_changes(queue=str(self.store.path)), self, self.store)
            self.hub.on_audience = process.audience_changed
            return process
        return build_worker(config, self.store, self)

    def _cluster_worker(self, config: WorkerConfig, index: int) -> WorkerConfig:
        """Local worker `index`: with `--device cuda` and several workers, one GPU each."""
        settings = self.settings
        several_gpus = settings.device == "cuda" and settings.workers > 1
        return config.with_changes(
            queue=self.queue_choice.url,
            prefix=self.queue_choice.prefix,
            device=f"cuda:{index}" if several_gpus else settings.device,
            metrics_port=None if settings.metrics_port is None else settings.metrics_port + 1 + index,
        )

    def _worker_config(self) -> WorkerConfig:
        """What every worker of this server is built from, whichever way it runs."""
        settings = self.settings
        return WorkerConfig(
            models=self.folders.models,
            input=self.folders.input,
            output=self.folders.output,
            temp=self.folders.temp,
            journal=self.journal_folder,
            device=settings.device,
            dtype=settings.dtype,
            fast=settings.fast,
            memory_mode=settings.memory_mode,
            preload=settings.preload,
            job_timeout=settings.job_timeout,
            concurrency=settings.concurrency,
            limits=settings.limits,
            lease_s=settings.lease_s,
            shutdown_grace_s=settings.shutdown_grace_s,
            log_level=logging.getLogger().getEffectiveLevel(),
        )

    def workers(self) -> list[dict[str, Any]]:
        """Every worker serving this node's queue, as /system_stats lists them."""
        if isinstance(self.worker, ClusterWorkers):
            return [record.shown() for record in self.worker.workers()]
        # From the queue, not asked of the worker process (which answers only between its steps, and
        # not at all while it loads a model: /system_stats must not wait for that).
        running = [{"prompt_id": job.id, "node": None} for job in self.store.running()]
        return [
            {
                "id": getattr(self.worker, "id", "local"),
                "heartbeat_age_s": 0.0,
                "host": socket.gethostname(),
                "state": self.worker.state(),
                "device": self.worker.device_stats(),
                "running": running,
            }
        ]

    def start(self) -> None:
        """Recover what a crash left running, then start the worker; once (later calls do nothing)."""
        if self._started:
            return
        self._started = True
        self.security.announce()
        if isinstance(self.store, RedisQueue):
            for warning in self.store.durability_warnings():
                log.warning("%s", warning)
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
        self.worker.start()
        if self.audit_relay is not None:
            self.audit_relay.start()
        if self.settings.metrics_port is not None:
            serve_on(self.settings.metrics_port, self.metrics)

    async def revoked(self, user: str) -> None:
        """The token of `user` (a user id) was revoked (here, by another node, or on the command line): its
        sockets are closed, its waiting jobs deleted and its running ones interrupted, as the audit log
        records."""
        await self.hub.close_user(user)
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
        self.security.audit.add(
            {
                "time": iso(time.time()),
                "kind": "revocation",
                "user": user,
                "deleted": deleted,
                "interrupted": interrupted,
            }
        )

    def stop(self) -> None:
        if not self._started or self._stopped:
            return
        self._stopped = True
        if not self.worker.stop(timeout=self.settings.shutdown_grace_s):
            log.error("the running prompt did not stop; it will be run again at the next start")
        if self.audit_relay is not None:
            self.audit_relay.stop()
        self.security.stop()
        self.store.close()

    # -- Listener: worker → clients ------------------------------------------------------------------
    def job_event(
        self, prompt_id: str, client_id: str | None, event: str, data: dict[str, Any], owner: str = ""
    ) -> None:
        self.hub.publish(event, data, client_id, owner)
        if event in CLOSING:  # recorded in the queue before it is sent: whoever waits may read it now
            self.waits.ended(prompt_id)

    def queue_changed(self) -> None:
        # While the queue is away, sockets get its state with the next change, or as they connect.
        with contextlib.suppress(QueueUnavailable):
            self.hub.broadcast_by_view("status", self.status)

    def status(self, identity: Identity = LOCAL) -> dict[str, Any]:
        """ComfyUI's `status` message, as `identity` sees the queue (its own prompts; all, for an admin)."""
        return {"status": {"exec_info": {"queue_remaining": self.service.remaining(identity)}}}
