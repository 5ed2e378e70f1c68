"""`zimage info`: the device that would be used, its memory, and library versions."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import TYPE_CHECKING

from rich.table import Table

from zimage_serve.cli.common import console

if TYPE_CHECKING:
    import torch

GIB = 1024**3


def info() -> None:
    """Print the chosen device, dtype and memory, the accelerators seen, and versions."""
    import torch

    from zimage_serve.engine.devices import dtype_name, pick_device, pick_dtypes
    from zimage_serve.engine.fastpath import best_attention

    device = pick_device("auto")
    dtype, vae_dtype = pick_dtypes(device)
    table = Table(show_header=False)
    table.add_row("device (auto)", str(device))
    table.add_row("dtype", f"{dtype_name(dtype)} (VAE {dtype_name(vae_dtype)})")
    table.add_row("memory mode (auto)", _memory_mode(device))
    table.add_row("attention (auto)", best_attention(device))
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        table.add_row(f"cuda:{index}", f"{props.name}, {total / GIB:.1f} GiB ({free / GIB:.1f} GiB free)")
    if device.type == "cpu":
        table.add_row("CUDA", "not available")
    mps = getattr(torch.backends, "mps", None)
    table.add_row("MPS", "available" if mps is not None and mps.is_available() else "not available")
    table.add_row("CPU", f"{platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    table.add_row("RAM", _ram())
    table.add_row("python", platform.python_version())
    for package in ("zimage-serve", "torch", "diffusers", "transformers", "accelerate", "safetensors"):
        try:
            table.add_row(package, metadata.version(package))
        except metadata.PackageNotFoundError:
            table.add_row(package, "not installed")
    console.print(table)


def _memory_mode(device: torch.device) -> str:
    from zimage_serve.engine.devices import TURBO_BF16_BYTES, describe_memory_mode, pick_memory_mode

    """What `serve` and `run` pick for Z-Image-Turbo here; `generate` decides per model from its size."""
    mode = pick_memory_mode(device, "auto", TURBO_BF16_BYTES)
    described = f"{mode}: {describe_memory_mode(mode, device)}"
    return f"{described}, for Z-Image-Turbo in bf16 on this card" if device.type == "cuda" else described


def _ram() -> str:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return "unknown"
    return f"{total / GIB:.1f} GiB ({available / GIB:.1f} GiB free)"
