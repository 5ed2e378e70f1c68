"""The engine's fast path: speed-ups applied to a loaded model, each one switchable.

Defaults are on where they are safe and measured faster. On a CUDA GPU: the fastest attention kernel that
is installed, regional `torch.compile` of the transformer blocks, the VAE in bf16 (channels-last is a
switch, off: slower on an H100). Everywhere: a
cache of prompt embeddings (`ZImageEngine`). Two things need no switch because the engine always does
them: no attention mask when a batch has one sequence length (diffusers builds none then), and no host
synchronisation inside the step loop (sigmas are Python floats; `tests/test_fastpath.py` checks that
no operation that reads a tensor back to the host runs between the first and the last step).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from zimage_serve.errors import DeviceError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

Switch = Literal["auto", "on", "off"]

# Fastest first; "auto" takes the first one installed. flash-attn 3 is a separate install (published as the
# fastest on Hopper; not measured here). On an H100 (torch 2.11, benchmarks/gpu_bench.py, docs/performance.md)
# PyTorch's own SDPA choice ("native") beat forcing cuDNN's or PyTorch's flash kernel: 152 vs 158 and 164 ms
# per transformer call at 1024². The rest stay selectable by name.
ATTENTION_PREFERENCE = ("_flash_3", "native", "flash", "_native_cudnn", "_native_flash")


@dataclass(frozen=True)
class FastPath:
    attention: str = "auto"  # "auto" (best installed), or a diffusers attention backend name
    compile: Switch = "auto"  # regional torch.compile of the transformer blocks; auto: on CUDA only
    cuda_graphs: bool = False  # compile the blocks with CUDA graphs ("reduce-overhead"); needs compile
    # CUDA only. Off by default: on an H100 the channels-last decode took 145 ms against 91 ms contiguous.
    vae_channels_last: bool = False
    prompt_cache: int = 64  # prompt embeddings kept per engine (0: none)
    # INT8 weight files (ComfyUI's ConvRot): multiply in INT8 (W8A8) rather than dequantise at load; auto: on CUDA
    int8_matmul: Switch = "auto"

    def __post_init__(self) -> None:
        if self.attention != "auto":  # diffusers (and torch) only for a name to check: the server loads neither
            from diffusers.models.attention_dispatch import AttentionBackendName

            names = {b.value for b in AttentionBackendName}
            if self.attention not in names:
                raise DeviceError(
                    f"attention: {self.attention!r} is not auto or a diffusers backend ({', '.join(sorted(names))})"
                )
        if self.compile not in ("auto", "on", "off"):
            raise DeviceError(f"compile: {self.compile!r} is not one of auto, on, off")
        if self.int8_matmul not in ("auto", "on", "off"):
            raise DeviceError(f"int8_matmul: {self.int8_matmul!r} is not one of auto, on, off")
        if self.prompt_cache < 0:
            raise DeviceError(f"prompt_cache: {self.prompt_cache} entries; must be 0 or more")


def for_smart_memory(fast: FastPath) -> FastPath:
    """With smart memory moving weights in and out under the blocks, compile only when asked for; and no
    channels-last VAE, whose conversion would make new weights beside the host copies smart memory keeps."""
    return replace(fast, compile="off" if fast.compile == "auto" else fast.compile, vae_channels_last=False)


def attention_available(backend: str, device: torch.device) -> bool:
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    try:
        name = AttentionBackendName(backend)
    except ValueError:
        return False
    if backend != "native" and device.type != "cuda":
        return False
    import torch

    if backend == "_native_cudnn" and not torch.backends.cudnn.is_available():  # type: ignore[no-untyped-call]
        return False
    try:
        _check_attention_backend_requirements(name)
    except (RuntimeError, ImportError):
        return False
    return True


def best_attention(device: torch.device) -> str:
    return next(b for b in ATTENTION_PREFERENCE if attention_available(b, device))


def chosen_attention(fast: FastPath, device: torch.device) -> str:
    """The backend `fast` means on `device`; an explicit one that is not installed there is an error."""
    if fast.attention == "auto":
        return best_attention(device)
    if not attention_available(fast.attention, device):
        raise DeviceError(f"attention: backend {fast.attention!r} is not available on {device.type}")
    return fast.attention


def compile_enabled(fast: FastPath, device: torch.device) -> bool:
    return fast.compile == "on" or (fast.compile == "auto" and device.type == "cuda")


def int8_matmul_enabled(fast: FastPath, device: torch.device) -> bool:
    return fast.int8_matmul == "on" or (fast.int8_matmul == "auto" and device.type == "cuda")


def compiled_blocks(transformer: Any) -> list[torch.nn.Module]:
    """The blocks worth compiling: the main layers and the image-token refiner.

    Not the caption refiner: it runs on ~32 tokens, and sharing compiled code (and, under max-autotune,
    GEMM tilings) between a 32-row and a 4,128-row problem is the small-M trap that made compiled
    Z-Image slower than eager elsewhere (sglang PR #35755).
    """
    return [*transformer.noise_refiner, *transformer.layers]


def accelerate_transformer(transformer: Any, device: torch.device, fast: FastPath) -> dict[str, str]:
    """Attention backend and regional compile; returns what was applied."""
    applied: dict[str, str] = {}
    backend = chosen_attention(fast, device)
    if backend != "native":
        transformer.set_attention_backend(backend)
    applied["attention"] = backend
    if compile_enabled(fast, device):
        mode = "reduce-overhead" if fast.cuda_graphs else None
        blocks = compiled_blocks(transformer)
        for block in blocks:
            # dynamic=None: static shapes first, then dynamic ones if a new prompt length appears; matmuls stay
            # with cuBLAS (no GEMM autotuning), so no tiling is tuned for one token count and reused for another.
            block.compile(mode=mode, dynamic=None)
        applied["compile"] = f"regional ({len(blocks)} blocks{', CUDA graphs' if mode else ''})"
    else:
        applied["compile"] = "off"
    return applied


def accelerate_vae(vae: Any, device: torch.device, fast: FastPath) -> dict[str, str]:
    if fast.vae_channels_last and device.type == "cuda":
        import torch

        vae.to(memory_format=torch.channels_last)
        return {"vae": "channels-last"}
    return {}


def apply_fast_path(transformer: Any, vae: Any, device: torch.device, fast: FastPath) -> dict[str, str]:
    """Switch a whole model onto the fast path; returns what was applied, for `describe()`."""
    applied = {**accelerate_transformer(transformer, device, fast), **accelerate_vae(vae, device, fast)}
    applied["prompt_cache"] = str(fast.prompt_cache)
    log.info("fast path: %s", applied)
    return applied
