"""LoRA files for Z-Image's transformer, in the formats they are published in, applied as weight deltas.

Formats (all normalised by diffusers' own Z-Image LoRA converter, then by `_comfy_module_names`):
- diffusers / PEFT and ai-toolkit: ``[diffusion_model.]layers.0.attention.to_q.lora_A.weight`` + ``lora_B``;
- kohya / sd-scripts: ``lora_unet_layers_0_attention_to_q.lora_down.weight`` + ``lora_up`` + ``alpha``;
- ComfyUI's module names: fused ``attention.qkv`` (split here into to_q/to_k/to_v) and ``attention.out``.

A LoRA is applied the way ComfyUI patches a model: ``W += strength · (B @ A)`` on the weights in place for
the duration of a sampling run, then the saved originals are put back, so the cached base model is shared
by every workflow whatever LoRAs they stack on it. Quantised weights (FP8, INT8) are dequantised, patched
and quantised again with fresh scales; their saved codes and scales come back bit for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from zimage_serve.engine.checkpoint import read_header
from zimage_serve.engine.comfy_quant import Int8Linear, quantise_int8
from zimage_serve.engine.fp8 import Fp8Linear, quantise_rows
from zimage_serve.engine.libraries import load_model_libraries
from zimage_serve.engine.residency import copies_done, holding, original_of
from zimage_serve.engine.weight_lock import lock_for
from zimage_serve.errors import ModelLoadError


@dataclass(frozen=True)
class LoraWeights:
    """Low-rank pairs per module name of diffusers' ZImageTransformer2DModel: name → (down A, up B)."""

    name: str
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class LoraPatch:
    lora: LoraWeights
    strength: float


def load_lora(path: Path) -> LoraWeights:
    # diffusers, first imported through its one lock (engine/libraries.py)
    load_model_libraries()
    from diffusers.loaders.lora_pipeline import ZImageLoraLoaderMixin

    header = read_header(path)  # a clear error for a missing or non-safetensors file
    if not header:
        raise ModelLoadError(path, "holds no tensors")
    try:
        state = ZImageLoraLoaderMixin.lora_state_dict(str(path))
    except Exception as exc:  # diffusers raises ValueError/KeyError for keys it cannot place
        raise ModelLoadError(path, f"not a Z-Image LoRA this loader understands: {exc}") from exc
    if isinstance(state, tuple):
        state = state[0]
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, down in state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
        up = state.get(key.replace(".lora_A.weight", ".lora_B.weight"))
        if up is None:
            raise ModelLoadError(path, f"{module} has a down (A) matrix but no up (B) matrix")
        pairs.update(_comfy_module_names(module, down.float(), up.float()))
    if not pairs:
        raise ModelLoadError(path, "holds no LoRA pairs (expected lora_A/lora_B or lora_down/lora_up tensors)")
    return LoraWeights(path.name, pairs)


def _comfy_module_names(
    module: str, down: torch.Tensor, up: torch.Tensor
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    if module.endswith(".attention.qkv"):
        block = module.removesuffix(".qkv")
        return {f"{block}.to_{p}": (down, chunk) for p, chunk in zip("qkv", up.chunk(3, dim=0), strict=True)}
    if module.endswith(".attention.out"):
        return {module.removesuffix(".out") + ".to_out.0": (down, up)}
    return {module: (down, up)}


def check_fits(lora: LoraWeights, model: torch.nn.Module) -> None:
    """Every pair names a linear layer of this model with matching shapes."""
    modules = dict(model.named_modules())
    for name, (down, up) in lora.pairs.items():
        layer = modules.get(name)
        weight = getattr(layer, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            raise ModelLoadError(lora.name, f"targets {name}, which this diffusion model does not have")
        if (up.shape[0], down.shape[1]) != tuple(weight.shape):
            raise ModelLoadError(
                lora.name,
                f"{name}: LoRA gives a {up.shape[0]}×{down.shape[1]} update but the weight is "
                f"{weight.shape[0]}×{weight.shape[1]} (a LoRA for another model size?)",
            )


@contextlib.contextmanager
def patched(model: torch.nn.Module, patches: Sequence[LoraPatch], elements: int | None = None) -> Iterator[None]:
    """Add the LoRA deltas to the weights for the duration of the block, then restore them exactly.

    The block holds the weights shared (no patches) or alone (patches): concurrent runs on one model
    never see each other's deltas. `elements`: the size of the model's calls in the block (smart memory
    plans the held model's room for it).
    """
    active = [p for p in patches if p.strength != 0]
    if not active:
        with lock_for(model).shared():
            yield
        return
    # Under smart memory the model stays where it is while patched: the deltas go to the tensors in use (on the
    # card, or the host copies of blocks streamed in per call) and must come off the same ones.
    with lock_for(model).exclusive(), holding(model, elements, exact=True):
        yield from _apply(model, active)


def _apply(model: torch.nn.Module, active: Sequence[LoraPatch]) -> Iterator[None]:
    modules = dict(model.named_modules())
    originals: dict[str, list[torch.Tensor]] = {}
    copies_done(model)  # under smart memory, host copies may still be read by copies to the card
    try:
        with torch.no_grad():
            for patch in active:
                for name, (down, up) in patch.lora.pairs.items():
                    module = modules[name]
                    if name not in originals:
                        originals[name] = [_original(model, module, n, t) for n, t in _stored(module)]
                    delta = (up.to(module.weight.device) @ down.to(module.weight.device)) * patch.strength
                    _add(module, delta)
        yield
    finally:
        copies_done(model)
        with torch.no_grad():
            for name, saved in originals.items():
                for (_, tensor), original in zip(_stored(modules[name]), saved, strict=True):
                    tensor.copy_(original)


def _original(model: torch.nn.Module, module: torch.nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """What to restore a patched tensor from: under smart memory, for a weight on the card, its untouched host
    copy (no second copy on the card); otherwise a copy made now."""
    host = original_of(model, module, name)
    return host if host is not None else tensor.detach().clone()


def _stored(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The tensors a patch changes, by name: the weight, and for FP8 and INT8 weights their row scales."""
    if isinstance(module, Fp8Linear | Int8Linear):
        return [("weight", module.weight), ("scale", module.scale)]
    weight: torch.Tensor = module.weight  # type: ignore[assignment]  # check_fits saw a 2-D weight
    return [("weight", weight)]


def _add(module: torch.nn.Module, delta: torch.Tensor) -> None:
    if isinstance(module, Fp8Linear):  # merged in fp32, then quantised again with fresh row scales
        weight, scale = quantise_rows(module.dequantised(torch.float32) + delta.float(), module.weight.dtype)
        module.weight.copy_(weight)
        module.scale.copy_(scale)
    elif isinstance(module, Int8Linear):  # the same, rotated again as the file's layer was
        conf = module.conf
        codes, scale = quantise_int8(
            module.dequantised(torch.float32) + delta.float(), conf.group_size if conf.convrot else None
        )
        module.weight.copy_(codes)
        module.scale.copy_(scale)
    else:
        [(_, plain)] = _stored(module)
        plain.add_(delta.to(plain.dtype))
