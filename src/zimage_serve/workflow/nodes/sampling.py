"""The sampler nodes and the flow shift: where the diffusion model runs."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from zimage_serve.engine.names import LATENT_FACTOR, SAMPLERS, SCHEDULERS
from zimage_serve.engine.trained_size import size_warning
from zimage_serve.errors import GenerationCancelled
from zimage_serve.limits import enforce
from zimage_serve.workflow.context import Interrupted, NodeContext
from zimage_serve.workflow.spec import MAX_SEED, Combo, Float, Int, Node, NodeResult, Output, link

if TYPE_CHECKING:
    import torch

    from zimage_serve.engine.parts import DiffusionModel

log = logging.getLogger(__name__)


class ModelSamplingAuraFlow(Node):
    category = "advanced/model"
    description = "Sets the flow shift of the sigma schedule (Z-Image-Turbo's template uses 3)."
    required = {
        "model": link("MODEL"),
        # Not 0 (ComfyUI's minimum): the flow's σ(t) = shift·t / (1 + (shift-1)·t) is then 0/0 at t = 1.
        "shift": Float(default=1.73, min=0.01, max=100.0, step=0.01),
    }
    outputs = (Output("MODEL"),)

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        return NodeResult((inputs["model"].with_shift(inputs["shift"]),))


def _empty_to_model_channels(samples: torch.Tensor, model: DiffusionModel) -> torch.Tensor:
    """An all-zero latent with another channel count (EmptyLatentImage's 4) becomes the model's, as in ComfyUI."""
    import torch

    channels = model.latent_channels
    if samples.shape[1] != channels and not samples.any():
        return torch.zeros((samples.shape[0], channels, *samples.shape[2:]), dtype=samples.dtype)
    if samples.shape[1] != channels:
        raise ValueError(f"the latent has {samples.shape[1]} channels but this model works on {channels}")
    return samples


@dataclass(frozen=True)
class Sampling:
    """What one sampler run needs: KSampler's inputs, or SamplerCustomAdvanced's parts put together."""

    model: DiffusionModel
    latent: dict[str, Any]
    positive: list[Any]
    negative: list[Any]
    cfg: float
    sampler: str
    sigmas: list[float]
    seed: int
    add_noise: bool


def run_sampler(ctx: NodeContext, run: Sampling) -> tuple[dict[str, Any], dict[str, Any]]:
    """The sampled latent, and the latent of the last prediction of the clean image (ComfyUI's
    "denoised_output"); an empty schedule passes the latent through."""
    import torch

    from zimage_serve.engine.parts import prepare_noise, sample

    model, latent, sigmas = run.model, run.latent, run.sigmas
    enforce(ctx.limits, "steps", max(0, len(sigmas) - 1), "steps")
    samples = _empty_to_model_channels(latent["samples"], model)
    enforce(ctx.limits, "batch", samples.shape[0], "latent_image")
    enforce(ctx.limits, "pixels", samples.shape[-1] * samples.shape[-2] * LATENT_FACTOR**2, "latent_image")
    if len(sigmas) < 2:
        passed = {**latent, "samples": samples}
        return passed, passed
    ctx.count_images(samples.shape[0])
    height, width = (side * LATENT_FACTOR for side in samples.shape[-2:])
    warning = size_warning(model.name, model.trained_size, width, height)
    if warning is not None:
        log.warning("%s (node %s)", warning, ctx.node_id)
    noise = prepare_noise(samples, run.seed, latent.get("batch_index")) if run.add_noise else torch.zeros_like(samples)
    x0: dict[str, torch.Tensor] = {}
    try:
        result = sample(
            model,
            noise,
            samples,
            run.positive,
            run.negative,
            cfg=run.cfg,
            sampler=run.sampler,
            sigmas=sigmas,
            seed=run.seed,
            on_step=lambda step, total, _x: _stepped(ctx, step, total, x0, model.latent_format),
            cancel=ctx.interrupted,
            denoise_mask=latent.get("noise_mask"),
            x0_output=x0,
        )
    except GenerationCancelled as exc:
        raise Interrupted(str(exc)) from exc
    out = {**latent, "samples": result.cpu()}
    return out, ({**latent, "samples": x0["x0"].cpu()} if "x0" in x0 else out)


def _stepped(ctx: NodeContext, step: int, total: int, x0: dict[str, Any], latent_format: Any) -> None:
    ctx.progress(step, total)
    if "x0" in x0:  # the newest prediction of the clean latent, in the sampler's space
        ctx.preview(x0["x0"], latent_format)


def _ksampler(
    ctx: NodeContext, inputs: dict[str, Any], *, seed: int, sigmas: list[float], add_noise: bool
) -> NodeResult:
    enforce(ctx.limits, "steps", inputs["steps"], "steps")
    run = Sampling(
        inputs["model"], inputs["latent_image"], inputs["positive"], inputs["negative"], inputs["cfg"],
        inputs["sampler_name"], sigmas, seed, add_noise,
    )  # fmt: skip
    return NodeResult((run_sampler(ctx, run)[0],))


SAMPLER = Combo(choices=SAMPLERS, tooltip="The algorithm used when sampling.")
SCHEDULER = Combo(choices=SCHEDULERS, tooltip="The scheduler controls how noise is gradually removed.")
STEPS = Int(default=20, min=1, max=10000, limit="steps", tooltip="The number of steps used in the denoising process.")
CFG = Float(
    default=8.0,
    min=0.0,
    max=100.0,
    step=0.1,
    round=0.01,
    tooltip="Classifier-free guidance scale; 1 turns it off (Z-Image-Turbo is run at 1).",
)


class KSampler(Node):
    category = "sampling"
    denoises = "latent_image"
    description = "Uses the provided model, positive and negative conditioning to denoise the latent image."
    required = {
        "model": link("MODEL", "The model used for denoising the input latent."),
        "seed": Int(
            default=0, min=0, max=MAX_SEED, control_after_generate=True, tooltip="The random seed used for the noise."
        ),
        "steps": STEPS,
        "cfg": CFG,
        "sampler_name": SAMPLER,
        "scheduler": SCHEDULER,
        "positive": link("CONDITIONING", "The conditioning describing what to include in the image."),
        "negative": link("CONDITIONING", "The conditioning describing what to exclude from the image."),
        "latent_image": link("LATENT", "The latent image to denoise."),
        "denoise": Float(
            default=1.0, min=0.0, max=1.0, step=0.01, tooltip="The amount of denoising applied (< 1 for img2img)."
        ),
    }
    outputs = (Output("LATENT", tooltip="The denoised latent."),)

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        from zimage_serve.engine.schedulers import denoise_schedule

        model: DiffusionModel = inputs["model"]
        sigmas = denoise_schedule(
            model.sampling, inputs["scheduler"], inputs["steps"], inputs["denoise"], inputs["sampler_name"]
        )
        return _ksampler(ctx, inputs, seed=inputs["seed"], sigmas=sigmas, add_noise=True)


class KSamplerAdvanced(Node):
    category = "sampling"
    denoises = "latent_image"
    description = "KSampler over a window of the schedule, with the noise and the final step under control."
    required = {
        "model": link("MODEL"),
        "add_noise": Combo(choices=("enable", "disable")),
        "noise_seed": Int(default=0, min=0, max=MAX_SEED, control_after_generate=True),
        "steps": Int(default=20, min=1, max=10000, limit="steps"),
        "cfg": CFG,
        "sampler_name": SAMPLER,
        "scheduler": SCHEDULER,
        "positive": link("CONDITIONING"),
        "negative": link("CONDITIONING"),
        "latent_image": link("LATENT"),
        "start_at_step": Int(default=0, min=0, max=10000),
        "end_at_step": Int(default=10000, min=0, max=10000),
        "return_with_leftover_noise": Combo(choices=("disable", "enable")),
    }
    outputs = (Output("LATENT"),)

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        from zimage_serve.engine.schedulers import sampler_schedule

        model: DiffusionModel = inputs["model"]
        sigmas = sampler_schedule(model.sampling, inputs["scheduler"], inputs["steps"], inputs["sampler_name"])
        last, start = inputs["end_at_step"], inputs["start_at_step"]
        if last < len(sigmas) - 1:
            sigmas = sigmas[: last + 1]
            if inputs["return_with_leftover_noise"] != "enable":
                sigmas[-1] = 0.0
        # Nothing left to run when the window starts at the end: the latent passes through.
        sigmas = [] if start >= len(sigmas) - 1 else sigmas[start:]
        return _ksampler(
            ctx, inputs, seed=inputs["noise_seed"], sigmas=sigmas, add_noise=inputs["add_noise"] == "enable"
        )
