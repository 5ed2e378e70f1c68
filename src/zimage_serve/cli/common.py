"""What the commands share: consoles, options, and the model the user means."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from zimage_serve.errors import DeviceError
from zimage_serve.settings import MODEL_ENV, MODELS_ENV, default_models_dir

if TYPE_CHECKING:
    from zimage_serve.config import ServeConfig
    from zimage_serve.engine.fastpath import FastPath
    from zimage_serve.worker.build import RunSettings

console = Console(soft_wrap=True)
console_err = Console(stderr=True, soft_wrap=True)

ModelOption = Annotated[
    Path | None,
    typer.Option(
        "--model",
        "-m",
        help="Diffusers folder, ComfyUI models folder or diffusion-model .safetensors "
        f"[env {MODEL_ENV}; default: the built-in model]",
    ),
]
ModelsRootOption = Annotated[
    list[Path] | None,
    typer.Option(
        "--models",
        help=f"ComfyUI models folder (repeatable) [env {MODELS_ENV}; default: models/ in the data dir, if it exists]",
    ),
]
TextEncoderOption = Annotated[
    Path | None, typer.Option("--text-encoder", help="Qwen3-4B .safetensors (ComfyUI split files)")
]
VaeOption = Annotated[Path | None, typer.Option("--vae", help="Flux VAE ae.safetensors (ComfyUI split files)")]
TokenizerOption = Annotated[
    Path | None, typer.Option("--tokenizer", help="Tokenizer folder, or a diffusers Z-Image folder holding one")
]


AttentionOption = Annotated[
    str,
    typer.Option(
        "--attention",
        help="Attention kernel: auto (the fastest installed: flash-attn 3, flash-attn, cuDNN, PyTorch's flash) "
        "or a diffusers backend name such as native or _native_cudnn",
    ),
]
CompileOption = Annotated[
    str,
    typer.Option("--compile", help="torch.compile the transformer blocks: auto (on CUDA GPUs), on or off"),
]

INT8_MATMUL_HELP = (
    "INT8 weight files (ComfyUI's ConvRot): multiply in INT8: auto (on CUDA GPUs; elsewhere they are "
    "dequantised at load), on or off"
)
Int8MatmulOption = Annotated[str, typer.Option("--int8-matmul", help=INT8_MATMUL_HELP)]


@contextlib.contextmanager
def option_errors() -> Iterator[None]:
    """A DeviceError ("field: reason") becomes a usage error naming the option --field."""
    try:
        yield
    except DeviceError as exc:
        field, _, reason = str(exc).partition(": ")
        raise typer.BadParameter(reason, param_hint=f"--{field.replace('_', '-')}") from exc


def fast_path(attention: str, compile: str, device: str, int8_matmul: str = "auto") -> FastPath:
    """The engine's fast path from the command's options, checked against the device they name; a bad
    value is an error naming the option (before any model loads, and before a server starts)."""
    from zimage_serve.engine.devices import device_kind
    from zimage_serve.engine.fastpath import FastPath, chosen_attention

    with option_errors():
        # FastPath checks the values
        fast = FastPath(attention=attention, compile=compile, int8_matmul=int8_matmul)  # type: ignore[arg-type]
        chosen_attention(fast, device_kind(device))
    return fast


def checked_fast_path(
    attention: str, compile: str, memory_mode: str, device: str, int8_matmul: str = "auto"
) -> FastPath:
    """The fast path of a server's or worker's settings. Left to the worker to resolve when all is "auto" on
    a CPU (nothing to check, and no torch loaded here); otherwise checked now, so a bad option stops the
    command at once (that loads torch: a slower start)."""
    from zimage_serve.engine.fastpath import FastPath

    if (attention, compile, memory_mode, int8_matmul) == ("auto",) * 4 and device in ("auto", "cpu"):
        return FastPath()
    fast = fast_path(attention, compile, device, int8_matmul)
    check_memory_mode(memory_mode, device)
    return fast


def run_settings(config: ServeConfig) -> RunSettings:
    """How the workers run prompts, from `zimage serve`'s or `zimage worker`'s configuration (the same
    options, the same derivation); a bad device option stops the command here."""
    from zimage_serve.worker.build import RunSettings

    return RunSettings(
        device=config.device,
        dtype=config.dtype,
        fast=checked_fast_path(config.attention, config.compile, config.memory_mode, config.device, config.int8_matmul),
        memory_mode=config.memory_mode,
        preload=config.preload,
        job_timeout=config.job_timeout,
        concurrency=config.concurrency,
        limits=config.limits(),
        lease_s=config.lease,
        shutdown_grace_s=config.shutdown_grace,
        preview_method=config.preview_method,
        preview_size=config.preview_size,
    )


def check_memory_mode(memory_mode: str, device: str) -> None:
    """An explicit memory mode must exist and suit the device (auto is resolved where the device is opened)."""
    from zimage_serve.engine.devices import TURBO_BF16_BYTES, device_kind, pick_memory_mode

    if memory_mode != "auto":
        with option_errors():
            pick_memory_mode(device_kind(device), memory_mode, TURBO_BF16_BYTES)


def quiet_libraries() -> None:
    """diffusers and transformers log advice meant for their developers; our own output says what matters.

    Said through their environment variables, which they read when they are imported (here, later, or
    in the worker process, which inherits them): importing them now would cost `zimage serve` seconds."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", module="diffusers")
    warnings.filterwarnings("ignore", module="transformers")
    for name in ("diffusers", "transformers", "accelerate", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if "diffusers" in sys.modules:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()


def chosen_model(model: Path | None) -> tuple[Path, str | None]:
    """The model path, and a label to print when it is the built-in default."""
    if model is not None:
        return model, None
    if os.environ.get(MODEL_ENV):
        return Path(os.environ[MODEL_ENV]), None
    from zimage_serve.nano.default import LABEL, default_model

    return default_model(), LABEL


def models_roots(models: list[Path] | None, data_dir: Path | None = None) -> list[Path]:
    """--models folders, else those in $ZIMAGE_MODELS (separated like PATH); each must be a folder. With
    neither, the default models folder (`models/` in the data dir, where `zimage models pull` puts weights)
    if it exists: without it, only the built-in model is listed, as before."""
    roots = list(models or [])
    if not roots and os.environ.get(MODELS_ENV):
        roots = [Path(p) for p in os.environ[MODELS_ENV].split(os.pathsep) if p]
    for root in roots:
        if not root.is_dir():
            raise typer.BadParameter(f"{root} is not a folder", param_hint="--models")
    if not roots and default_models_dir(data_dir).is_dir():
        roots = [default_models_dir(data_dir)]
    return roots
