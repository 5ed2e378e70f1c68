"""Where the model runs: device, dtypes and memory mode, chosen automatically or by the user."""

from __future__ import annotations

import enum
import logging

import torch

from zimage_serve.engine.activations import largest_activations
from zimage_serve.errors import DeviceError

log = logging.getLogger(__name__)

GIB = 1024**3
# Z-Image-Turbo in bf16: transformer 12.3 GB, text encoder 8.0 GB, VAE 0.2 GB. Workflows load components one
# by one, so the server chooses their memory mode for the product's main model before any is loaded.
TURBO_BF16_BYTES = int(20.5 * GIB)
# The largest image the server accepts by default (--max-pixels): `auto` keeps everything on the card only
# where that size's activations fit beside all the weights.
AUTO_PIXELS = 2048 * 2048
CONTEXT_BYTES = GIB // 2  # the CUDA context and the allocator's slack, outside what PyTorch counts
# Names of the offload modes before smart memory replaced them: still accepted, as `smart`.
FORMER_MODES = ("model", "sequential")

DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}


class MemoryMode(enum.StrEnum):
    GPU = "gpu"  # every component loaded onto the accelerator, to stay
    SMART = "smart"  # as much as fits stays on it, the rest in pinned host memory (engine/residency.py)


def load_device(device: torch.device, mode: MemoryMode) -> torch.device:
    """Smart memory loads weights into host memory and brings them onto the card as they are needed."""
    return device if mode is MemoryMode.GPU else torch.device("cpu")


def describe_memory_mode(mode: MemoryMode, device: torch.device) -> str:
    return {
        MemoryMode.GPU: f"all on {device.type}",
        MemoryMode.SMART: "smart (as much as fits stays on the GPU, the rest in pinned host memory)",
    }[mode]


def dtype_name(dtype: torch.dtype) -> str:
    return next((name for name, value in DTYPES.items() if value == dtype), str(dtype))


def device_kind(requested: str = "auto") -> torch.device:
    """The device `pick_device` chooses, checked the same way, but without a CUDA index lookup (which
    would initialise CUDA in this process): for a process that hands the device to another one."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise DeviceError(f"device: {requested!r} is not a device name (auto, cpu, cuda, cuda:N, mps)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("device: CUDA was requested but no CUDA GPU is visible to PyTorch")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"device: cuda:{device.index} does not exist ({torch.cuda.device_count()} GPUs)")
    if device.type == "mps" and not _mps_available():
        raise DeviceError("device: MPS was requested but is not available on this machine")
    if device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"device: {requested!r} is not supported (auto, cpu, cuda, cuda:N, mps)")
    return device


def pick_device(requested: str = "auto") -> torch.device:
    """CUDA > MPS > CPU for "auto"; otherwise the named device, checked to exist; CUDA with its index."""
    device = device_kind(requested)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def pick_dtypes(device: torch.device, requested: str = "auto") -> tuple[torch.dtype, torch.dtype]:
    """(model dtype, VAE dtype). bf16 on accelerators, fp32 on the CPU where bf16 matmuls are slow."""
    if requested == "auto":
        if device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        elif device.type == "mps":
            dtype = torch.bfloat16
        else:
            dtype = torch.float32
    else:
        if requested not in DTYPES:
            raise DeviceError(f"dtype: {requested!r} is not one of auto, {', '.join(DTYPES)}")
        dtype = DTYPES[requested]
    if dtype == torch.float16:
        vae_dtype = torch.float32
    elif device.type == "cuda":
        vae_dtype = dtype
    else:
        vae_dtype = torch.float32
    return dtype, vae_dtype


def pick_memory_mode(
    device: torch.device, requested: str, weight_bytes: int, free_memory: int | None = None
) -> MemoryMode:
    """`auto`: everything on the card where the weights and the activations of the largest default image fit
    in its free memory now; smart memory otherwise. Off CUDA, always everything on the device."""
    if requested in FORMER_MODES:
        log.warning("memory mode %r is now called 'smart' (as much as fits stays on the GPU)", requested)
        requested = MemoryMode.SMART.value
    if requested != "auto":
        try:
            mode = MemoryMode(requested)
        except ValueError as exc:
            choices = ", ".join(m.value for m in MemoryMode)
            raise DeviceError(f"memory_mode: {requested!r} is not one of auto, {choices}") from exc
        if mode is not MemoryMode.GPU and device.type != "cuda":
            raise DeviceError(
                f"memory_mode: {mode} keeps weights in host memory for a CUDA GPU; the device here is {device}"
            )
        return mode
    if device.type != "cuda":
        return MemoryMode.GPU
    if free_memory is None:
        free_memory = usable_memory(device)
    return memory_mode_for(free_memory, weight_bytes)


def memory_mode_for(free_memory: int, weight_bytes: int, pixels: int = AUTO_PIXELS) -> MemoryMode:
    if weight_bytes + largest_activations(pixels, weight_bytes, TURBO_BF16_BYTES) + CONTEXT_BYTES <= free_memory:
        return MemoryMode.GPU
    return MemoryMode.SMART


def usable_memory(device: torch.device) -> int:
    """What this process may still take on the card: its free memory, within the process's memory fraction."""
    free, total = torch.cuda.mem_get_info(device)
    capped = int(total * memory_fraction(device)) - torch.cuda.memory_reserved(device)
    return min(free, capped)


def memory_fraction(device: torch.device) -> float:
    """The share of the card this process may take (`torch.cuda.set_per_process_memory_fraction`), where the
    installed PyTorch can tell."""
    read = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    return float(read(device)) if read is not None else 1.0


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def device_stats(device: torch.device, memory: bool = True) -> dict[str, object]:
    """One entry of ComfyUI's /system_stats `devices`: the device's name and its memory now (without
    `memory`, zeros: asking CUDA would open a context in the calling process)."""
    if device.type == "cuda" and memory:
        free, total = torch.cuda.mem_get_info(device)
        name = torch.cuda.get_device_name(device)
    else:
        free = total = 0
        name = str(device) if device.type == "cuda" else device.type
    return {
        "name": name,
        "type": device.type,
        "index": device.index or 0,
        "vram_total": total,
        "vram_free": free,
        "torch_vram_total": total,
        "torch_vram_free": free,
    }
