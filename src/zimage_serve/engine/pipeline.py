"""Z-Image generation in stages: encode the prompt, denoise, decode.

`zimage generate` runs the stages in a row. Denoising and decoding are the workflow nodes' own code
(`parts.sample` over `engine/sampling.py`, and `parts.Vae`), so a prompt gives the same trajectory
either way; what is `generate`'s alone is its documented schedule (`schedule.sigma_schedule`) and its
noise (one CPU generator per image, seeded seed + i, so image i can be made again alone).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from zimage_serve.engine.control_hooks import install as install_control_hooks
from zimage_serve.engine.control_patch import ControlPatch
from zimage_serve.engine.controlnet import FunControlNet, load_controlnet
from zimage_serve.engine.devices import MemoryMode
from zimage_serve.engine.fastpath import FastPath, apply_fast_path, for_smart_memory
from zimage_serve.engine.loader import LoadedModel
from zimage_serve.engine.lora import LoraWeights
from zimage_serve.engine.model_sampling import FlowSampling
from zimage_serve.engine.names import LATENT_FACTOR
from zimage_serve.engine.params import MAX_SEQUENCE_LENGTH, GenerationParams
from zimage_serve.engine.parts import DiffusionModel, LatentFormat, Vae, sample
from zimage_serve.engine.pixels import to_pil
from zimage_serve.engine.schedule import sigma_schedule
from zimage_serve.engine.text import PromptEmbedding, encode_text
from zimage_serve.engine.variants import DEFAULTS
from zimage_serve.errors import InvalidParameterError, ZImageError

DEFAULT_NATIVE_SIZE = 1024


@dataclass(frozen=True)
class StepInfo:
    step: int  # 1-based
    total: int
    sigma: float
    latents: torch.Tensor  # the network's (normalised) space, after the step


@dataclass
class GenerationResult:
    images: list[Image.Image]
    params: GenerationParams  # with the size resolved
    seeds: list[int]
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


StepCallback = Callable[[StepInfo], None]


@dataclass(frozen=True)
class ImageInputs:
    """Pictures that steer a generation: a ControlNet's control map, and an image to inpaint with its mask.

    `control` is the map itself (edges, depth, pose: IMAGE, 1 × H × W × 3), already made; `image` and `mask`
    (1 × H × W, 1 = regenerate) inpaint: sampling keeps the image's latent outside the mask (ComfyUI's
    noise mask), a 2.x ControlNet also reads both, and the result is pasted back onto the image through
    the mask. Each is fitted to the generated size."""

    controlnet: FunControlNet | None = None
    control: torch.Tensor | None = None
    strength: float = 0.75
    image: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def check(self) -> None:
        if (self.image is None) != (self.mask is None):
            raise InvalidParameterError("mask", "inpainting needs both an image and its mask")
        if self.control is not None and self.controlnet is None:
            raise InvalidParameterError("controlnet", "a control image needs a ControlNet to read it")
        if self.controlnet is not None and self.control is None and self.image is None:
            raise InvalidParameterError("control_image", "a ControlNet needs a control image or an image to inpaint")
        if self.controlnet is not None and self.control is None and not self.controlnet.variant.inpaint:
            raise InvalidParameterError(
                "controlnet", f"{self.controlnet.name} cannot inpaint ({self.controlnet.variant.describe()})"
            )
        if not (math.isfinite(self.strength) and -10 <= self.strength <= 10):
            raise InvalidParameterError("control_strength", f"{self.strength} is outside -10..10")


CancelCheck = Callable[[], bool]


class ZImageEngine:
    def __init__(
        self, model: LoadedModel, native_size: int = DEFAULT_NATIVE_SIZE, fast: FastPath | None = None
    ) -> None:
        self.model = model
        self.native_size = native_size
        self.variant = model.sources.variant
        self.device = model.placement.device
        self.fast = FastPath() if fast is None else fast
        if model.placement.memory_mode is not MemoryMode.GPU:
            self.fast = for_smart_memory(self.fast)
        self.fast_path = apply_fast_path(model.transformer, model.vae, self.device, self.fast)
        install_control_hooks(model.transformer)
        self._encode: Callable[[str, int], PromptEmbedding] = self._encode_uncached
        if self.fast.prompt_cache > 0:
            # Embeddings are never modified in place after encoding, so one object can serve every request.
            self._encode = functools.lru_cache(maxsize=self.fast.prompt_cache)(self._encode_uncached)

    # -- stage 1 -------------------------------------------------------------------------------
    def encode_prompt(self, text: str, max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> PromptEmbedding:
        return self._encode(text, max_sequence_length)

    def clear_prompt_cache(self) -> None:
        cache_clear = getattr(self._encode, "cache_clear", None)
        if cache_clear is not None:
            cache_clear()

    def _encode_uncached(self, text: str, max_sequence_length: int) -> PromptEmbedding:
        return encode_text(self.model.text_encoder, self.model.tokenizer, text, self.device, max_sequence_length)

    # -- stage 2 -------------------------------------------------------------------------------
    def initial_noise(self, seeds: list[int], width: int, height: int) -> torch.Tensor:
        """fp32 noise drawn on the CPU, one generator per image, so a seed gives the same image anywhere."""
        channels = self.model.transformer.config.in_channels
        shape = (channels, height // LATENT_FACTOR, width // LATENT_FACTOR)
        noise = [torch.randn(shape, generator=torch.Generator().manual_seed(s), dtype=torch.float32) for s in seeds]
        return torch.stack(noise).to(self.device)

    def denoise(
        self,
        latents: torch.Tensor,
        positive: PromptEmbedding,
        negative: PromptEmbedding | None = None,
        *,
        steps: int = 8,
        shift: float = 3.0,
        guidance_scale: float = 0.0,
        cfg_normalization: float = 0.0,
        cfg_truncation: float = 1.0,
        on_step: StepCallback | None = None,
        cancel: CancelCheck | None = None,
        start: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        controls: tuple[ControlPatch, ...] = (),
        loras: Sequence[tuple[LoraWeights, float]] = (),
    ) -> torch.Tensor:
        """Euler flow matching from the noise `latents` at σ=1 to raw VAE latents, in exactly `steps` steps.

        Guidance follows diffusers' convention (0 off); it runs as ComfyUI's cfg = guidance + 1 on the
        denoised predictions, which is the same combination of the two velocities. With `start` (raw latents)
        and `mask` (1 = regenerate), sampling keeps `start` outside the mask; `controls` steer the model.
        """
        use_cfg = guidance_scale > 0
        if use_cfg and negative is None:
            raise ValueError("guidance needs a negative prompt embedding (an empty prompt is fine)")
        sigmas = sigma_schedule(steps, shift)

        def report(step: int, total: int, x: torch.Tensor) -> None:
            if on_step is not None:
                on_step(StepInfo(step, total, sigmas[step], x))

        model = self._diffusion_model(shift)
        for lora, strength in loras:
            model = model.with_lora(lora, strength)
        for control in controls:
            model = model.with_control(control)
        return sample(
            model,
            latents,
            torch.zeros_like(latents) if start is None else start,  # at σ0 = 1 only the noise mask reads it
            [positive],
            [negative] if use_cfg and negative is not None else [],
            cfg=guidance_scale + 1.0 if use_cfg else 1.0,
            sampler="euler",
            sigmas=sigmas,
            seed=None,
            on_step=report,
            cancel=cancel,
            cfg_normalization=cfg_normalization,
            cfg_truncation=cfg_truncation,
            denoise_mask=mask,
        )

    # -- stage 3 -------------------------------------------------------------------------------
    def decode(self, latents: torch.Tensor, cancel: CancelCheck | None = None) -> list[Image.Image]:
        """Raw latents to pictures, one image at a time (decoding dominates peak memory at large sizes)."""
        pixels = Vae(self.model.sources.name, self.model.vae).decode(latents, cancel)
        return to_pil(pixels)

    def _pasted(
        self, latents: torch.Tensor, image: torch.Tensor, mask: torch.Tensor, cancel: CancelCheck | None
    ) -> list[Image.Image]:
        """Decoded images with the source image kept outside the mask, pixel for pixel."""
        pixels = self.vae().decode(latents, cancel)
        size = pixels.shape[1:3]
        regenerate = torch.nn.functional.interpolate(mask.float().reshape(-1, 1, *mask.shape[-2:]), size=size,
                                                     mode="bilinear").movedim(1, -1)  # fmt: skip
        return to_pil(pixels * regenerate + image[..., :3] * (1.0 - regenerate))

    def _diffusion_model(self, shift: float) -> DiffusionModel:
        config = self.model.vae.config  # the VAE's factors map its latents to the network's space
        latent_format = LatentFormat(float(config.scaling_factor), float(config.shift_factor or 0.0))
        return DiffusionModel(self.model.sources.name, self.model.transformer, latent_format, FlowSampling(shift=shift))

    # -- all three -----------------------------------------------------------------------------
    def resolve(self, params: GenerationParams) -> GenerationParams:
        """`params` with the model's size, and its variant's steps and guidance where they are not given."""
        params.validate()
        defaults = DEFAULTS[self.variant]
        resolved = replace(
            params,
            width=params.width or self.native_size,
            height=params.height or self.native_size,
            steps=params.steps if params.steps is not None else defaults.steps,
            guidance_scale=params.guidance_scale if params.guidance_scale is not None else defaults.guidance_scale,
        )
        resolved.validate()  # the pixels of a size given on one side only, with the model's on the other
        return resolved

    def load_controlnet(self, path: Path) -> FunControlNet:
        """A Fun ControlNet for this model, on its device; under smart memory it shares the card with the
        model's components (and is held on it beside the transformer while it steers)."""
        controlnet = load_controlnet(path.name, path, self.model.placement)  # smart memory: with its residency
        try:
            controlnet.check_fits(self.model.transformer)
        except ZImageError as exc:
            raise InvalidParameterError("controlnet", str(exc).removeprefix("model_patch: ")) from exc
        return controlnet

    def vae(self) -> Vae:
        return Vae(self.model.sources.name, self.model.vae)

    def generate(
        self,
        params: GenerationParams,
        on_step: StepCallback | None = None,
        cancel: CancelCheck | None = None,
        inputs: ImageInputs | None = None,
        loras: Sequence[tuple[LoraWeights, float]] = (),
    ) -> GenerationResult:
        """Text (and pictures, `inputs`) to images, with each LoRA of `loras` applied at its strength for
        this generation only."""
        inputs = inputs or ImageInputs()
        inputs.check()
        params = self.resolve(params)
        assert params.width is not None and params.height is not None
        assert params.steps is not None and params.guidance_scale is not None
        timings: dict[str, float] = {}
        warnings: list[str] = []

        started = time.perf_counter()
        positive = self.encode_prompt(params.prompt, params.max_sequence_length)
        negative = (
            self.encode_prompt(params.negative_prompt, params.max_sequence_length) if params.cfg_enabled else None
        )
        for name, embedding in (("prompt", positive), ("negative prompt", negative)):
            if embedding is not None and embedding.truncated_tokens:
                warnings.append(
                    f"{name} truncated: {embedding.token_count} tokens (with the chat template) exceed the "
                    f"limit of {params.max_sequence_length}; the last {embedding.truncated_tokens} were dropped"
                )
        timings["encode"] = self._lap(started)

        started = time.perf_counter()
        seeds = params.image_seeds()
        image = None if inputs.image is None else _fitted(inputs.image, params.width, params.height)
        mask = None if inputs.mask is None else _fitted_mask(inputs.mask, params.width, params.height)
        start = None if image is None else self.vae().encode(image, cancel).repeat(params.batch_size, 1, 1, 1)
        controls: tuple[ControlPatch, ...] = ()
        if inputs.controlnet is not None:
            controls = (
                ControlPatch(
                    inputs.controlnet, self.vae(), inputs.strength, image=inputs.control, inpaint_image=image,
                    mask=mask,
                ),
            )  # fmt: skip
        latents = self.denoise(
            self.initial_noise(seeds, params.width, params.height),
            positive,
            negative,
            steps=params.steps,
            shift=params.shift,
            guidance_scale=params.guidance_scale,
            cfg_normalization=params.cfg_normalization,
            cfg_truncation=params.cfg_truncation,
            on_step=on_step,
            cancel=cancel,
            start=start,
            mask=mask,
            controls=controls,
            loras=loras,
        )
        timings["denoise"] = self._lap(started)

        started = time.perf_counter()
        if image is not None and mask is not None:
            images = self._pasted(latents, image, mask, cancel)
        else:
            images = self.decode(latents, cancel)
        timings["decode"] = self._lap(started)
        timings["total"] = sum(timings.values())
        return GenerationResult(images, params, seeds, timings, warnings)

    def _lap(self, started: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - started

    def describe(self) -> dict[str, Any]:
        sources = self.model.sources
        return {
            "model": sources.name,
            "layout": sources.layout,
            "placement": self.model.placement.describe(),
            "memory_mode": str(self.model.placement.memory_mode),
            "weight_dtype": self.model.placement.weight_dtype,
            "fast_path": dict(self.fast_path),
        }


def _fitted(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """The picture at the generated size: a centre crop to its aspect ratio, then an area resize."""
    from zimage_serve.engine.resize import scale_image

    if (image.shape[2], image.shape[1]) == (width, height):
        return image
    return scale_image(image, width, height, "area", "center")


def _fitted_mask(mask: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """The mask cut and resized as its picture is (`_fitted`), so the two stay aligned."""
    from zimage_serve.engine.resize import common_upscale

    planes = mask.float().reshape(-1, 1, *mask.shape[-2:])
    if planes.shape[-2:] == (height, width):
        return planes[:, 0]
    return common_upscale(planes, width, height, "bilinear", "center")[:, 0]
