"""ComfyUI's schedulers for flow models: the σ list a sampler walks through, by name (`names.SCHEDULERS`),
with KSampler's partial schedules for a denoise below 1."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from zimage_serve.engine.model_sampling import FlowSampling
from zimage_serve.engine.names import DISCARD_PENULTIMATE_SIGMA, SCHEDULERS


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

    from zimage_serve.engine.libraries import importing

    with importing():  # scipy only for the beta scheduler, one importing thread at a time
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


def karras_schedule(sampling: FlowSampling, steps: int, rho: float = 7.0) -> list[float]:
    """Karras et al. (2022): evenly spaced in σ^(1/ρ) from the model's σ_max down to its σ_min."""
    low, high = sampling.sigma_min ** (1 / rho), sampling.sigma_max ** (1 / rho)
    ramp = torch.linspace(0, 1, steps)
    return [float(v) for v in (high + ramp * (low - high)) ** rho] + [0.0]


def exponential_schedule(sampling: FlowSampling, steps: int) -> list[float]:
    """Evenly spaced in log σ from σ_max to σ_min."""
    logs = torch.linspace(math.log(sampling.sigma_max), math.log(sampling.sigma_min), steps)
    return [float(v) for v in logs.exp()] + [0.0]


def linear_quadratic_schedule(sampling: FlowSampling, steps: int, threshold: float = 0.025) -> list[float]:
    """Mochi's: the first half of the steps linear in 1 - σ up to `threshold`, the rest quadratic to 1."""
    if steps == 1:
        times = [1.0, 0.0]
    else:
        linear = steps // 2
        ramp = [i * threshold / linear for i in range(linear)]
        gap = linear - threshold * steps
        rest = steps - linear
        quadratic = gap / (linear * rest**2)
        slope = threshold / linear - 2 * gap / rest**2
        constant = quadratic * linear**2
        curve = [quadratic * i**2 + slope * i + constant for i in range(linear, steps)]
        times = [1.0 - t for t in [*ramp, *curve, 1.0]]
    return [float(torch.tensor(t, dtype=torch.float32)) * sampling.sigma_max for t in times]


def kl_optimal_schedule(sampling: FlowSampling, steps: int) -> list[float]:
    """Evenly spaced in arctan σ (arXiv 2404.04292)."""
    if steps < 2:
        return [sampling.sigma_max, 0.0]
    ramp = torch.arange(steps, dtype=torch.float32) / (steps - 1)
    angles = ramp * math.atan(sampling.sigma_min) + (1 - ramp) * math.atan(sampling.sigma_max)
    return [float(v) for v in angles.tan()] + [0.0]


def schedule(sampling: FlowSampling, scheduler: str, steps: int) -> list[float]:
    """The steps+1 sigmas (last 0) of a named ComfyUI scheduler; `beta` may merge repeated steps."""
    if scheduler in _SIMPLE_FORMS:
        return _SIMPLE_FORMS[scheduler](sampling, steps)
    if scheduler == "simple":
        return simple_schedule(sampling, steps)
    if scheduler == "normal":
        return normal_schedule(sampling, steps)
    if scheduler == "sgm_uniform":
        return normal_schedule(sampling, steps, sgm=True)
    if scheduler == "beta":
        return beta_schedule(sampling, steps)
    raise ValueError(f"unknown scheduler {scheduler!r}; known: {', '.join(SCHEDULERS)}")


_SIMPLE_FORMS: dict[str, Callable[[FlowSampling, int], list[float]]] = {
    "karras": karras_schedule,
    "exponential": exponential_schedule,
    "linear_quadratic": linear_quadratic_schedule,
    "kl_optimal": kl_optimal_schedule,
}


def sampler_schedule(sampling: FlowSampling, scheduler: str, steps: int, sampler: str) -> list[float]:
    """KSampler's schedule for a sampler: dpm_2 and uni_pc get one step more with the penultimate σ
    dropped, as ComfyUI's KSampler gives them (its DISCARD_PENULTIMATE_SIGMA_SAMPLERS)."""
    if sampler not in DISCARD_PENULTIMATE_SIGMA:
        return schedule(sampling, scheduler, steps)
    sigmas = schedule(sampling, scheduler, steps + 1)
    return [*sigmas[:-2], sigmas[-1]]


def denoise_schedule(
    sampling: FlowSampling, scheduler: str, steps: int, denoise: float, sampler: str = "euler"
) -> list[float]:
    """KSampler's partial schedule: the last steps+1 sigmas of a longer one (img2img with denoise < 1)."""
    if denoise >= 0.9999:
        return sampler_schedule(sampling, scheduler, steps, sampler)
    if denoise <= 0.0001:
        return []
    return sampler_schedule(sampling, scheduler, int(steps / denoise), sampler)[-(steps + 1) :]
