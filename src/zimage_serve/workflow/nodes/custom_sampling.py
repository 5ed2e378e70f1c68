"""ComfyUI's custom sampling nodes: the sampler's parts (noise, guider, sampler, sigmas) as values of their
own, put together by SamplerCustomAdvanced, which runs the same sampler as KSampler."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from zimage_serve.engine.names import SAMPLERS, SCHEDULERS
from zimage_serve.workflow.context import NodeContext
from zimage_serve.workflow.nodes.sampling import CFG, Sampling, run_sampler
from zimage_serve.workflow.spec import MAX_SEED, Combo, Float, Int, Node, NodeResult, Output, link

if TYPE_CHECKING:
    from zimage_serve.engine.parts import DiffusionModel


@dataclass(frozen=True)
class SamplerChoice:
    """SAMPLER: which sampler runs."""

    name: str


@dataclass(frozen=True)
class NoiseSource:
    """NOISE: the starting noise, from a seed (RandomNoise) or none at all (DisableNoise)."""

    seed: int
    enabled: bool = True


@dataclass(frozen=True)
class Guider:
    """GUIDER: the model and what steers it; BasicGuider is a CFGGuider at cfg 1 without a negative."""

    model: DiffusionModel
    positive: list[Any]
    negative: list[Any]
    cfg: float


class KSamplerSelect(Node):
    category = "sampling/custom_sampling/samplers"
    required = {"sampler_name": Combo(choices=SAMPLERS)}
    outputs = (Output("SAMPLER"),)

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        return NodeResult((SamplerChoice(inputs["sampler_name"]),))


class BasicScheduler(Node):
    category = "sampling/custom_sampling/schedulers"
    required = {
        "model": link("MODEL"),
        "scheduler": Combo(choices=SCHEDULERS),
        "steps": Int(default=20, min=1, max=10000, limit="steps"),
        "denoise": Float(default=1.0, min=0.0, max=1.0, step=0.01),
    }
    outputs = (Output("SIGMAS"),)

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        from zimage_serve.engine.schedulers import schedule
        from zimage_serve.limits import enforce

        steps, denoise = inputs["steps"], inputs["denoise"]
        enforce(ctx.limits, "steps", steps, "steps")
        if denoise <= 0:
            return NodeResult(([],))
        total = steps if denoise >= 1.0 else int(steps / denoise)
        return NodeResult((schedule(inputs["model"].sampling, inputs["scheduler"], total)[-(steps + 1) :],))


class RandomNoise(Node):
    category = "sampling/custom_sampling/noise"
    required = {"noise_seed": Int(default=0, min=0, max=MAX_SEED, control_after_generate=True)}
    outputs = (Output("NOISE"),)

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        return NodeResult((NoiseSource(inputs["noise_seed"]),))


class DisableNoise(Node):
    category = "sampling/custom_sampling/noise"
    outputs = (Output("NOISE"),)

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        return NodeResult((NoiseSource(0, enabled=False),))


class BasicGuider(Node):
    category = "sampling/custom_sampling/guiders"
    required = {"model": link("MODEL"), "conditioning": link("CONDITIONING")}
    outputs = (Output("GUIDER"),)

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        return NodeResult((Guider(inputs["model"], inputs["conditioning"], [], 1.0),))


class CFGGuider(Node):
    category = "sampling/custom_sampling/guiders"
    required = {
        "model": link("MODEL"),
        "positive": link("CONDITIONING"),
        "negative": link("CONDITIONING"),
        "cfg": CFG,
    }
    outputs = (Output("GUIDER"),)

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        return NodeResult((Guider(inputs["model"], inputs["positive"], inputs["negative"], inputs["cfg"]),))


class SamplerCustomAdvanced(Node):
    category = "sampling/custom_sampling"
    denoises = "latent_image"
    description = "Samples with separately chosen noise, guider, sampler and sigmas."
    required = {
        "noise": link("NOISE"),
        "guider": link("GUIDER"),
        "sampler": link("SAMPLER"),
        "sigmas": link("SIGMAS"),
        "latent_image": link("LATENT"),
    }
    outputs = (Output("LATENT", "output"), Output("LATENT", "denoised_output"))

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        noise: NoiseSource = inputs["noise"]
        guider: Guider = inputs["guider"]
        run = Sampling(
            guider.model, inputs["latent_image"], guider.positive, guider.negative, guider.cfg,
            inputs["sampler"].name, list(inputs["sigmas"]), noise.seed, noise.enabled,
        )  # fmt: skip
        return NodeResult(run_sampler(ctx, run))
