"""The three components loaded one by one, as ComfyUI's loader nodes do, and sampling over them.

`DiffusionModel`, `TextEncoder` and `Vae` are what flow along a workflow's MODEL, CLIP and VAE links.
They are immutable views: changing the shift or stacking a LoRA returns a new view over the same
loaded weights, so the executor's cache can share one loaded model between many workflows.
Latents on LATENT links are in the VAE's raw space (what `Vae.encode` returns), as in ComfyUI; the
diffusion model's `LatentFormat` maps them to the normalised space the network was trained on.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from zimage_serve.engine import activations, components, control_hooks
from zimage_serve.engine.cancel import cancellable
from zimage_serve.engine.cancel import install as install_cancel_checks
from zimage_serve.engine.components import ComponentSource
from zimage_serve.engine.control_patch import ControlPatch
from zimage_serve.engine.fastpath import (
    accelerate_transformer,
    accelerate_vae,
    int8_matmul_enabled,
)
from zimage_serve.engine.loader import load_tokenizer, load_transformer
from zimage_serve.engine.lora import LoraPatch, LoraWeights, check_fits, patched
from zimage_serve.engine.model_sampling import FlowSampling
from zimage_serve.engine.names import LATENT_FACTOR
from zimage_serve.engine.placement import Placement
from zimage_serve.engine.prompt import prompt_token_ids
from zimage_serve.engine.residency import execution_device, holding
from zimage_serve.engine.residency_plan import NoRoom
from zimage_serve.engine.resize import repeat_to_batch
from zimage_serve.engine.sampling import CancelCheck, Sampler, StepHook
from zimage_serve.engine.text import PromptEmbedding, encode_text
from zimage_serve.errors import GenerationCancelled

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LatentFormat:
    """Raw VAE latents ↔ the network's space: (raw - shift) · scale, as diffusers and ComfyUI both do."""

    scale: float
    shift: float

    def process_in(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self.shift) * self.scale

    def process_out(self, latent: torch.Tensor) -> torch.Tensor:
        return latent / self.scale + self.shift


FLUX_LATENT = LatentFormat(scale=0.3611, shift=0.1159)  # Z-Image-Turbo's (the Flux VAE's) factors


@dataclass(frozen=True)
class DiffusionModel:
    """MODEL: the transformer, how its latents are scaled, its flow shift, and the LoRAs and ControlNets
    to apply."""

    name: str
    transformer: Any  # diffusers ZImageTransformer2DModel
    latent_format: LatentFormat
    sampling: FlowSampling = field(default_factory=FlowSampling)
    patches: tuple[LoraPatch, ...] = ()
    controls: tuple[ControlPatch, ...] = ()
    trained_size: int | None = None  # the one size it was trained at, if it has one (engine/trained_size.py)

    @property
    def device(self) -> torch.device:
        return execution_device(self.transformer)

    @property
    def dtype(self) -> torch.dtype:
        dtype: torch.dtype = next(self.transformer.parameters()).dtype
        return dtype

    @property
    def latent_channels(self) -> int:
        return int(self.transformer.config.in_channels)

    def with_shift(self, shift: float) -> DiffusionModel:
        return replace(self, sampling=replace(self.sampling, shift=shift))

    def with_lora(self, lora: LoraWeights, strength: float) -> DiffusionModel:
        check_fits(lora, self.transformer)
        return replace(self, patches=(*self.patches, LoraPatch(lora, strength)))

    def with_control(self, control: ControlPatch) -> DiffusionModel:
        control.controlnet.check_fits(self.transformer)
        return replace(self, controls=(*self.controls, control))

    def prepare_controls(self, latent: torch.Tensor, cancel: CancelCheck | None = None) -> None:
        """Encode the ControlNets' images for latents of this size (once; each call of `velocity` uses them)."""
        height, width = _patch_grid(latent)
        for control in self.controls:
            control.context(height, width, self.latent_format, cancel)

    @contextlib.contextmanager
    def patched(self, elements: int | None = None) -> Iterator[None]:
        """The LoRAs applied for the block; under smart memory, the ControlNets held first (they run inside
        the transformer's calls: its room is planned beside them) and the transformer held for calls on
        `elements` latent elements."""
        with contextlib.ExitStack() as held:
            for control in self.controls:
                held.enter_context(holding(control.controlnet.module, inside=True))
            held.enter_context(patched(self.transformer, self.patches, elements))
            yield

    def velocity(self, x: torch.Tensor, sigma: float, captions: list[torch.Tensor]) -> torch.Tensor:
        """ε - x0 for each latent (the network predicts x0 - ε from t = 1 - σ).

        Latents with an odd side are padded circularly to the 2×2 patch grid and cropped back, as
        ComfyUI pads them, so any size a user picks in multiples of 8 pixels works.
        """
        height, width = x.shape[-2:]
        padded = (
            torch.nn.functional.pad(x, (0, width % 2, 0, height % 2), mode="circular") if (height | width) % 2 else x
        )
        timestep = torch.full((x.shape[0],), 1.0 - sigma, device=self.device, dtype=torch.float32)
        model_input = list(padded.to(self.device, self.dtype).unsqueeze(2).unbind(0))
        captions = [c.to(self.device, self.dtype) for c in captions]
        with control_hooks.steering(self.transformer, self.controls, padded, self.latent_format):
            outputs = self.transformer(model_input, timestep, captions)[0]
        return -torch.stack([o.float() for o in outputs]).squeeze(2)[..., :height, :width]


@dataclass(frozen=True)
class TextEncoder:
    """CLIP: Qwen3 and its tokenizer; gives the second-to-last hidden state, as Z-Image is prompted."""

    name: str
    model: Any  # transformers Qwen3Model
    tokenizer: Any

    def encode(self, text: str) -> PromptEmbedding:
        # ComfyUI neither pads nor truncates Z-Image prompts; neither do we here.
        return encode_text(self.model, self.tokenizer, text, execution_device(self.model))

    def token_count(self, text: str) -> int:
        """The templated prompt's tokens, as `encode` would read them."""
        return len(prompt_token_ids(self.tokenizer, text))


@dataclass(frozen=True)
class Vae:
    """VAE: pixels (B, H, W, C in 0..1, ComfyUI's IMAGE layout) ↔ raw latents (B, C, H/8, W/8)."""

    name: str
    model: Any  # diffusers AutoencoderKL
    scaling: LatentFormat = field(default=FLUX_LATENT)  # the factors in its config, for models that bring none

    @property
    def device(self) -> torch.device:
        return execution_device(self.model)

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor, cancel: CancelCheck | None = None) -> torch.Tensor:
        """Raw latents; stops (GenerationCancelled) between images and between the encoder's blocks once
        `cancel()` is true. In tiles when the whole image does not fit in the card's memory."""
        height = pixels.shape[1] // LATENT_FACTOR * LATENT_FACTOR
        width = pixels.shape[2] // LATENT_FACTOR * LATENT_FACTOR
        top, left = (pixels.shape[1] % LATENT_FACTOR) // 2, (pixels.shape[2] % LATENT_FACTOR) // 2
        pixels = pixels[:, top : top + height, left : left + width, :3]  # centred whole cells, as ComfyUI crops

        def encode(x: torch.Tensor, tiled: bool) -> torch.Tensor:
            if tiled:  # the moments diffusers' encode makes in tiles itself: the mode is their first half
                moments: torch.Tensor = self.model._tiled_encode(x)
                return moments.chunk(2, dim=1)[0]
            mode: torch.Tensor = self.model.encode(x).latent_dist.mode()
            return mode

        def run(tiled: bool) -> torch.Tensor:
            latents = []
            with cancellable(cancel), holding(self.model, self._elements(_latent_elements(pixels[:1]), tiled)):
                for image in pixels:
                    _stop_if(cancel)
                    x = image.permute(2, 0, 1)[None].to(self.device, self.model.dtype) * 2 - 1
                    latents.append(encode(x, tiled).float().cpu())
            return torch.cat(latents)

        return self._whole_or_tiled(run, "encoding", pixels.shape[2], pixels.shape[1])

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, cancel: CancelCheck | None = None) -> torch.Tensor:
        """Pixels; stops between images and between the decoder's blocks once `cancel()` is true. In tiles
        when the whole image does not fit in the card's memory."""

        def run(tiled: bool) -> torch.Tensor:
            decode = self.model.tiled_decode if tiled else self.model.decode
            images = []
            with cancellable(cancel), holding(self.model, self._elements(latents[:1].numel(), tiled)):
                for latent in latents:  # one at a time: decoding dominates peak memory at large sizes
                    _stop_if(cancel)
                    pixels = decode(latent[None].to(self.device, self.model.dtype), return_dict=False)[0]
                    images.append(((pixels.float().cpu() + 1) / 2).clamp(0, 1)[0].permute(1, 2, 0))
            return torch.stack(images)

        width, height = latents.shape[-1] * LATENT_FACTOR, latents.shape[-2] * LATENT_FACTOR
        return self._whole_or_tiled(run, "decoding", width, height)

    def _whole_or_tiled(self, run: Callable[[bool], torch.Tensor], what: str, width: int, height: int) -> torch.Tensor:
        """`run(False)`; on running out of the card's memory, as ComfyUI does, `run(True)` (the VAE's own
        tiles, blended where they overlap: the pixels differ slightly from a whole decode)."""
        try:
            return run(False)
        except (torch.OutOfMemoryError, NoRoom) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.warning("VAE %s at %dx%d did not fit in the GPU's memory (%s): %s it again in tiles",
                    what, width, height, reason, what)  # fmt: skip
        gc.collect()  # the failed attempt's tensors, held by its traceback until now
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return run(True)

    def _elements(self, elements: int, tiled: bool) -> int:
        """The latent elements of one call: the whole image's, or at most one tile's."""
        if not tiled:
            return elements
        tile = int(getattr(self.model, "tile_latent_min_size", 0)) or 1
        return min(elements, activations.LATENT_CHANNELS * tile * tile)


def _capped(x: torch.Tensor, cond: torch.Tensor, combined: torch.Tensor, sigma: float, k: float) -> torch.Tensor:
    """diffusers' CFG renormalisation, per image: the guided velocity at most k times the positive's norm."""
    velocity, positive = (x - combined) / sigma, (x - cond) / sigma
    dims = tuple(range(1, x.dim()))
    most = torch.linalg.vector_norm(positive, dim=dims, keepdim=True) * k
    norm = torch.linalg.vector_norm(velocity, dim=dims, keepdim=True)
    scale = torch.where(norm > most, most / norm, torch.ones_like(norm))
    return x - sigma * velocity * scale


def prepare_mask(mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """ComfyUI's noise mask for a latent of `shape`: resized bilinearly, on every channel, one per image."""
    mask = mask.float().reshape(-1, 1, *mask.shape[-2:])
    mask = torch.nn.functional.interpolate(mask, size=tuple(shape[-2:]), mode="bilinear")
    return repeat_to_batch(mask.expand(-1, shape[1], -1, -1), shape[0])


def _latent_elements(pixels: torch.Tensor) -> int:
    """The elements of the latent an image (B, H, W, C) encodes to: the size smart memory keys the VAE's calls by,
    in either direction."""
    return activations.latent_elements(pixels.shape[0] * pixels.shape[1] * pixels.shape[2])


def _patch_grid(latent: torch.Tensor) -> tuple[int, int]:
    """The latent's size once padded to the transformer's 2×2 patches (as `velocity` pads it)."""
    height, width = latent.shape[-2:]
    return height + height % 2, width + width % 2


def _stop_if(cancel: CancelCheck | None) -> None:
    if cancel is not None and cancel():
        raise GenerationCancelled("interrupted between images")


# -- loading -----------------------------------------------------------------------------------------


def load_diffusion_model(
    name: str,
    source: ComponentSource,
    placement: Placement,
    latent_format: LatentFormat = FLUX_LATENT,
    weight_dtype: str = "default",
) -> DiffusionModel:
    prepared = components.prepare(source)
    int8 = int8_matmul_enabled(placement.fast, placement.device)
    transformer = load_transformer(prepared, placement.load_device, placement.dtype, weight_dtype, int8)
    applied = accelerate_transformer(transformer, placement.device, placement.fast)
    install_cancel_checks(transformer)
    control_hooks.install(transformer)
    placement.place(transformer, name, activations.transformer(transformer.config))
    log.info("loaded diffusion model %s on %s (%s)", name, placement.device, applied)
    return DiffusionModel(name, transformer, latent_format)


def load_text_encoder(name: str, source: ComponentSource, tokenizer: Path, placement: Placement) -> TextEncoder:
    prepared = components.prepare(source)
    loaded_tokenizer = load_tokenizer(tokenizer, prepared.config["vocab_size"])
    model = components.load(prepared, placement.load_device, placement.dtype)
    placement.place(install_cancel_checks(model), name, activations.text_encoder(model.config), one_pass=True)
    log.info("loaded text encoder %s on %s (%s)", name, placement.device, placement.memory_mode)
    return TextEncoder(name, model, loaded_tokenizer)


def load_vae(name: str, source: ComponentSource, placement: Placement) -> Vae:
    prepared = components.prepare(source)
    model = components.load(prepared, placement.load_device, placement.vae_dtype)
    accelerate_vae(model, placement.device, placement.fast)
    install_cancel_checks(model)
    placement.place(model, name, activations.vae(model.config))
    config = prepared.config
    scaling = LatentFormat(float(config.get("scaling_factor", 0.3611)), float(config.get("shift_factor") or 0.0))
    log.info("loaded VAE %s on %s", name, placement.device)
    return Vae(name, model, scaling)


# -- sampling ----------------------------------------------------------------------------------------


def prepare_noise(latent: torch.Tensor, seed: int, batch_index: list[int] | None = None) -> torch.Tensor:
    """ComfyUI's noise: one CPU generator for the whole batch, so image i of a batch is not `seed + i`."""
    generator = torch.Generator().manual_seed(seed)
    if batch_index is None:
        return torch.randn(latent.shape, dtype=torch.float32, generator=generator)
    noises = []
    unique = sorted(set(batch_index))
    for index in range(unique[-1] + 1):
        noise = torch.randn((1, *latent.shape[1:]), dtype=torch.float32, generator=generator)
        if index in unique:
            noises.append(noise)
    by_index = dict(zip(unique, noises, strict=True))
    return torch.cat([by_index[i] for i in batch_index])


def sample(
    model: DiffusionModel,
    noise: torch.Tensor,
    latent: torch.Tensor,
    positive: list[PromptEmbedding],
    negative: list[PromptEmbedding],
    *,
    cfg: float,
    sampler: str,
    sigmas: list[float],
    seed: int | None,
    on_step: StepHook | None = None,
    cancel: CancelCheck | None = None,
    cfg_normalization: float = 0.0,
    cfg_truncation: float = 1.0,
    denoise_mask: torch.Tensor | None = None,
    x0_output: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """KSampler's core: noise the (raw) latent to σ0, run the sampler, return raw latents.

    Guidance is ComfyUI's: ``uncond + (cond - uncond) · cfg`` on the denoised predictions, with the
    positive and negative entries in one batched call per step (cfg doubles the batch, not the calls),
    and at cfg 1 the negative is never evaluated (so 8 steps cost 8 network calls). Several entries on
    one side are averaged, each over its timestep range. `cfg_normalization` and `cfg_truncation` are
    diffusers' (Z-Image's pipeline): the guided velocity's norm is capped at k times the positive one's,
    and the steps whose 1 - σ is past the truncation run without guidance.

    `denoise_mask` is ComfyUI's noise mask (1 = regenerate, any size; resized to the latent): outside it
    the latent is held on its own noised trajectory and every prediction there is the input latent, so
    the sampled latent keeps the input's values where the mask is 0. `x0_output`, when given, receives
    the last prediction of the clean latent (raw) under "x0", as ComfyUI's preview callback keeps it.
    """
    if not sigmas or len(sigmas) < 2:
        return latent
    fmt = model.latent_format
    device = model.device  # the whole trajectory stays on the model's device; only the result comes back
    x0_in = fmt.process_in(latent.float().to(device))
    noise = noise.float().to(device)
    x = sigmas[0] * noise + (1.0 - sigmas[0]) * x0_in
    use_cfg = abs(cfg - 1.0) > 1e-9 and bool(negative)  # no negative entry: nothing to guide against
    ranges = {id(e): model.sampling.sigma_range(e.start_percent, e.end_percent) for e in [*positive, *negative]}

    def active(entries: list[PromptEmbedding], sigma: float) -> list[PromptEmbedding]:
        return [e for e in entries if ranges[id(e)][1] <= sigma <= ranges[id(e)][0]]

    # On a GPU a batch is one call; on a CPU, where one image at full size takes many seconds, each image
    # is a call of its own, so an interrupt between them comes before the next image, not the next step.
    chunk = x.shape[0] if device.type == "cuda" else 1

    def guided(x: torch.Tensor, sigma: float) -> torch.Tensor:
        guiding = use_cfg and 1.0 - sigma <= cfg_truncation
        conds, unconds = active(positive, sigma), active(negative, sigma) if guiding else []
        used = [*conds, *unconds]
        result = torch.zeros_like(x)
        if not used:  # no entry covers this step: ComfyUI's prediction is then zero
            return result
        for start in range(0, x.shape[0], chunk):
            _stop_if(cancel)
            part = x[start : start + chunk]
            size = part.shape[0]
            stacked = part.repeat(len(used), *([1] * (part.dim() - 1)))  # entry-major: [e0 images, e1 images]
            captions = [entry.embeds for entry in used for _ in range(size)]
            denoised = (stacked - sigma * model.velocity(stacked, sigma, captions)).view(len(used), *part.shape)
            cond = denoised[: len(conds)].mean(0) if conds else torch.zeros_like(part)
            if not guiding:
                result[start : start + chunk] = cond
                continue
            uncond = denoised[len(conds) :].mean(0) if unconds else torch.zeros_like(part)
            combined = uncond * (1 - cfg) + cond * cfg
            if cfg_normalization > 0 and sigma > 0:
                combined = _capped(part, cond, combined, sigma, cfg_normalization)
            result[start : start + chunk] = combined
        return result

    denoiser = guided
    if denoise_mask is not None:
        regenerate = prepare_mask(denoise_mask, x.shape).to(device)
        keep = 1.0 - regenerate
        if sampler == "ddim":  # ComfyUI's ddim: Euler whose kept region follows fresh noise (seed + 1)
            generator = torch.Generator().manual_seed((seed if seed is not None else 41) + 1)
            noise = torch.randn(noise.shape, generator=generator, dtype=torch.float32).to(device)

        def masked(x: torch.Tensor, sigma: float) -> torch.Tensor:
            x = x * regenerate + (sigma * noise + (1.0 - sigma) * x0_in) * keep
            return guided(x, sigma) * regenerate + x0_in * keep

        denoiser = masked
    if x0_output is not None:
        predicting = denoiser

        def recorded(x: torch.Tensor, sigma: float) -> torch.Tensor:
            x0_output["x0"] = denoised = predicting(x, sigma)
            return denoised

        denoiser = recorded

    with torch.inference_mode(), cancellable(cancel):
        model.prepare_controls(latent, cancel)  # before the patch: its VAE need not share the card with it held
    calls = x.numel() * (2 if use_cfg else 1)  # a step's transformer call: the negative doubles the batch
    with torch.inference_mode(), model.patched(calls), cancellable(cancel):
        run = Sampler(sampler, seed=seed, on_step=on_step, cancel=cancel, sampling=model.sampling)
        result = run(denoiser, x, sigmas)
    if sigmas[-1] > 0:  # leftover noise (KSamplerAdvanced): undo the signal scaling as ComfyUI does
        result = result / (1.0 - sigmas[-1])
    if x0_output is not None and "x0" in x0_output:
        x0_output["x0"] = fmt.process_out(x0_output["x0"]).cpu()
    return fmt.process_out(result).cpu()
