"""Sigma schedules and sampler steps against values worked out by hand from ComfyUI's formulas."""

from __future__ import annotations

import math

import pytest
import torch

from zimage_serve.engine.model_sampling import FlowSampling
from zimage_serve.engine.sampling import BrownianNoise, Sampler, deis_coefficients
from zimage_serve.engine.schedulers import denoise_schedule, sampler_schedule, schedule
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
        schedule(TURBO, "ddim_uniform", 8)


SIGMA_MIN = 0.003 / 1.002  # σ(1/1000) with shift 3


def test_karras_and_exponential_span_the_models_sigmas() -> None:
    rho = 7
    ramp = [k / 3 for k in range(4)]
    karras = [(1 + r * (SIGMA_MIN ** (1 / rho) - 1)) ** rho for r in ramp] + [0.0]
    assert schedule(TURBO, "karras", 4) == pytest.approx(karras, rel=1e-5)
    exponential = [math.exp(r * math.log(SIGMA_MIN)) for r in ramp] + [0.0]
    assert schedule(TURBO, "exponential", 4) == pytest.approx(exponential, rel=1e-5)


def test_linear_quadratic_and_kl_optimal() -> None:
    # 4 steps: 2 linear (0, 0.0125 in 1 - σ), then quadratic through 0.025 at step 2 to 1 at step 4.
    gap = 2 - 0.025 * 4
    a, b = gap / (2 * 2**2), 0.025 / 2 - 2 * gap / 2**2
    c = a * 4
    times = [0.0, 0.0125, a * 4 + b * 2 + c, a * 9 + b * 3 + c, 1.0]
    assert schedule(TURBO, "linear_quadratic", 4) == pytest.approx([1 - t for t in times], abs=1e-6)
    assert times[2] == pytest.approx(0.025)
    kl = [math.tan(k / 3 * math.atan(SIGMA_MIN) + (1 - k / 3) * math.atan(1.0)) for k in range(4)] + [0.0]
    assert schedule(TURBO, "kl_optimal", 4) == pytest.approx(kl, rel=1e-5)


def test_dpm_2_and_uni_pc_get_a_step_more_without_the_penultimate_sigma() -> None:
    five = schedule(TURBO, "simple", 5)
    assert sampler_schedule(TURBO, "simple", 4, "dpm_2") == [*five[:-2], 0.0]
    assert sampler_schedule(TURBO, "simple", 4, "uni_pc") == [*five[:-2], 0.0]
    assert sampler_schedule(TURBO, "simple", 4, "heun") == schedule(TURBO, "simple", 4)


def test_heun_averages_the_two_slopes() -> None:
    # d = (1 - 0.2)/1 = 0.8; Euler lands at 1 - 0.4 = 0.6, where the slope is (0.6 - 0.4)/0.5 = 0.4;
    # x = 1 + (0.8 + 0.4)/2 · (0.5 - 1) = 0.7.
    calls = Constant(0.2, 0.4)
    assert float(Sampler("heun")(calls, torch.ones(1), [1.0, 0.5])[0]) == pytest.approx(0.7)
    assert calls.sigmas == [1.0, 0.5]
    assert float(Sampler("heun")(Constant(0.2), torch.ones(1), [1.0, 0.0])[0]) == pytest.approx(0.2)


def test_dpm_2_uses_the_slope_at_the_geometric_midpoint() -> None:
    # σ 1 → 0.25: midpoint √(1·0.25) = 0.5; half step 1 + 0.8·(0.5 - 1) = 0.6; slope there 0.4;
    # x = 1 + 0.4·(0.25 - 1) = 0.7.
    calls = Constant(0.2, 0.4)
    assert float(Sampler("dpm_2")(calls, torch.ones(1), [1.0, 0.25])[0]) == pytest.approx(0.7)
    assert calls.sigmas == pytest.approx([1.0, 0.5])


def test_lcm_renoises_the_prediction_the_flows_way() -> None:
    noise = torch.randn((1, 3), generator=torch.Generator().manual_seed(8))  # seed 7 + 1, on the CPU
    x = Sampler("lcm", seed=7)(Constant(0.3, 0.6), torch.ones(1, 3), [1.0, 0.5, 0.0])
    assert torch.allclose(x, torch.full((1, 3), 0.6))  # the last step is the prediction
    one = Sampler("lcm", seed=7)(Constant(0.3), torch.ones(1, 3), [1.0, 0.5])
    assert torch.allclose(one, 0.5 * noise + 0.5 * 0.3)


def test_ddim_is_euler() -> None:
    x = torch.randn(1, 4)
    assert torch.equal(
        Sampler("ddim")(Constant(0.1, 0.2, 0.3), x, SIGMAS), Sampler("euler")(Constant(0.1, 0.2, 0.3), x, SIGMAS)
    )


def brownian(seed: int, low: float, high: float, a: float, b: float, shape: tuple[int, ...]) -> torch.Tensor:
    import torchsde

    tree = torchsde.BrownianTree(low, torch.zeros(shape), high, entropy=seed)
    return tree(a, b) / math.sqrt(b - a)


def test_brownian_noise_is_the_normalised_increment_and_reversible() -> None:
    noise = BrownianNoise(torch.zeros(2, 3), [0.9, 0.6, 0.3, 0.0], seed=5)
    expected = brownian(5, 0.3, 0.9, 0.6, 0.9, (2, 3))
    assert torch.allclose(noise(0.9, 0.6), -expected)  # downwards in σ: the sign turns
    assert torch.allclose(noise(0.6, 0.9), expected)


def test_dpmpp_2m_sde_first_step_by_hand() -> None:
    # λ = log((1-σ)/σ): from 0.8 to 0.5, h = 0 - log(0.25) = log 4; with η = 1:
    # x = (0.5/0.8)·e^{-h}·x + (1 - 0.5)(1 - e^{-2h})·D + noise·0.5·√(1 - e^{-2h}).
    h = math.log(4)
    noise = -brownian(3, 0.5, 0.8, 0.5, 0.8, (1, 2))
    expected = (
        0.625 * math.exp(-h) * 1.0 + 0.5 * (1 - math.exp(-2 * h)) * 0.3 + noise * 0.5 * math.sqrt(1 - math.exp(-2 * h))
    )
    x = Sampler("dpmpp_2m_sde", seed=3)(Constant(0.3), torch.ones(1, 2), [0.8, 0.5])
    assert torch.allclose(x, expected, atol=1e-6)


def test_dpmpp_sde_first_step_by_hand() -> None:
    # σ 0.8 → 0.5 in λ: λ_s = log(0.25), λ_t = 0, h = log 4, midpoint λ = λ_s + h/2 = log(0.5), σ_mid = 2/3.
    # Each half: an ancestral split of e^{-λ} (σ/(1-σ)), then the exponential step from λ_s with the
    # down-stepped λ, and noise scaled by α = 1 - σ times the split's σ_up.
    def split(a: float, b: float) -> tuple[float, float]:
        up = min(b, math.sqrt(b * b * (a * a - b * b) / (a * a)))
        return math.sqrt(b * b - up * up), up

    lam_s, lam_mid, lam_t = math.log(0.25), math.log(0.5), 0.0
    sigma_mid = 1 / (1 + math.exp(lam_mid))
    a_s, a_mid, a_t = 0.2, 1 - sigma_mid, 0.5
    down, up = split(math.exp(-lam_s), math.exp(-lam_mid))
    h1 = -math.log(down) - lam_s
    first_noise = -brownian(9, 0.5, 0.8, sigma_mid, 0.8, (1, 1))
    x_mid = (a_mid / a_s) * math.exp(-h1) * 1.0 - a_mid * math.expm1(-h1) * 0.3 + a_mid * first_noise * up
    down, up = split(math.exp(-lam_s), math.exp(-lam_t))
    h2 = -math.log(down) - lam_s
    blend = 0.0 * 0.3 + 1.0 * 0.7  # r = 1/2: (1 - 1/2r)·D + (1/2r)·D_mid
    second_noise = -brownian(9, 0.5, 0.8, 0.5, 0.8, (1, 1))
    expected = (a_t / a_s) * math.exp(-h2) * 1.0 - a_t * math.expm1(-h2) * blend + a_t * second_noise * up
    calls = Constant(0.3, 0.7)
    x = Sampler("dpmpp_sde", seed=9)(calls, torch.ones(1, 1), [0.8, 0.5])
    assert calls.sigmas == pytest.approx([0.8, sigma_mid])
    assert torch.allclose(x, expected, atol=1e-6)
    assert x_mid is not None


def test_the_sde_samplers_start_below_sigma_one() -> None:
    calls = Constant(0.3, 0.3)
    Sampler("dpmpp_2m_sde", seed=1)(calls, torch.ones(1), [1.0, 0.5, 0.0])
    assert calls.sigmas[0] == pytest.approx(TURBO.percent_to_sigma(1e-4)) and calls.sigmas[0] < 1


def test_deis_coefficients_integrate_to_the_step_and_follow_a_straight_path() -> None:
    sigmas = [1.0, 0.75, 0.5, 0.25, 0.0]
    table = deis_coefficients(sigmas, 3)
    assert table[0] == []
    for i in (1, 2):
        assert sum(table[i]) == pytest.approx(sigmas[i + 1] - sigmas[i], rel=2e-3)  # the basis sums to one
    # A fixed prediction 0.25 from x = 1 at σ = 1: the exact path 0.25 + 0.75σ has a constant slope.
    x = Sampler("deis")(Constant(0.25, 0.25, 0.25, 0.25), torch.ones(1), sigmas[:4])
    assert float(x[0]) == pytest.approx(0.25 + 0.75 * 0.25, abs=2e-3)


def test_uni_pc_is_exact_for_a_fixed_prediction_and_calls_once_per_step() -> None:
    # Data-prediction exponential integrators solve dx/dσ = (x - D)/σ exactly for a constant D; the last σ
    # (0) is run as 0.001 as ComfyUI does, so the end is D + (1 - D)·0.001.
    calls = Constant(*([0.25] * 6))
    x = Sampler("uni_pc")(calls, torch.ones(1), [1.0, 0.8, 0.6, 0.4, 0.2, 0.0])
    assert float(x[0]) == pytest.approx(0.25 + 0.75 * 0.001, abs=1e-6)
    assert len(calls.sigmas) == 5  # one model call per step: the corrector's call is the next step's


def test_uni_pc_two_steps_by_hand() -> None:
    # σ [1, 0.5, 0]: order 1. In VP coordinates (α = 1/√(1+σ²), std = σα, λ = -log σ), x starts at 1·α(1).
    # Step 1: the first-order predictor, then the corrector with ρ = 1/2 and B(h) = -h on D_t - D_0.
    # Step 2 (to 0.001, no corrector): first order from D = 0.6; the result is scaled back by 1/α(0.001).
    def alpha(s: float) -> float:
        return 1 / math.sqrt(1 + s * s)

    def std(s: float) -> float:
        return s * alpha(s)

    x = alpha(1.0)
    h = math.log(2)
    base = std(0.5) / std(1.0) * x - alpha(0.5) * math.expm1(-h) * 0.2
    x = base + alpha(0.5) * h * 0.5 * (0.6 - 0.2)
    h = math.log(0.5 / 0.001)
    x = std(0.001) / std(0.5) * x - alpha(0.001) * math.expm1(-h) * 0.6
    calls = Constant(0.2, 0.6)
    out = Sampler("uni_pc")(calls, torch.ones(1), [1.0, 0.5, 0.0])
    assert float(out[0]) == pytest.approx(x / alpha(0.001), rel=1e-6)
    assert calls.sigmas == pytest.approx([1.0, 0.5])
