"""ComfyUI's `common_upscale`: resizing images, masks and latents, with an optional centre crop.

One implementation for the nodes that scale pictures (ImageScale and friends, LatentUpscale) and for
the ControlNet, which fits its control image to the latent it steers, as ComfyUI's patch does.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def common_upscale(samples: torch.Tensor, width: int, height: int, method: str, crop: str) -> torch.Tensor:
    """(batch, channels, height, width) → the new size: an optional centre crop to the new aspect ratio,
    then torch's interpolation, or Pillow's Lanczos on 8-bit pictures, as ComfyUI does."""
    if crop == "center":
        old_width, old_height = samples.shape[-1], samples.shape[-2]
        old_aspect, new_aspect = old_width / old_height, width / height
        x = y = 0
        if old_aspect > new_aspect:
            x = round((old_width - old_width * (new_aspect / old_aspect)) / 2)
        elif old_aspect < new_aspect:
            y = round((old_height - old_height * (old_aspect / new_aspect)) / 2)
        samples = samples.narrow(-2, y, old_height - y * 2).narrow(-1, x, old_width - x * 2)
    if method == "lanczos":
        return _lanczos(samples, width, height)
    return torch.nn.functional.interpolate(samples, size=(height, width), mode=method)


def scale_image(image: torch.Tensor, width: int, height: int, method: str, crop: str) -> torch.Tensor:
    """`common_upscale` for IMAGE values (batch, height, width, channels)."""
    return common_upscale(image.movedim(-1, 1), width, height, method, crop).movedim(1, -1)


def _lanczos(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    pictures = []
    for frame in samples.movedim(1, -1):
        pixels = np.clip(frame.float().cpu().numpy() * 255.0, 0, 255).astype(np.uint8)
        picture = Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels)
        resized = np.asarray(picture.resize((width, height), Image.Resampling.LANCZOS), dtype=np.float32) / 255.0
        pictures.append(torch.from_numpy(resized.reshape(height, width, -1)).movedim(-1, 0))
    return torch.stack(pictures)
