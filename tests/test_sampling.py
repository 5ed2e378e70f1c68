"""Sigma schedules and sampler steps against values worked out by hand from ComfyUI's formulas."""

from __future__ import annotations

import math

import pytest
import torch

from zimage_serve.engine.sampling import FlowSampling, Sampler, denoise_schedule, schedule
from zimage_serve.errors import GenerationCancelled

TURBO = FlowSampling(shift=3.0)


def shifted(t: float, shift: float = 3.0) -> float:
    return shift * t / (1 + (shift - 1) * t)


def test_simple_matches_the_reference_list() -> None:
    # zimage-model.md §2: ComfyUI's "simple" with 8 steps and shift 3.
    expected = [1.0, 0.9545, 0.9, 0.8333, 0.75, 0.6429, 0.5, 0.3, 0.0]
    assert schedule(TURBO, "simple", 8) == pytest.approx(expected, abs=1e-4)


def test_normal_is_evenly_spaced_in_timestep_then_shifted() -> None:
    # timestep(σ) is σ itself for ModelSamplingDiscreteFlow (multiplier 1), so "normal" spaces the
    # *shifted* σ_max = 1 and σ_min = σ(0.001) evenly, then shifts each point again.
    sigma_min = 0.003 / 1.002
    points = [1 - k * (1 - sigma_min) / 7 for k in range(8)]
    expected = [shifted(t) for t in points] + [0.0]
    assert schedule(TURBO, "normal", 8) == pytest.approx(expected, abs=1e-6)
    assert schedule(TURBO, "normal", 8)[1] == pytest.approx(0.94754, abs=1e-5)


def test_sgm_uniform_drops_the_last_of_steps_plus_one_points() -> None:
    sigma_min = 0.003 / 1.002
    points = [1 - k * (1 - sigma_min) / 8 for k in range(8)]
    assert schedule(TURBO, "sgm_uniform", 8) == pytest.approx([shifted(t) for t in points] + [0.0], abs=1e-6)


def test_beta_uses_beta_quantiles_of_the_timestep_table() -> None:
    from scipy.stats import beta

    indices = [round(float(beta.ppf(1 - k / 8, 0.6, 0.6)) * 999) for k in range(8)]
    expected = [shifted((i + 1) / 1000) for i in indices] + [0.0]
    assert schedule(TURBO, "beta", 8) == pytest.approx(expected, abs=1e-6)
    assert schedule(TURBO, "beta", 8)[0] == 1.0


def test_shift_one_is_linear_and_denoise_takes_the_tail() -> None:
    assert schedule(FlowSampling(shift=1.0), "simple", 4) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    # denoise 0.5 over 4 steps: the last 5 sigmas of an 8-step schedule.
    assert denoise_schedule(TURBO, "simple", 4, 0.5) == pytest.approx([0.75, 0.6429, 0.5, 0.3, 0.0], abs=1e-4)
    assert denoise_schedule(TURBO, "simple", 4, 0.0) == []


class Constant:
    """A denoiser that predicts a fixed x0 per call, in order, and records the sigmas it was asked at."""

    def __init__(self, *values: float) -> None:
        self.values, self.sigmas = list(values), []

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        self.sigmas.append(sigma)
        return torch.full_like(x, self.values[len(self.sigmas) - 1])


SIGMAS = [1.0, 0.8, 0.5, 0.0]


def test_euler_follows_the_straight_flow_path() -> None:
    # With x0 fixed at 0.25 and x = 1 at σ = 1 (so ε = 1), the exact path is x(σ) = 0.25 + 0.75σ.
    x = Sampler("euler")(Constant(0.25, 0.25, 0.25), torch.ones(1, 2, 2), [*SIGMAS[:2], 0.0])
    assert float(x[0, 0, 0]) == pytest.approx(0.25)
    one = Sampler("euler")(Constant(0.25), torch.ones(1), [1.0, 0.8])
    assert float(one[0]) == pytest.approx(0.25 + 0.75 * 0.8)


def test_dpmpp_2m_second_step_uses_the_previous_prediction() -> None:
    denoiser = Constant(0.2, 0.4, 0.4)
    x = Sampler("dpmpp_2m")(denoiser, torch.ones(1), SIGMAS)
    # step 1: x = (0.8/1)·1 + (1 - 0.8)·0.2 = 0.84
    # step 2: h = ln(0.8/0.5), h_last = ln(1/0.8), r = h_last/h;
    #         D = (1 + 1/2r)·0.4 - (1/2r)·0.2;  x = (0.5/0.8)·0.84 + (1 - 0.5/0.8)·D
    h, h_last = math.log(0.8 / 0.5), math.log(1 / 0.8)
    r = h_last / h
    corrected = (1 + 1 / (2 * r)) * 0.4 - (1 / (2 * r)) * 0.2
    after_two = 0.625 * 0.84 + 0.375 * corrected
    # step 3 goes to σ = 0: the prediction itself.
    assert float(x[0]) == pytest.approx(0.4)
    two = Sampler("dpmpp_2m")(Constant(0.2, 0.4), torch.ones(1), SIGMAS[:3])
    assert float(two[0]) == pytest.approx(after_two, abs=1e-6)
    assert denoiser.sigmas == SIGMAS[:3]


def test_res_multistep_second_step() -> None:
    # Step 1 is Euler: x = 1 + (1 - 0.2)/1 · (0.8 - 1) = 0.84.
    # Step 2: h = ln(0.8/0.5); c2 = (t_prev - t)/h with t = -ln σ; φ1(-h) = (e^-h - 1)/(-h),
    # φ2(-h) = (φ1 - 1)/(-h); x = e^-h·x + h·((φ1 - φ2/c2)·D + (φ2/c2)·D_old).
    h = math.log(0.8 / 0.5)
    c2 = (-math.log(1.0) + math.log(0.8)) / h
    phi1 = (math.exp(-h) - 1) / -h
    phi2 = (phi1 - 1) / -h
    expected = math.exp(-h) * 0.84 + h * ((phi1 - phi2 / c2) * 0.4 + (phi2 / c2) * 0.2)
    x = Sampler("res_multistep")(Constant(0.2, 0.4), torch.ones(1), SIGMAS[:3])
    assert float(x[0]) == pytest.approx(expected, abs=1e-6)
    # With an unchanged prediction the two weights add up to φ1, and the step is the exponential
    # integrator e^-h·x + (1 - e^-h)·D.
    same = Sampler("res_multistep")(Constant(0.4, 0.4), torch.ones(1), SIGMAS[:3])
    assert float(same[0]) == pytest.approx(math.exp(-h) * (1 + (0.4 - 1) * 0.2) + (1 - math.exp(-h)) * 0.4)


def test_euler_ancestral_renoises_with_comfyuis_cpu_seed() -> None:
    # Rectified-flow ancestral step from σ 1 → 0.8 with eta 1: σ_down = 0.8·0.8 = 0.64;
    # x' = (0.64/1)·x + 0.36·D, rescaled by α_next/α_down = 0.2/0.36 and re-noised by
    # sqrt(0.8² - 0.64²·0.2²/0.36²); the noise is torch.randn from a generator seeded seed + 1.
    seed = 1234
    noise = torch.randn((1, 4), generator=torch.Generator().manual_seed(seed + 1))
    renoise = math.sqrt(0.8**2 - 0.64**2 * 0.2**2 / 0.36**2)
    expected = (0.2 / 0.36) * (0.64 * 1.0 + 0.36 * 0.25) + noise * renoise
    x = Sampler("euler_ancestral", seed=seed)(Constant(0.25), torch.ones(1, 4), [1.0, 0.8])
    assert torch.allclose(x, expected, atol=1e-6)


def test_steps_report_progress_and_stop_when_cancelled() -> None:
    seen: list[tuple[int, int]] = []
    Sampler("euler", on_step=lambda i, n, _x: seen.append((i, n)))(Constant(0, 0, 0), torch.ones(1), SIGMAS)
    assert seen == [(1, 3), (2, 3), (3, 3)]
    calls = Constant(0, 0, 0)
    with pytest.raises(GenerationCancelled, match="before step 2 of 3"):
        Sampler("euler", on_step=lambda *_: None, cancel=lambda: len(calls.sigmas) >= 1)(calls, torch.ones(1), SIGMAS)
    assert len(calls.sigmas) == 1


def test_unknown_names_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown sampler"):
        Sampler("lms")
    with pytest.raises(ValueError, match="unknown scheduler"):
        schedule(TURBO, "karras", 8)
