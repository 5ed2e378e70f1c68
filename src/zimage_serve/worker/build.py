"""One way to build a worker, whichever way it runs: in the server's own threads, in its worker process,
or serving a cluster's queue (in a process of its own or beside an API node).

Its settings are one `WorkerConfig`, plain data that crosses into a new process as it is: where its files
are, how it runs prompts (`RunSettings`, the same for `zimage serve` and `zimage worker`), and where a
worker of its own finds its queue. `build_worker` makes the folders, the device placement, the executor
and the worker loop from it, for the queue and the listener the caller opened.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zimage_serve.engine.fastpath import FastPath
from zimage_serve.limits import Limits
from zimage_serve.queue.jobs import LEASE_S

if TYPE_CHECKING:
    from zimage_serve.queue.contract import JobQueue
    from zimage_serve.worker.loop import Listener, Worker
    from zimage_serve.workflow.execute import Executor


@dataclass(frozen=True)
class RunSettings:
    """How a worker runs prompts: its device and the engine's options, what one prompt may ask for, and its
    timings. `zimage serve` and `zimage worker` derive it the same way from their configuration."""

    device: str = "auto"
    dtype: str = "auto"
    fast: FastPath = field(default_factory=FastPath)  # the engine's speed-ups (attention backend, compile)
    memory_mode: str = "auto"  # auto: gpu or smart for Z-Image-Turbo on the card (engine/placement.py)
    preload: bool = True  # load the default model at start, before the first prompt asks for it
    job_timeout: float | None = None  # as configured: None is the device's default, decided where it runs
    concurrency: int = 1  # prompts run at once on the device
    limits: Limits = field(default_factory=Limits)  # what one prompt may ask for (pixels, batch, steps ...)
    lease_s: float = LEASE_S  # how long a worker's claim holds without a heartbeat
    shutdown_grace_s: float = 30.0  # how long a stop lets running prompts finish
    preview_method: str = "auto"  # live previews while sampling: auto or latent2rgb (the same here), or none
    preview_size: int = 512  # a preview's longer side at most, in pixels

    def with_changes(self, **changes: Any) -> RunSettings:
        return replace(self, **changes)


@dataclass(frozen=True)
class WorkerConfig:
    """What a worker is built from: its folders, how it runs prompts, and where it finds its queue."""

    models: list[Path]
    input: Path
    output: Path
    temp: Path
    run: RunSettings = field(default_factory=RunSettings)
    journal: Path | None = None  # the output journal's folder (workflow/output_journal.py)
    preview_maps: Path | None = None  # where fitted latent-to-RGB maps are kept (engine/latent_preview.py)
    log_level: int = logging.WARNING
    # Where a worker in a process of its own finds its jobs: the SQLite file, or the cluster's Redis.
    queue: str = ""
    prefix: str = ""  # of the cluster's keys in Redis ("": the default)
    metrics_port: int | None = None  # a cluster worker's own /metrics, on a loopback port

    def with_changes(self, **changes: Any) -> WorkerConfig:
        return replace(self, **changes)


def build_executor(config: WorkerConfig) -> Executor:
    """The executor a worker runs prompts with: the folders, the device placement, the limits."""
    from zimage_serve.engine.latent_preview import PREVIEWS
    from zimage_serve.engine.placement import Placement
    from zimage_serve.image_safety import use_bomb_limit
    from zimage_serve.workflow.execute import Executor
    from zimage_serve.workflow.folders import Folders, builtin_models
    from zimage_serve.workflow.nodes import NODES
    from zimage_serve.workflow.output_journal import OutputJournal
    from zimage_serve.workflow.previews import PreviewSettings

    run = config.run
    folders = Folders(config.models, config.input, config.output, config.temp, builtin_models())
    use_bomb_limit(run.limits.upload_pixels)
    placement = Placement.choose(run.device, run.dtype, run.fast, run.memory_mode)
    journal = OutputJournal(config.journal) if config.journal is not None else None
    previews = PreviewSettings(run.preview_method, run.preview_size)
    PREVIEWS.keep_in(config.preview_maps)
    return Executor(NODES, folders, placement, limits=run.limits, journal=journal, previews=previews)


def build_worker(
    config: WorkerConfig, store: JobQueue, listener: Listener, executor: Executor | None = None, **hooks: Any
) -> Worker:
    """The worker loop on `store`, telling `listener`; `hooks` are the loop's callbacks for the way it runs
    (on_idle, on_ready, on_beat, on_end)."""
    from zimage_serve.worker.loop import Worker, job_timeout

    executor = executor if executor is not None else build_executor(config)
    return Worker(
        store,
        executor,
        listener,
        job_timeout=job_timeout(config.run.job_timeout, executor.placement.device),
        concurrency=executor.placement.concurrency_cap(config.run.concurrency),
        preload=config.run.preload,
        lease_s=config.run.lease_s,
        **hooks,
    )
