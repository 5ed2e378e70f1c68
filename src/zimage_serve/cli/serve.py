"""`zimage serve`: ComfyUI's API on 127.0.0.1:8188, with a persistent queue."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from zimage_serve.cli.common import (
    AttentionOption,
    CompileOption,
    ModelsRootOption,
    check_memory_mode,
    console_err,
    fast_path,
    models_roots,
)
from zimage_serve.engine.fastpath import FastPath
from zimage_serve.settings import DATA_DIR_ENV, default_data_dir
from zimage_serve.workflow.limits import Limits

DEFAULTS = Limits()


def serve(
    listen: Annotated[str, typer.Option(help="Address to bind (0.0.0.0 for every interface)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port", min=1, max=65535)] = 8188,
    data_dir: Annotated[
        Path | None, typer.Option(help=f"Queue, history, inputs and outputs [env {DATA_DIR_ENV}]")
    ] = None,
    models: ModelsRootOption = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, bf16, fp16 or fp32")] = "auto",
    memory_mode: Annotated[
        str, typer.Option(help="auto (what fits Z-Image-Turbo on the card), gpu, model or sequential")
    ] = "auto",
    attention: AttentionOption = "auto",
    compile: CompileOption = "auto",
    max_queue: Annotated[
        int, typer.Option(help="Waiting prompts beyond which POST /prompt answers 429", min=1)
    ] = 10000,
    job_timeout: Annotated[
        float | None,
        typer.Option(
            help="Seconds a prompt may run before it is stopped; 0: no limit [default: 30 on a GPU, none on the CPU]",
            min=0,
        ),
    ] = None,
    concurrency: Annotated[
        int, typer.Option(help="Prompts run at once on the device (the field report advises at most 2 per GPU)", min=1)
    ] = 1,
    preload: Annotated[
        bool, typer.Option(help="Load the default model (zimage-nano) as the server starts; GET /health says when")
    ] = True,
    worker_process: Annotated[
        bool,
        typer.Option(
            help="Run prompts in a child process, so serving requests and running prompts never wait on one "
            "interpreter lock (--no-worker-process: threads in the server process)"
        ),
    ] = True,
    shutdown_grace: Annotated[
        float,
        typer.Option(
            help="Seconds a running prompt may take to finish when the server stops; one cut off then is queued "
            "again for the next start",
            min=0,
        ),
    ] = 30.0,
    max_pixels: Annotated[int, typer.Option(help="Pixels per image (width × height)", min=1)] = DEFAULTS.pixels,
    max_batch: Annotated[int, typer.Option(help="Images in one batch", min=1)] = DEFAULTS.batch,
    max_steps: Annotated[int, typer.Option(help="Sampler steps", min=1)] = DEFAULTS.steps,
    max_prompt_tokens: Annotated[int, typer.Option(help="Tokens of one prompt text", min=1)] = DEFAULTS.prompt_tokens,
    max_prompt_bytes: Annotated[
        int, typer.Option(help="UTF-8 bytes of one prompt text", min=1)
    ] = DEFAULTS.prompt_bytes,
    max_nodes: Annotated[int, typer.Option(help="Nodes in one graph", min=1)] = DEFAULTS.nodes,
    max_upload_pixels: Annotated[
        int, typer.Option(help="Pixels of an uploaded or loaded image, over all its frames", min=1)
    ] = DEFAULTS.upload_pixels,
    max_request_pixels: Annotated[
        int, typer.Option(help="Pixels one OpenAI images request may ask for (n × width × height)", min=1)
    ] = DEFAULTS.request_pixels,
) -> None:
    """Serve ComfyUI's HTTP and WebSocket API.

    Every limit is checked before a prompt is queued, and refused with a 400 that names it."""
    import uvicorn

    from zimage_serve.server.app import create_app
    from zimage_serve.server.runtime import ServerSettings

    roots = models_roots(models)
    if (attention, compile, memory_mode) == ("auto", "auto", "auto") and device in ("auto", "cpu"):
        fast = FastPath()  # nothing to check: the worker resolves "auto" where the device is opened
    else:  # checked here, so a bad option stops the command at once (this loads torch: a slower start)
        fast = fast_path(attention, compile, device)
        check_memory_mode(memory_mode, device)
    settings = ServerSettings(
        data_dir=data_dir or default_data_dir(),
        models=roots,
        listen=listen,
        port=port,
        device=device,
        dtype=dtype,
        fast=fast,
        memory_mode=memory_mode,
        max_queue=max_queue,
        job_timeout=job_timeout,
        concurrency=concurrency,
        worker_process=worker_process,
        preload=preload,
        shutdown_grace_s=shutdown_grace,
        limits=Limits(
            pixels=max_pixels,
            batch=max_batch,
            steps=max_steps,
            prompt_tokens=max_prompt_tokens,
            prompt_bytes=max_prompt_bytes,
            nodes=max_nodes,
            upload_pixels=max_upload_pixels,
            request_pixels=max_request_pixels,
        ),
    )
    app = create_app(settings)
    console_err.print(f"zimage-serve on http://{listen}:{port}  (data: {settings.data_dir})", highlight=False)
    try:
        uvicorn.run(
            app,
            host=listen,
            port=port,
            log_level="warning",
            timeout_graceful_shutdown=max(1, int(settings.shutdown_grace_s)),
        )
    finally:  # the lifespan stops it; this covers a server that never got that far (the port taken, say)
        app.app.state.runtime.stop()
