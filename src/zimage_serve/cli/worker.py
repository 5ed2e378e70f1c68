"""`zimage worker`: a GPU worker of a cluster, on any host that reaches its Redis and mounts its data dir.

It takes the same settings as `zimage serve` (flags, `ZIMAGE_*` variables, or the same `--config` file),
of which it uses the queue, the folders and the device's. SIGTERM or Ctrl-C stops it as a server stops:
no new job, the running ones finish within the grace, and one cut off is queued again."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Annotated

import typer

from zimage_serve.cli.common import console_err, models_roots, run_settings
from zimage_serve.cli.flags import (
    AttentionFlag,
    CompileFlag,
    ConcurrencyFlag,
    ConfigFlag,
    DataDirFlag,
    DeviceFlag,
    DtypeFlag,
    Int8MatmulFlag,
    JobTimeoutFlag,
    LeaseFlag,
    MemoryModeFlag,
    MetricsPortFlag,
    ModelsFlag,
    PreloadFlag,
    PreviewMethodFlag,
    PreviewSizeFlag,
    ShutdownGraceFlag,
)
from zimage_serve.settings import default_data_dir


def worker(
    queue: Annotated[
        str | None, typer.Option(help="The cluster's queue: redis://HOST:PORT/DB (as given to `zimage serve`)")
    ] = None,
    config: ConfigFlag = None,
    data_dir: DataDirFlag = None,
    models: ModelsFlag = None,
    device: DeviceFlag = None,
    dtype: DtypeFlag = None,
    memory_mode: MemoryModeFlag = None,
    attention: AttentionFlag = None,
    compile: CompileFlag = None,
    int8_matmul: Int8MatmulFlag = None,
    concurrency: ConcurrencyFlag = None,
    job_timeout: JobTimeoutFlag = None,
    preload: PreloadFlag = None,
    lease: LeaseFlag = None,
    metrics_port: MetricsPortFlag = None,
    shutdown_grace: ShutdownGraceFlag = None,
    preview_method: PreviewMethodFlag = None,
    preview_size: PreviewSizeFlag = None,
) -> None:
    """Run prompts from a cluster's Redis queue on this machine's device."""
    flags = dict(locals())
    toml = flags.pop("config")
    from zimage_serve.config import ConfigError, ServeConfig
    from zimage_serve.queue import backends
    from zimage_serve.worker.build import WorkerConfig
    from zimage_serve.worker.cluster import run as run_worker
    from zimage_serve.workflow.folders import Folders
    from zimage_serve.workflow.output_journal import journal_folder

    try:
        settings = ServeConfig.load(toml, **flags)
        choice = backends.choose(settings.queue)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint=exc.option or None) from exc
    if not choice.shared:
        raise typer.BadParameter("a worker needs the cluster's queue: redis://HOST:PORT/DB", param_hint="--queue")
    run = run_settings(settings)
    data = settings.data_dir or default_data_dir()
    folders = Folders.default(data, models_roots(models or settings.models or None, data))
    for folder in (folders.input, folders.output, folders.temp):
        folder.mkdir(parents=True, exist_ok=True)
    worker_config = WorkerConfig(
        queue=choice.url,
        prefix=choice.prefix,
        models=folders.models,
        input=folders.input,
        output=folders.output,
        temp=folders.temp,
        run=run,
        journal=journal_folder(data),
        preview_maps=data / "previews",
        metrics_port=settings.metrics_port,
    )
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s [worker] %(name)s: %(message)s")
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    console_err.print(f"zimage worker: queue {choice.shown} (data: {data})", highlight=False)
    raise typer.Exit(run_worker(worker_config, stopping))
