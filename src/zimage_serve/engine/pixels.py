"""Decoded pixels (ComfyUI's IMAGE: batch, H, W, C in 0..1) to 8-bit pictures, for nodes and `generate` alike."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch


def eight_bit(array: np.ndarray[Any, Any]) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """0..1 floats as 8-bit levels, as ComfyUI converts them: `clip(255 · x, 0, 255)` cast to uint8, which
    truncates (0.5 is 127, not 128), so that the same tensor gives ComfyUI's pixels byte for byte. The one
    conversion of the project: saved images, resized ones, previews."""
    pixels = np.multiply(array, 255.0)  # float32 stays float32, as in ComfyUI's `255. * array`
    np.clip(pixels, 0.0, 255.0, out=pixels)  # in place: small images cost more in allocations than in arithmetic
    levels: np.ndarray[Any, np.dtype[np.uint8]] = pixels.astype(np.uint8, order="C")
    return levels


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """IMAGE (batch, H, W, 3) in 0..1 → 8-bit pictures, converted in one pass for the whole batch.

    In numpy, not torch: a small image is not worth torch's thread pool, whose threads then spin for
    a while after the call, taking a core from the server and from other prompts.
    """
    import torch

    if images.dtype == torch.float32 and images.device.type == "cpu" and not images.requires_grad:
        array = images.numpy()  # as it comes from LoadImage or a CPU decode: no new tensor to make
    else:
        array = images.detach().to("cpu", torch.float32).numpy()
    frames = eight_bit(array)
    mode = _PIL_MODES.get(frames.shape[-1]) if frames.ndim == 4 else None
    if mode is None:
        return [Image.fromarray(frame) for frame in frames]
    height, width = frames.shape[1:3]
    return [Image.frombuffer(mode, (width, height), frame, "raw", mode, 0, 1) for frame in frames]


_PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def from_pil(picture: Image.Image) -> torch.Tensor:
    """An 8-bit picture → IMAGE (1, H, W, 3) in 0..1, as LoadImage makes it."""
    import torch

    pixels = np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels)[None]
