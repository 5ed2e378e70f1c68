"""Everything one server process holds: settings, folders, the store, the executor, the worker, the hub."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zimage_serve.engine.fastpath import FastPath
from zimage_serve.image_safety import use_bomb_limit
from zimage_serve.queue.service import DeviceWorker, QueueService
from zimage_serve.queue.store import JobStore
from zimage_serve.queue.worker import Worker
from zimage_serve.queue.worker_process import WorkerConfig, WorkerProcess
from zimage_serve.security.guard import Security, SecuritySettings
from zimage_serve.server.hub import Hub
from zimage_serve.server.submissions import SubmissionBatcher
from zimage_serve.templates import TemplateLibrary
from zimage_serve.workflow.folders import Folders
from zimage_serve.workflow.limits import Limits
from zimage_serve.workflow.nodes import NODES
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
        self.journal_folder = data / "runs"  # the files each running prompt wrote (workflow/output_journal.py)
        self.store = JobStore(data / "queue.sqlite3", max_pending=settings.max_queue)
        self.security = Security(
            settings.security, settings.listen, settings.port, data, self.store.path, settings.limits
        )
        use_bomb_limit(settings.limits.upload_pixels)
        self.validator = Validator(NODES, self.folders, settings.limits, PromptTokens(self.folders))
        self.worker = self._worker()
        self.service = QueueService(
            self.store, self.validator, self.worker, self.folders, screen=self.security.blocklist
        )
        self.submissions = SubmissionBatcher(self.service)
        self.large_bodies = asyncio.Semaphore(1)  # POST /prompt bodies parsed off the event loop, one at a time
        self._started = self._stopped = False

    def _worker(self) -> DeviceWorker:
        settings = self.settings
        if settings.worker_process:
            config = WorkerConfig(
                store_path=self.store.path,
                models=self.folders.models,
                input=self.folders.input,
                output=self.folders.output,
                temp=self.folders.temp,
                device=settings.device,
                dtype=settings.dtype,
                fast=settings.fast,
                memory_mode=settings.memory_mode,
                preload=settings.preload,
                job_timeout=settings.job_timeout,
                concurrency=settings.concurrency,
                limits=settings.limits,
                journal=self.journal_folder,
                log_level=logging.getLogger().getEffectiveLevel(),
            )
            process = WorkerProcess(config, self, self.store)
            self.hub.on_audience = process.audience_changed
            return process
        from zimage_serve.engine.parts import Placing
        from zimage_serve.queue.worker import job_timeout
        from zimage_serve.workflow.execute import Executor
        from zimage_serve.workflow.output_journal import OutputJournal

        placing = Placing.choose(settings.device, settings.dtype, settings.fast, settings.memory_mode)
        timeout = job_timeout(settings.job_timeout, placing.device)
        executor = Executor(
            NODES, self.folders, placing, limits=settings.limits, journal=OutputJournal(self.journal_folder)
        )
        concurrency = placing.concurrency_cap(settings.concurrency)
        return Worker(
            self.store, executor, self, job_timeout=timeout, concurrency=concurrency, preload=settings.preload
        )

    def start(self) -> None:
        """Recover what a crash left running, then start the worker; once (later calls do nothing)."""
        if self._started:
            return
        self._started = True
        self.security.announce()
        recovered = self.store.recover()
        for job in recovered:
            log.warning(
                "prompt %s was running when the server stopped: %s",
                job.id,
                "queued again" if job.state == "pending" else "marked failed",
            )
        self.worker.start()

    def stop(self) -> None:
        if not self._started or self._stopped:
            return
        self._stopped = True
        if not self.worker.stop(timeout=self.settings.shutdown_grace_s):
            log.error("the running prompt did not stop; it will be run again at the next start")
        self.security.stop()
        self.store.close()

    # -- Listener: worker → clients ------------------------------------------------------------------
    def job_event(
        self, prompt_id: str, client_id: str | None, event: str, data: dict[str, Any], owner: str = ""
    ) -> None:
        self.hub.publish(event, data, client_id, owner)

    def queue_changed(self) -> None:
        self.hub.broadcast("status", self.status)

    def status(self) -> dict[str, Any]:
        return {"status": {"exec_info": {"queue_remaining": self.service.remaining()}}}
