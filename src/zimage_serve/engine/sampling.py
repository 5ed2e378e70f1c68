"""Sigma schedules and samplers with ComfyUI's behaviour, for flow-matching models.

Everything here works on a *denoiser*: a function from the noisy latent `x` at noise level σ to its
predicted clean latent x0. For a flow model ``x = (1-σ)·x0 + σ·ε``, so a velocity prediction
``v = ε - x0`` gives ``x0 = x - σ·v``. The samplers are the k-diffusion formulas ComfyUI applies
unchanged to flow models (including their quirks, e.g. DPM-Solver++ in log-σ), so a workflow gives
the trajectory a ComfyUI user expects.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from zimage_serve.engine.names import SAMPLERS, SCHEDULERS
from zimage_serve.errors import GenerationCancelled

Denoiser = Callable[[torch.Tensor, float], torch.Tensor]
StepHook = Callable[[int, int, torch.Tensor], None]  # (step 1-based, total, x after the step)
CancelCheck = Callable[[], bool]

TIMESTEPS = 1000


@dataclass(frozen=True)
class FlowSampling:
    """ComfyUI's ModelSamplingDiscreteFlow: σ(t) = shift·t / (1 + (shift-1)·t) on a 1000-entry table.

    `timestep(σ)` is σ·multiplier, not the inverse of the shift, exactly as ComfyUI has it; the
    `normal` and `sgm_uniform` schedules depend on that.
    """

    shift: float = 3.0
    multiplier: float = 1.0

    def sigma(self, timestep: float) -> float:
        t = timestep / self.multiplier
        if self.shift == 1.0:
            return t
        return self.shift * t / (1 + (self.shift - 1) * t)

    def timestep(self, sigma: float) -> float:
        return sigma * self.multiplier

    def percent_to_sigma(self, percent: float) -> float:
        """ComfyUI's: 0 % of the schedule is σ = 1, 100 % is σ = 0, the shift applied between."""
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return self.sigma((1.0 - percent) * self.multiplier)

    def sigma_range(self, start_percent: float, end_percent: float) -> tuple[float, float]:
        """The (highest, lowest) σ at which a conditioning with this timestep range is used."""
        return self.percent_to_sigma(start_percent), self.percent_to_sigma(end_percent)

    def table(self) -> list[float]:
        return [self.sigma(k / TIMESTEPS * self.multiplier) for k in range(1, TIMESTEPS + 1)]

    @property
    def sigma_min(self) -> float:
        return self.sigma(1 / TIMESTEPS * self.multiplier)

    @property
    def sigma_max(self) -> float:
        return self.sigma(self.multiplier)


def simple_schedule(sampling: FlowSampling, steps: int) -> list[float]:
    table = sampling.table()
    stride = len(table) / steps
    return [table[-(1 + int(i * stride))] for i in range(steps)] + [0.0]


def normal_schedule(sampling: FlowSampling, steps: int, sgm: bool = False) -> list[float]:
    start, end = sampling.timestep(sampling.sigma_max), sampling.timestep(sampling.sigma_min)
    append_zero = True
    if sgm:
        timesteps = torch.linspace(start, end, steps + 1)[:-1]
    else:
        if math.isclose(sampling.sigma(end), 0.0, abs_tol=1e-5):
            steps += 1
            append_zero = False
        timesteps = torch.linspace(start, end, steps)
    sigmas = [sampling.sigma(float(t)) for t in timesteps]
    return [*sigmas, 0.0] if append_zero else sigmas


def beta_schedule(sampling: FlowSampling, steps: int, alpha: float = 0.6, beta: float = 0.6) -> list[float]:
    """Timesteps at the quantiles of Beta(α, β) (arXiv 2407.12173), repeated indices dropped."""
    import numpy as np
    from scipy.stats import beta as beta_distribution

    table = sampling.table()
    last = len(table) - 1
    quantiles = 1 - np.linspace(0, 1, steps, endpoint=False)
    indices = np.rint(beta_distribution.ppf(quantiles, alpha, beta) * last)
    sigmas: list[float] = []
    previous = -1.0
    for index in indices:
        if index != previous:
            sigmas.append(table[int(index)])
        previous = float(index)
    return [*sigmas, 0.0]


def schedule(sampling: FlowSampling, scheduler: str, steps: int) -> list[float]:
    """The steps+1 sigmas (last 0) of a named ComfyUI scheduler; `beta` may merge repeated steps."""
    if scheduler == "simple":
        return simple_schedule(sampling, steps)
    if scheduler == "normal":
        return normal_schedule(sampling, steps)
    if scheduler == "sgm_uniform":
        return normal_schedule(sampling, steps, sgm=True)
    if scheduler == "beta":
        return beta_schedule(sampling, steps)
    raise ValueError(f"unknown scheduler {scheduler!r}; known: {', '.join(SCHEDULERS)}")


def denoise_schedule(sampling: FlowSampling, scheduler: str, steps: int, denoise: float) -> list[float]:
    """KSampler's partial schedule: the last steps+1 sigmas of a longer one (img2img with denoise < 1)."""
    if denoise >= 0.9999:
        return schedule(sampling, scheduler, steps)
    if denoise <= 0.0001:
        return []
    return schedule(sampling, scheduler, int(steps / denoise))[-(steps + 1) :]


def ancestral_noise(x: torch.Tensor, seed: int | None) -> Callable[[], torch.Tensor]:
    """Fresh noise per step from one generator seeded like ComfyUI's on the CPU (seed + 1)."""
    generator = torch.Generator().manual_seed(seed + 1) if seed is not None else None

    def draw() -> torch.Tensor:
        return torch.randn(x.shape, dtype=torch.float32, generator=generator).to(x.device, x.dtype)

    return draw


class Sampler:
    """Runs a named sampler over a sigma list, calling `on_step` after every step."""

    def __init__(
        self,
        name: str,
        seed: int | None = None,
        on_step: StepHook | None = None,
        cancel: CancelCheck | None = None,
    ) -> None:
        if name not in SAMPLERS:
            raise ValueError(f"unknown sampler {name!r}; known: {', '.join(SAMPLERS)}")
        self.name, self.seed, self.on_step, self.cancel = name, seed, on_step, cancel

    def __call__(self, denoiser: Denoiser, x: torch.Tensor, sigmas: list[float]) -> torch.Tensor:
        step: Callable[..., torch.Tensor] = getattr(self, "_" + self.name)
        total = len(sigmas) - 1
        state: dict[str, object] = {}
        noise = ancestral_noise(x, self.seed)
        for i in range(total):
            if self.cancel is not None and self.cancel():
                raise GenerationCancelled(f"interrupted before step {i + 1} of {total}")
            denoised = denoiser(x, sigmas[i])
            x = step(x, denoised, sigmas, i, state, noise)
            if self.on_step is not None:
                self.on_step(i + 1, total, x)
        return x

    @staticmethod
    def _euler(
        x: torch.Tensor, denoised: torch.Tensor, sigmas: list[float], i: int, state: dict[str, object], noise: object
    ) -> torch.Tensor:
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        derivative = (x - denoised) / sigma
        return x + derivative * (sigma_next - sigma)

    @staticmethod
    def _euler_ancestral(
        x: torch.Tensor,
        denoised: torch.Tensor,
        sigmas: list[float],
        i: int,
        state: dict[str, object],
        noise: Callable[[], torch.Tensor],
        eta: float = 1.0,
    ) -> torch.Tensor:
        # The rectified-flow form ComfyUI uses for CONST models: step down past σ_next, then re-noise
        # back up to it while rescaling the signal.
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if sigma_next == 0:
            return denoised
        sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
        alpha_next, alpha_down = 1 - sigma_next, 1 - sigma_down
        renoise = math.sqrt(max(0.0, sigma_next**2 - sigma_down**2 * alpha_next**2 / alpha_down**2))
        ratio = sigma_down / sigma
        x = ratio * x + (1 - ratio) * denoised
        return (alpha_next / alpha_down) * x + noise() * renoise

    @staticmethod
    def _dpmpp_2m(
        x: torch.Tensor, denoised: torch.Tensor, sigmas: list[float], i: int, state: dict[str, object], noise: object
    ) -> torch.Tensor:
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        previous = state.get("denoised")
        state["denoised"] = denoised
        if sigma_next == 0:
            return denoised
        h = math.log(sigma) - math.log(sigma_next)  # t = -log σ, h = t_next - t
        decay = sigma_next / sigma
        if previous is None:
            return decay * x - math.expm1(-h) * denoised
        assert isinstance(previous, torch.Tensor)
        r = (math.log(sigmas[i - 1]) - math.log(sigma)) / h
        corrected = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * previous
        return decay * x - math.expm1(-h) * corrected

    @staticmethod
    def _res_multistep(
        x: torch.Tensor, denoised: torch.Tensor, sigmas: list[float], i: int, state: dict[str, object], noise: object
    ) -> torch.Tensor:
        # Second-order multistep exponential integrator (arXiv 2308.02157); Euler on the first step and
        # on the step to σ = 0. One model call per step.
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        previous = state.get("denoised")
        state["denoised"] = denoised
        if sigma_next == 0 or previous is None:
            return x + (x - denoised) / sigma * (sigma_next - sigma)
        assert isinstance(previous, torch.Tensor)
        t, t_next, t_prev = -math.log(sigma), -math.log(sigma_next), -math.log(sigmas[i - 1])
        h = t_next - t
        c2 = (t_prev - t) / h
        phi1 = math.expm1(-h) / -h
        phi2 = (phi1 - 1.0) / -h
        b1, b2 = phi1 - phi2 / c2, phi2 / c2
        return math.exp(-h) * x + h * (b1 * denoised + b2 * previous)
