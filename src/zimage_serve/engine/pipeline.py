"""Z-Image generation in stages: encode the prompt, denoise, decode.

The workflow executor drives the stages one node at a time; `generate` runs them in a row. Each stage
takes and returns plain tensors so it can be cached or run on its own.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from zimage_serve.engine.devices import MemoryMode
from zimage_serve.engine.fastpath import FastPath, apply_fast_path, for_offload
from zimage_serve.engine.loader import LoadedModel
from zimage_serve.engine.params import MAX_SEQUENCE_LENGTH, GenerationParams
from zimage_serve.engine.prompt import prompt_token_ids
from zimage_serve.engine.schedule import make_scheduler
from zimage_serve.errors import GenerationCancelled

DEFAULT_NATIVE_SIZE = 1024
LATENT_FACTOR = 8


@dataclass(frozen=True)
class PromptEmbedding:
    embeds: torch.Tensor  # [tokens, features]: the text encoder's second-to-last hidden state
    token_count: int  # tokens of the templated prompt before truncation
    truncated_tokens: int  # tokens cut at the sequence limit (0 when it fit)


@dataclass(frozen=True)
class StepInfo:
    step: int  # 1-based
    total: int
    sigma: float
    latents: torch.Tensor


@dataclass
class GenerationResult:
    images: list[Image.Image]
    params: GenerationParams  # with the size resolved
    seeds: list[int]
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


StepCallback = Callable[[StepInfo], None]


@torch.inference_mode()
def encode_text(
    text_encoder: Any, tokenizer: Any, text: str, device: torch.device, max_sequence_length: int | None = None
) -> PromptEmbedding:
    """The second-to-last hidden state of the templated prompt, as Z-Image is prompted.

    Unpadded: the encoder is causal, so padding would not change these tokens' states. ComfyUI does not
    truncate Z-Image prompts (`max_sequence_length` None); diffusers stops at 512 tokens.
    """
    ids = prompt_token_ids(tokenizer, text)
    kept = ids if max_sequence_length is None else ids[:max_sequence_length]
    input_ids = torch.tensor([kept], dtype=torch.long, device=device)
    hidden = text_encoder(input_ids=input_ids, output_hidden_states=True).hidden_states[-2]
    return PromptEmbedding(hidden[0], len(ids), len(ids) - len(kept))


CancelCheck = Callable[[], bool]


class ZImageEngine:
    def __init__(
        self, model: LoadedModel, native_size: int = DEFAULT_NATIVE_SIZE, fast: FastPath | None = None
    ) -> None:
        self.model = model
        self.native_size = native_size
        self.device = model.placement.device
        self.fast = FastPath() if fast is None else fast
        if model.placement.memory_mode is not MemoryMode.GPU:
            self.fast = for_offload(self.fast)
        self.fast_path = apply_fast_path(model.transformer, model.vae, self.device, self.fast)
        self._image_processor = VaeImageProcessor(vae_scale_factor=LATENT_FACTOR * 2)
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

    @torch.inference_mode()
    def denoise(
        self,
        latents: torch.Tensor,
        positive: PromptEmbedding,
        negative: PromptEmbedding | None = None,
        *,
        steps: int = 8,
        shift: float = 3.0,
        guidance_scale: float = 0.0,
        on_step: StepCallback | None = None,
        cancel: CancelCheck | None = None,
    ) -> torch.Tensor:
        """Euler flow matching from σ=1 to 0 in exactly `steps` transformer calls (twice each with CFG)."""
        transformer = self.model.transformer
        scheduler = make_scheduler(steps, shift, self.model.sources.scheduler_config, self.device)
        batch = latents.shape[0]
        use_cfg = guidance_scale > 0
        if use_cfg and negative is None:
            raise ValueError("guidance needs a negative prompt embedding (an empty prompt is fine)")
        dtype = self.model.placement.dtype
        captions = [positive.embeds.to(dtype)] * batch
        if use_cfg:
            assert negative is not None
            captions += [negative.embeds.to(dtype)] * batch
        latents = latents.to(torch.float32)
        sigmas = [float(s) for s in scheduler.sigmas]  # read once, before the loop: no host sync inside it
        for index, t in enumerate(scheduler.timesteps):
            if cancel is not None and cancel():
                raise GenerationCancelled(f"generation cancelled before step {index + 1} of {steps}")
            model_input = latents.to(dtype)
            if use_cfg:
                model_input = torch.cat([model_input, model_input])
            # The network is fed t = 1 - σ (0 is noise) and predicts x0 - ε; the scheduler wants ε - x0.
            timestep = ((1000 - t) / 1000).expand(model_input.shape[0])
            outputs = transformer(list(model_input.unsqueeze(2).unbind(0)), timestep, captions, return_dict=False)[0]
            prediction = torch.stack([o.float() for o in outputs]).squeeze(2)
            if use_cfg:
                pos, neg = prediction[:batch], prediction[batch:]
                prediction = pos + guidance_scale * (pos - neg)
            latents = scheduler.step(-prediction, t, latents, return_dict=False)[0]
            if on_step is not None:
                on_step(StepInfo(index + 1, steps, sigmas[index + 1], latents))
        return latents

    # -- stage 3 -------------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        vae = self.model.vae
        images: list[Image.Image] = []
        # One image at a time: VAE decoding dominates peak memory at large sizes.
        for latent in latents:
            scaled = latent[None].to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
            if self.fast_path.get("vae") == "channels-last":
                scaled = scaled.to(memory_format=torch.channels_last)
            pixels = vae.decode(scaled, return_dict=False)[0]
            images.extend(self._image_processor.postprocess(pixels.float(), output_type="pil"))
        self.model.hooks.offload_all()
        return images

    # -- all three -----------------------------------------------------------------------------
    def resolve(self, params: GenerationParams) -> GenerationParams:
        params.validate()
        return replace(params, width=params.width or self.native_size, height=params.height or self.native_size)

    def generate(
        self, params: GenerationParams, on_step: StepCallback | None = None, cancel: CancelCheck | None = None
    ) -> GenerationResult:
        params = self.resolve(params)
        assert params.width is not None and params.height is not None
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
        latents = self.denoise(
            self.initial_noise(seeds, params.width, params.height),
            positive,
            negative,
            steps=params.steps,
            shift=params.shift,
            guidance_scale=params.guidance_scale,
            on_step=on_step,
            cancel=cancel,
        )
        timings["denoise"] = self._lap(started)

        started = time.perf_counter()
        images = self.decode(latents)
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
