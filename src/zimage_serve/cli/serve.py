"""`zimage serve`: ComfyUI's API on 127.0.0.1:8188, with a persistent queue.

Every option may also come from a TOML file (`--config`) or a `ZIMAGE_*` variable (see config.py); a flag
given here wins. The defaults shown are the built-in ones."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

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
from zimage_serve.errors import ZImageError
from zimage_serve.limits import Limits
from zimage_serve.settings import default_data_dir

DEFAULTS = Limits()

if TYPE_CHECKING:
    import socket

    from zimage_serve.config import ServeConfig
    from zimage_serve.storage.bucket import OutputStoreSettings
    from zimage_serve.webhooks.delivery import DeliveryPolicy


def delivery_policy(allow: list[str], retry_hours: float) -> DeliveryPolicy:
    """How webhook events are delivered; a network that is not one is an error naming --webhook-allow."""
    import ipaddress

    from zimage_serve.webhooks.delivery import DeliveryPolicy

    try:
        networks = tuple(ipaddress.ip_network(text, strict=False) for text in allow)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--webhook-allow") from exc
    return DeliveryPolicy(retry_for_s=retry_hours * 3600, allowed=networks)


def output_store(config: ServeConfig) -> OutputStoreSettings | None:
    from zimage_serve.storage.bucket import OutputStoreSettings

    if config.output_store is None:
        return None
    return OutputStoreSettings(
        config.output_store,
        keep_local=config.keep_local,
        public_url=config.output_public_url or "",
        url_lifetime_s=config.output_url_lifetime,
        retry_for_s=config.output_retry_hours * 3600,
    )


def serve(
    config: ConfigFlag = None,
    listen: Annotated[
        str | None, typer.Option(help="Address to bind (0.0.0.0 for every interface) [default: 127.0.0.1]")
    ] = None,
    port: Annotated[int | None, typer.Option(help="TCP port [default: 8188]", min=1, max=65535)] = None,
    data_dir: DataDirFlag = None,
    models: ModelsFlag = None,
    device: DeviceFlag = None,
    dtype: DtypeFlag = None,
    memory_mode: MemoryModeFlag = None,
    attention: AttentionFlag = None,
    compile: CompileFlag = None,
    int8_matmul: Int8MatmulFlag = None,
    max_queue: Annotated[
        int | None, typer.Option(help="Waiting prompts beyond which POST /prompt answers 429 [default: 10000]", min=1)
    ] = None,
    job_timeout: JobTimeoutFlag = None,
    concurrency: ConcurrencyFlag = None,
    preload: PreloadFlag = None,
    worker_process: Annotated[
        bool | None,
        typer.Option(
            help="Run prompts in a child process, so serving requests and running prompts never wait on one "
            "interpreter lock (--no-worker-process: threads in the server process)"
        ),
    ] = None,
    shutdown_grace: ShutdownGraceFlag = None,
    preview_method: PreviewMethodFlag = None,
    preview_size: PreviewSizeFlag = None,
    max_pixels: Annotated[
        int | None, typer.Option(help=f"Pixels per image (width × height) [default: {DEFAULTS.pixels}]", min=1)
    ] = None,
    max_batch: Annotated[
        int | None, typer.Option(help=f"Images in one batch [default: {DEFAULTS.batch}]", min=1)
    ] = None,
    max_steps: Annotated[int | None, typer.Option(help=f"Sampler steps [default: {DEFAULTS.steps}]", min=1)] = None,
    max_prompt_tokens: Annotated[
        int | None, typer.Option(help=f"Tokens of one prompt text [default: {DEFAULTS.prompt_tokens}]", min=1)
    ] = None,
    max_prompt_bytes: Annotated[
        int | None, typer.Option(help=f"UTF-8 bytes of one prompt text [default: {DEFAULTS.prompt_bytes}]", min=1)
    ] = None,
    max_nodes: Annotated[
        int | None, typer.Option(help=f"Nodes in one graph [default: {DEFAULTS.nodes}]", min=1)
    ] = None,
    max_upload_pixels: Annotated[
        int | None,
        typer.Option(
            help=f"Pixels of an uploaded or loaded image, over all its frames [default: {DEFAULTS.upload_pixels}]",
            min=1,
        ),
    ] = None,
    max_request_pixels: Annotated[
        int | None,
        typer.Option(
            help="Pixels one OpenAI images request may ask for (n × width × height) "
            f"[default: {DEFAULTS.request_pixels}]",
            min=1,
        ),
    ] = None,
    auth: Annotated[
        str | None,
        typer.Option(
            help="Token authentication: on, off, or auto (on unless the server binds to loopback only with no "
            "--trusted-proxy; a request with forwarding headers needs a token even then) [default: auto]; tokens: "
            "`zimage tokens create`"
        ),
    ] = None,
    allow_ip: Annotated[
        list[str] | None,
        typer.Option(help="Only these addresses may connect: an IPv4 or IPv6 address or CIDR (repeatable)"),
    ] = None,
    trusted_proxy: Annotated[
        list[str] | None,
        typer.Option(help="A reverse proxy whose X-Forwarded-For is believed: address or CIDR (repeatable)"),
    ] = None,
    allow_origin: Annotated[
        list[str] | None,
        typer.Option(help="A web origin (https://host[:port]) whose pages may call this server (repeatable)"),
    ] = None,
    public_url: Annotated[
        str | None,
        typer.Option(help="The URL clients reach this server at, for the absolute URLs it hands out"),
    ] = None,
    blocklist: Annotated[
        list[Path] | None,
        typer.Option(help="A word-filter file: one rule a line, reloaded when it changes (repeatable)"),
    ] = None,
    audit_prompts: Annotated[
        str | None,
        typer.Option(help="What the audit log keeps of a prompt's text: text, or hash (its SHA-256) [default: text]"),
    ] = None,
    audit_max_bytes: Annotated[
        str | None,
        typer.Option(
            help="The audit log's size at most, as 500MB or 2GiB: the oldest segments go beyond it [default: 1GiB]"
        ),
    ] = None,
    audit_retention_days: Annotated[
        float | None,
        typer.Option(help="Days of audit log kept: older segments go [default: 0, no age limit]"),
    ] = None,
    user_storage: Annotated[
        str | None,
        typer.Option(
            help="What each user may store (uploads, saved workflows, templates), as 500MB or 2GiB; a token's "
            "--max-storage overrides it [default: 1GiB]"
        ),
    ] = None,
    user_files: Annotated[
        int | None,
        typer.Option(help="Files each user may store; a token's --max-files overrides it [default: 10000]", min=1),
    ] = None,
    queue: Annotated[
        str | None,
        typer.Option(
            help="The queue: the SQLite file in the data dir [default], or redis://HOST:PORT/DB shared by every "
            "API node and worker of a cluster (?prefix=NAME keeps clusters apart in one Redis)"
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            help="With --queue redis://: workers this node runs as child processes (0: an API node only; "
            "--device cuda gives each its own GPU) [default: 1]",
            min=0,
            max=64,
        ),
    ] = None,
    lease: LeaseFlag = None,
    metrics_port: MetricsPortFlag = None,
    node_name: Annotated[
        str | None,
        typer.Option(help="With --queue redis://: this API node's name, for its audit log [default: HOST-PORT]"),
    ] = None,
    job_retention_days: Annotated[
        float | None,
        typer.Option(
            help="Days a finished job is kept (its outputs' records with it), as Comfy API v2's "
            "expires_at says [default: 30]"
        ),
    ] = None,
    event_streams: Annotated[
        int | None,
        typer.Option(help="Comfy API v2 event streams one user may hold open at once [default: 100]"),
    ] = None,
    webhook_allow: Annotated[
        list[str] | None,
        typer.Option(
            help="A private or local network (CIDR) webhook deliveries may reach all the same (repeatable; "
            "loopback, private and link-local addresses are refused otherwise)"
        ),
    ] = None,
    webhook_retry_hours: Annotated[
        float | None,
        typer.Option(help="How long an undelivered webhook event is retried before it is dead [default: 24]"),
    ] = None,
    output_store: Annotated[
        str | None,
        typer.Option(
            help="Upload every output to this S3-compatible bucket: s3://BUCKET/PREFIX (endpoint and credentials "
            "from AWS_* variables or ~/.aws files)"
        ),
    ] = None,
    keep_local: Annotated[
        bool | None,
        typer.Option(
            "--keep-local/--no-keep-local",
            help="With --output-store: keep each output's file on disk, or empty it once its object is stored "
            "[default: keep]",
        ),
    ] = None,
    output_public_url: Annotated[
        str | None,
        typer.Option(help="With --output-store: objects are public at URL/KEY (a CDN); else URLs are presigned"),
    ] = None,
    output_url_lifetime: Annotated[
        int | None, typer.Option(help="Seconds a presigned object URL holds (at most 7 days) [default: 3600]")
    ] = None,
    output_retry_hours: Annotated[
        float | None,
        typer.Option(help="How long a job's outputs are retried while the store is away [default: 24]"),
    ] = None,
) -> None:
    """Serve ComfyUI's HTTP and WebSocket API.

    Every limit is checked before a prompt is queued, and refused with a 400 that names it."""
    flags = dict(locals())  # the options as given (None: not given), before any other name is bound here
    toml = flags.pop("config")
    from zimage_serve.config import ConfigError, ServeConfig  # pydantic-settings: with the command only

    try:
        settings_config = ServeConfig.load(toml, **flags)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint=exc.option or None) from exc
    _serve(settings_config, models)


def _serve(config: ServeConfig, models: list[Path] | None) -> None:
    from zimage_serve.server.listen import bind

    # First of all: a port in use (ComfyUI's, say) or an address not of this machine is one line naming
    # --port or --listen, at once, before the worker starts or a model loads; uvicorn is given these sockets.
    sockets = bind(config.listen, config.port)
    try:
        _serve_on(config, models, sockets)
    finally:
        for sock in sockets:
            sock.close()


def _serve_on(config: ServeConfig, models: list[Path] | None, sockets: list[socket.socket]) -> None:
    from zimage_serve.config import ConfigError
    from zimage_serve.limits import StorageLimits
    from zimage_serve.security.guard import SecuritySettings
    from zimage_serve.server.app import create_app
    from zimage_serve.server.connections import ConnectionLimits, bounded_server
    from zimage_serve.server.runtime import ServerSettings

    roots = models_roots(models or config.models or None, config.data_dir)
    run = run_settings(config)
    try:
        security = SecuritySettings(
            auth=config.auth,
            allow_ip=tuple(config.allow_ip),
            trusted_proxy=tuple(config.trusted_proxy),
            allow_origin=tuple(config.allow_origin),
            public_url=config.public_url,
            blocklist=tuple(config.blocklist),
            audit_prompts=config.audit_prompts,
            audit_rotate_bytes=config.audit_rotate_mb * 1024 * 1024,
            audit_max_bytes=int(config.audit_max_bytes),
            audit_retention_days=config.audit_retention_days,
            user_storage=StorageLimits(int(config.user_storage), config.user_files),
        )
        settings = ServerSettings(
            data_dir=config.data_dir or default_data_dir(),
            models=roots,
            listen=config.listen,
            port=config.port,
            run=run,
            max_queue=config.max_queue,
            worker_process=config.worker_process,
            security=security,
            queue=config.queue,
            workers=config.workers,
            metrics_port=config.metrics_port,
            node_name=config.node_name or "",
            job_retention_s=config.job_retention_days * 86400,
            event_streams=config.event_streams,
            webhooks=delivery_policy(config.webhook_allow, config.webhook_retry_hours),
            outputs=output_store(config),
        )
        app = create_app(settings)
    except ZImageError as exc:
        message = str(exc)
        if isinstance(exc, ConfigError) and exc.option:
            raise typer.BadParameter(message, param_hint=exc.option) from exc
        option, _, reason = message.partition(": ")
        if option.startswith("--"):
            raise typer.BadParameter(reason, param_hint=option) from exc
        raise
    security = app.app.state.runtime.security
    console_err.print(
        f"zimage-serve on http://{config.listen}:{config.port}  (data: {settings.data_dir}; "
        f"authentication {'on' if security.auth else 'off'}: {security.auth_reason})",
        highlight=False,
    )
    if settings.outputs is not None:
        kept = "kept on disk" if settings.outputs.keep_local else "emptied on disk once stored"
        console_err.print(f"outputs to {settings.outputs.location} ({kept})", highlight=False)
    server = bounded_server(
        app,
        limits=ConnectionLimits(exempt=security.network.trusted),
        shutdown_grace_s=run.shutdown_grace_s,
        host=config.listen,
        port=config.port,
        log_level="warning",
    )
    try:
        server.run(sockets=sockets)
    finally:  # the lifespan stops it; this covers a server that never got that far
        app.app.state.runtime.stop()
