"""A ControlNet applied to a model: its control image, inpaint image and mask, encoded once per size into
the control context the ControlNet's stream reads (`engine/control_hooks.py` steers the transformer with it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from zimage_serve.engine.controlnet import ControlNetError, FunControlNet
from zimage_serve.engine.names import LATENT_FACTOR
from zimage_serve.engine.resize import common_upscale, repeat_to_batch

if TYPE_CHECKING:
    from zimage_serve.engine.parts import LatentFormat, Vae


@dataclass(frozen=True, eq=False)
class ControlPatch:
    """One ControlNet applied to a MODEL: its images, the VAE that encodes them, and the strength.

    `mask` follows ComfyUI's nodes (1 = regenerate) and is inverted here, as ComfyUI's node does."""

    controlnet: FunControlNet
    vae: Vae
    strength: float
    image: torch.Tensor | None = None  # IMAGE (batch, H, W, C): the control map
    inpaint_image: torch.Tensor | None = None
    mask: torch.Tensor | None = None  # MASK (batch, H, W)
    _contexts: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if self.image is None and self.inpaint_image is None:
            raise ControlNetError("image: a ControlNet needs a control image, an inpaint_image, or both")

    def context(self, height: int, width: int, fmt: LatentFormat, cancel: Callable[[], bool] | None) -> torch.Tensor:
        """The control input (batch, channels, height, width) for a latent of this size, encoded once."""
        with self._lock:
            found = self._contexts.get((height, width))
            if found is None:
                found = self._encode(height, width, fmt, cancel)
                self._contexts.clear()  # one size at a time: a run samples at one size
                self._contexts[(height, width)] = found
            return found

    def _encode(self, height: int, width: int, fmt: LatentFormat, cancel: Callable[[], bool] | None) -> torch.Tensor:
        size = (width * LATENT_FACTOR, height * LATENT_FACTOR)

        def fitted(image: torch.Tensor) -> torch.Tensor:  # ComfyUI scales with "area" and a centre crop
            image = image[..., :3].float()
            if (image.shape[2], image.shape[1]) != size:
                image = common_upscale(image.movedim(-1, 1), *size, "area", "center").movedim(1, -1)
            return image

        def encoded(image: torch.Tensor) -> torch.Tensor:
            return fmt.process_in(self.vae.encode(image, cancel))

        control = fitted(self.image) if self.image is not None else None
        inpaint = fitted(self.inpaint_image) if self.inpaint_image is not None else None
        control_latent = encoded(control) if control is not None else None
        if not self.controlnet.variant.inpaint:
            assert control_latent is not None  # an inpaint image alone only reaches an inpainting patch
            return control_latent
        grey = torch.full((1, size[1], size[0], 3), 0.5)
        keep = None if self.mask is None else 1.0 - self.mask.float().reshape(-1, 1, *self.mask.shape[-2:])
        if inpaint is None:
            inpaint = grey if control is None else torch.full_like(control, 0.5)
        if keep is not None:
            keep_pixels = common_upscale(keep, size[0], size[1], "bilinear", "center").movedim(1, -1).round()
            inpaint = (inpaint - 0.5) * keep_pixels + 0.5
        inpaint_latent = encoded(inpaint)
        if keep is None:
            keep_latent = torch.zeros_like(inpaint_latent[:, :1])
        else:
            keep_latent = common_upscale(keep, width, height, "nearest", "center")
        if control_latent is None:
            control_latent = encoded(grey)
        batch = max(control_latent.shape[0], keep_latent.shape[0], inpaint_latent.shape[0])
        parts = [repeat_to_batch(t, batch) for t in (control_latent, keep_latent, inpaint_latent)]
        return torch.cat(parts, dim=1)
