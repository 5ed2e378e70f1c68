"""Upscale models (ESRGAN, Real-ESRGAN, SwinIR, ... as files of their published layouts), loaded by spandrel,
the library ComfyUI uses, and run over an image in overlapping tiles as ComfyUI's ImageUpscaleWithModel does."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from zimage_serve.engine.residency import Residency
from zimage_serve.errors import ModelLoadError

log = logging.getLogger(__name__)

TILE, OVERLAP, MIN_TILE = 512, 32, 128
# A tile's activations per output pixel: an ESRGAN's 64 float32 features, a few tensors of them alive at once.
TILE_BYTES_PER_PIXEL = 64 * 4 * 4


def load_upscale_model(path: Path) -> Any:
    """A spandrel ImageModelDescriptor for a single-image model; a clear error for anything else.

    Pickled files are read with `weights_only=True`: tensors and plain containers only, never code."""
    from zimage_serve.engine.libraries import importing

    with importing():  # spandrel (and torchvision) only for upscale models, one importing thread at a time
        from spandrel import ImageModelDescriptor, ModelLoader, UnsupportedModelError

    from zimage_serve.engine.construction import building

    state = _state_dict(path)
    if "module.layers.0.residual_group.blocks.0.norm1.weight" in state:  # SwinIR saved from DataParallel
        state = {key.removeprefix("module."): value for key, value in state.items()}
    try:
        with building():
            descriptor = ModelLoader().load_from_state_dict(state)
    except UnsupportedModelError as exc:
        raise ModelLoadError(path, "not an upscale model spandrel knows (ESRGAN, Real-ESRGAN, SwinIR, ...)") from exc
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise ModelLoadError(path, f"its tensors do not fit the architecture they look like: {exc}") from exc
    if not isinstance(descriptor, ImageModelDescriptor):
        raise ModelLoadError(path, "upscale models must be single-image models (this one needs a mask or more)")
    descriptor.eval()
    log.info("loaded upscale model %s: %s ×%d", path.name, descriptor.architecture.name, descriptor.scale)
    return descriptor


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix.lower() in (".safetensors", ".sft"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors: dict[str, torch.Tensor] = load_file(str(path))
            return tensors
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(path, f"not a valid safetensors file: {exc}") from exc
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle and zip errors of every kind: the file is refused, not run
        raise ModelLoadError(path, f"cannot be read as plain tensors: {exc}") from exc
    for wrapper in ("params_ema", "params", "state_dict"):  # BasicSR and Lightning checkpoints
        if isinstance(loaded, dict) and isinstance(loaded.get(wrapper), dict):
            loaded = loaded[wrapper]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ModelLoadError(path, "holds no state dict of tensors")
    return {str(key): value for key, value in loaded.items()}


def tiled_scale(
    image: torch.Tensor,
    run: Callable[[torch.Tensor], torch.Tensor],
    scale: int,
    tile: int = TILE,
    overlap: int = OVERLAP,
    out_channels: int = 3,
) -> torch.Tensor:
    """`run` over (batch, C, H, W) in tiles of `tile` pixels overlapping by `overlap`, each output tile
    feathered linearly over the (scaled) overlap at its edges and the sum normalised by the weights."""
    batch, _, height, width = image.shape
    out = torch.zeros((batch, out_channels, height * scale, width * scale))
    weight = torch.zeros_like(out)
    feather = round(overlap * scale)
    stride = tile - overlap
    rows = range(0, max(height - overlap, 1), stride)
    cols = range(0, max(width - overlap, 1), stride)
    for top, left in itertools.product(rows, cols):
        top, left = max(0, min(height - overlap, top)), max(0, min(width - overlap, left))
        h, w = min(tile, height - top), min(tile, width - left)
        part = run(image[:, :, top : top + h, left : left + w]).float().cpu()
        mask = torch.ones_like(part)
        for t in range(min(feather, part.shape[2] // 2, part.shape[3] // 2)):
            ramp = (t + 1) / feather
            mask[:, :, t, :] *= ramp
            mask[:, :, -1 - t, :] *= ramp
            mask[:, :, :, t] *= ramp
            mask[:, :, :, -1 - t] *= ramp
        region = (
            slice(None),
            slice(None),
            slice(top * scale, (top + h) * scale),
            slice(left * scale, (left + w) * scale),
        )
        out[region] += part * mask
        weight[region] += mask
    return out / weight


def upscale(
    descriptor: Any, image: torch.Tensor, device: torch.device, residency: Residency | None = None
) -> torch.Tensor:
    """IMAGE (batch, H, W, C) → IMAGE scaled by the model, in 0..1; tiles halve on out-of-memory, down to 128.
    Under smart memory (`residency`), room for the model and a tile is made on the card first."""
    if residency is not None:
        weights = sum(p.numel() * p.element_size() for p in descriptor.model.parameters())
        residency.make_room(weights + TILE_BYTES_PER_PIXEL * TILE * TILE * descriptor.scale**2)
    model = descriptor.to(device)
    pixels = image[..., :3].float().movedim(-1, 1)
    tile = TILE
    try:
        while True:
            try:
                with torch.inference_mode():
                    scaled = tiled_scale(pixels, lambda part: model(part.to(device)), descriptor.scale, tile)
                break
            except torch.OutOfMemoryError:
                tile //= 2
                if tile < MIN_TILE:
                    raise
    finally:
        descriptor.to("cpu")
    return scaled.movedim(1, -1).clamp(0.0, 1.0)
