"""Control maps made from pictures: Canny edges, by kornia's detector, as ComfyUI's Canny node makes them."""

from __future__ import annotations

import torch


def canny(image: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """IMAGE (batch, H, W, C) in 0..1 → white edges on black, as a 3-channel IMAGE."""
    from zimage_serve.engine.libraries import importing

    with importing():  # kornia only for the Canny node, one importing thread at a time
        from kornia.filters import canny as detect

    if not 0 < low <= high < 1:
        raise ValueError(f"low_threshold {low} and high_threshold {high}: need 0 < low ≤ high < 1")
    _, edges = detect(image[..., :3].float().movedim(-1, 1), low, high)
    return edges.repeat(1, 3, 1, 1).movedim(1, -1)
