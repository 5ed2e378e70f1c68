"""The options `zimage serve` and `zimage worker` share (each also reads them from `--config` and ZIMAGE_*)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from zimage_serve.settings import DATA_DIR_ENV, MODELS_ENV

ConfigFlag = Annotated[Path | None, typer.Option(help="TOML file of settings (flags and ZIMAGE_* win over it)")]

DataDirFlag = Annotated[
    Path | None,
    typer.Option(help=f"Queue, history, inputs and outputs (one a cluster shares) [env {DATA_DIR_ENV}]"),
]

ModelsFlag = Annotated[
    list[Path] | None,
    typer.Option(
        "--models",
        help=f"ComfyUI models folder (repeatable) [env {MODELS_ENV}; default: models/ in the data dir, where "
        "zimage models pull puts weights, if it exists]",
    ),
]

DeviceFlag = Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N or mps [default: auto]")]

DtypeFlag = Annotated[str | None, typer.Option(help="auto, bf16, fp16 or fp32 [default: auto]")]

MemoryModeFlag = Annotated[
    str | None,
    typer.Option(help="auto (all on the card where it fits, else smart), gpu, or smart (what fits stays on the card)"),
]

AttentionFlag = Annotated[
    str | None,
    typer.Option(
        help="Attention kernel: auto (the fastest installed: flash-attn 3, flash-attn, cuDNN, PyTorch's flash) "
        "or a diffusers backend name such as native or _native_cudnn"
    ),
]

CompileFlag = Annotated[
    str | None, typer.Option(help="torch.compile the transformer blocks: auto (on CUDA GPUs), on or off")
]

Int8MatmulFlag = Annotated[
    str | None,
    typer.Option(
        help="INT8 weight files (ComfyUI's ConvRot): multiply in INT8: auto (on CUDA GPUs; elsewhere they are "
        "dequantised at load), on or off [default: auto]"
    ),
]

JobTimeoutFlag = Annotated[
    float | None,
    typer.Option(
        help="Seconds a prompt may run before it is stopped; 0: no limit [default: 30 on a GPU, 1800 elsewhere]",
        min=0,
    ),
]

ConcurrencyFlag = Annotated[
    int | None,
    typer.Option(help="Prompts run at once on the device (at most 2 per GPU is advised)", min=1),
]

PreloadFlag = Annotated[
    bool | None,
    typer.Option(help="Load the default model (zimage-nano) before the first prompt; GET /health says when"),
]

ShutdownGraceFlag = Annotated[
    float | None,
    typer.Option(
        help="Seconds a running prompt may take to finish at a stop; one cut off then is queued again [default: 30]",
        min=0,
    ),
]

PreviewMethodFlag = Annotated[
    str | None,
    typer.Option(
        help="Live previews while sampling, on the WebSocket and on Comfy API v2's event streams: auto or "
        "latent2rgb (the latent mapped to RGB), or none; a prompt's extra_data.preview_method overrides it "
        "[default: auto]"
    ),
]
PreviewSizeFlag = Annotated[
    int | None, typer.Option(help="A preview's longer side at most, in pixels [default: 512]", min=16, max=4096)
]

LeaseFlag = Annotated[
    float | None,
    typer.Option(
        help="Seconds a worker's claim on a job holds without a heartbeat: a worker killed mid-job has its "
        "job run by another after this [default: 30]",
        min=1,
        max=3600,
    ),
]

MetricsPortFlag = Annotated[
    int | None,
    typer.Option(
        help="Also serve /metrics (Prometheus) on this port of 127.0.0.1, with no token needed; a server's "
        "own workers (--workers N) use the ports after it",
        min=1,
        max=65535,
    ),
]
