"""ComfyUI's `common_upscale`: resizing images, masks and latents, with an optional centre crop.

One implementation for the nodes that scale pictures (ImageScale and friends, LatentUpscale) and for
the ControlNet, which fits its control image to the latent it steers, as ComfyUI's patch does.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from zimage_serve.engine.pixels import eight_bit


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
    if method == "bislerp":
        return _bislerp(samples, width, height)
    return torch.nn.functional.interpolate(samples, size=(height, width), mode=method)


def scale_image(image: torch.Tensor, width: int, height: int, method: str, crop: str) -> torch.Tensor:
    """`common_upscale` for IMAGE values (batch, height, width, channels)."""
    return common_upscale(image.movedim(-1, 1), width, height, method, crop).movedim(1, -1)


def repeat_to_batch(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """ComfyUI's repeat_to_batch_size: the entries repeated, then cut, to `batch` of them."""
    if tensor.shape[0] == batch:
        return tensor
    return tensor.repeat(-(-batch // tensor.shape[0]), *([1] * (tensor.dim() - 1)))[:batch]


def _lanczos(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    pictures = []
    for frame in samples.movedim(1, -1):
        pixels = eight_bit(frame.float().cpu().numpy())
        picture = Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels)
        resized = np.asarray(picture.resize((width, height), Image.Resampling.LANCZOS), dtype=np.float32) / 255.0
        pictures.append(torch.from_numpy(resized.reshape(height, width, -1)).movedim(-1, 0))
    return torch.stack(pictures)


def _bislerp(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Bilinear resizing that interpolates each latent cell's channel vector on the sphere (slerp, its
    length linearly), along the width and then along the height, as ComfyUI's `bislerp` does."""

    def taps(old: int, new: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # The two source cells and the weight of the second, where half-pixel bilinear resizing samples.
        source = ((torch.arange(new, dtype=torch.float64) + 0.5) * old / new - 0.5).clamp(0, old - 1)
        low = source.floor().long()
        return low, (low + 1).clamp(max=old - 1), (source - low).float()

    def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        norm_a, norm_b = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
        unit_a = torch.where(norm_a > 0, a / norm_a, torch.zeros_like(a))
        unit_b = torch.where(norm_b > 0, b / norm_b, torch.zeros_like(b))
        dot = (unit_a * unit_b).sum(-1, keepdim=True).clamp(-1.0, 1.0)
        omega = torch.acos(dot)
        sine = torch.sin(omega)
        result = (torch.sin((1 - t) * omega) / sine) * unit_a + (torch.sin(t * omega) / sine) * unit_b
        result = result * (norm_a * (1 - t) + norm_b * t)
        result = torch.where(dot > 1 - 1e-5, a, result)  # (nearly) parallel: the first
        return torch.where(dot < 1e-5 - 1, a * (1 - t) + b * t, result)  # opposite: a straight line

    cells = samples.float().movedim(1, -1)  # (batch, height, width, channels)
    low, high, t = taps(cells.shape[2], width)
    cells = slerp(cells[:, :, low], cells[:, :, high], t[:, None])
    low, high, t = taps(cells.shape[1], height)
    cells = slerp(cells[:, low], cells[:, high], t[:, None, None])
    return cells.movedim(-1, 1).to(samples.dtype)
