"""ComfyUI's samplers for flow-matching models, stepping along a σ list (`engine/schedulers.py`).

Everything here works on a *denoiser*: a function from the noisy latent `x` at noise level σ to its
predicted clean latent x0 (`engine/model_sampling.py`). The samplers are the k-diffusion formulas ComfyUI
applies unchanged to flow models (including their quirks, e.g. DPM-Solver++ in log-σ), so a workflow gives
the trajectory a ComfyUI user expects.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from zimage_serve.engine.model_sampling import FlowSampling, half_log_snr, sigma_of_half_log_snr
from zimage_serve.engine.names import SAMPLERS
from zimage_serve.errors import GenerationCancelled

Denoiser = Callable[[torch.Tensor, float], torch.Tensor]
StepHook = Callable[[int, int, torch.Tensor], None]  # (step 1-based, total, x after the step)
CancelCheck = Callable[[], bool]


def ancestral_noise(x: torch.Tensor, seed: int | None) -> Callable[[], torch.Tensor]:
    """Fresh noise per step from one generator seeded like ComfyUI's on the CPU (seed + 1)."""
    generator = torch.Generator().manual_seed(seed + 1) if seed is not None else None

    def draw() -> torch.Tensor:
        return torch.randn(x.shape, dtype=torch.float32, generator=generator).to(x.device, x.dtype)

    return draw


class BrownianNoise:
    """The SDE samplers' noise: increments of one Brownian motion over σ (torchsde's BrownianTree on the
    CPU, seeded by the noise seed), normalised per interval, so the noise between two σ does not depend
    on how the schedule was cut into steps."""

    def __init__(self, x: torch.Tensor, sigmas: list[float], seed: int | None) -> None:
        from zimage_serve.engine.libraries import importing

        with importing():  # torchsde only for the SDE samplers, one importing thread at a time
            import torchsde

        positive = [s for s in sigmas if s > 0]
        entropy = seed if seed is not None else int(torch.randint(0, 2**63 - 1, ()).item())
        # Times as Python floats throughout: float32 tensors put a query at σ_max a hair past the tree's end.
        self.tree = torchsde.BrownianTree(min(positive), torch.zeros(x.shape), max(sigmas), entropy=entropy)
        self.device, self.dtype = x.device, x.dtype

    def __call__(self, sigma: float, sigma_next: float) -> torch.Tensor:
        a, b = sorted((sigma, sigma_next))
        sign = 1.0 if sigma < sigma_next else -1.0
        increment: torch.Tensor = self.tree(a, b) * sign
        return (increment / math.sqrt(abs(b - a))).to(self.device, self.dtype)


def offset_first_sigma(sigmas: list[float], sampling: FlowSampling | None) -> list[float]:
    """σ = 1 has no finite λ: ComfyUI starts the λ-space samplers at 0.01 % into the schedule instead."""
    if len(sigmas) > 1 and sigmas[0] >= 1.0:
        first = (sampling or FlowSampling()).percent_to_sigma(1e-4)
        return [first, *sigmas[1:]]
    return sigmas


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """k-diffusion's split of a step into the σ to step down to and the noise to add back."""
    if not eta:
        return sigma_to, 0.0
    up = min(sigma_to, eta * math.sqrt(max(0.0, sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2)))
    return math.sqrt(max(0.0, sigma_to**2 - up**2)), up


class _Steps:
    """Progress and interrupts around each step of a sampler's own loop."""

    def __init__(self, total: int, on_step: StepHook | None, cancel: CancelCheck | None) -> None:
        self.total, self.on_step, self.cancel = total, on_step, cancel

    def begin(self, i: int) -> None:
        if self.cancel is not None and self.cancel():
            raise GenerationCancelled(f"interrupted before step {i + 1} of {self.total}")

    def end(self, i: int, x: torch.Tensor) -> None:
        if self.on_step is not None:
            self.on_step(i + 1, self.total, x)


class Sampler:
    """Runs a named sampler over a sigma list, calling `on_step` after every step.

    Each sampler follows the k-diffusion formula ComfyUI runs for a flow model, its quirks included:
    euler_ancestral and lcm re-noise in the flow's own way, the SDE samplers step in λ = log((1-σ)/σ)
    with Brownian-tree noise, dpm_2 and uni_pc are given one step more and drop the penultimate σ by the
    scheduler (see `samplers_schedule`), uni_pc works in the VP coordinates ComfyUI converts to.
    """

    def __init__(
        self,
        name: str,
        seed: int | None = None,
        on_step: StepHook | None = None,
        cancel: CancelCheck | None = None,
        sampling: FlowSampling | None = None,
    ) -> None:
        if name not in SAMPLERS:
            raise ValueError(f"unknown sampler {name!r}; known: {', '.join(SAMPLERS)}")
        self.name, self.seed, self.on_step, self.cancel, self.sampling = name, seed, on_step, cancel, sampling

    def __call__(self, denoiser: Denoiser, x: torch.Tensor, sigmas: list[float]) -> torch.Tensor:
        steps = _Steps(len(sigmas) - 1, self.on_step, self.cancel)
        run: Callable[[Denoiser, torch.Tensor, list[float], _Steps], torch.Tensor] = getattr(self, "_" + self.name)
        return run(denoiser, x, sigmas, steps)

    # -- one model call per step -------------------------------------------------------------------

    def _single(
        self, step: Callable[..., torch.Tensor], denoiser: Denoiser, x: torch.Tensor, sigmas: list[float], steps: _Steps
    ) -> torch.Tensor:
        state: dict[str, object] = {}
        noise = ancestral_noise(x, self.seed)
        for i in range(len(sigmas) - 1):
            steps.begin(i)
            x = step(x, denoiser(x, sigmas[i]), sigmas, i, state, noise)
            steps.end(i, x)
        return x

    def _euler(self, denoiser: Denoiser, x: torch.Tensor, sigmas: list[float], steps: _Steps) -> torch.Tensor:
        return self._single(_euler_step, denoiser, x, sigmas, steps)

    # DDIM is ComfyUI's Euler; it differs only in how a noise mask re-noises the kept region (parts.sample).
    _ddim = _euler

    def _euler_ancestral(self, denoiser: Denoiser, x: torch.Tensor, sigmas: list[float], steps: _Steps) -> torch.Tensor:
        return self._single(_euler_ancestral_step, denoiser, x, sigmas, steps)

    def _dpmpp_2m(self, denoiser: Denoiser, x: torch.Tensor, sigmas: list[float], steps: _Steps) -> torch.Tensor:
        return self._single(_dpmpp_2m_step, denoiser, x, sigmas, steps)

    def _res_multistep(self, denoiser: Denoiser, x: torch.Tensor, sigmas: list[float], steps: _Steps) -> torch.Tensor:
        return self._single(_res_multistep_step, denoiser, x, sigmas, steps)

    def _lcm(self, denoiser: Denoiser, x: torch.Tensor, sigmas: list[float], steps: _Steps) -> torch.Tensor:
        # Jump to the prediction, then noise it afresh to the next σ as the flow does (σ·ε + (1-σ)·x0).
        noise = ancestral_noise(x, self.seed)
        for i in range(len(sigmas) - 1):
            steps.begin(i)
            x = denoiser(x, sigmas[i])
            if sigmas[i + 1] > 0:
                x = sigmas[i + 1] * noise() + (1.0 - sigmas[i + 1]) * x
            steps.end(i, x)
        return x

    # -- two model calls per step ------------------------------------------------------------------

    def _heun(self, denoiser: Denoiser, x: torch.Tensor, sigmas: list[float], steps: _Steps) -> torch.Tensor:
        for i in range(len(sigmas) - 1):
            steps.begin(i)
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            derivative = (x - denoiser(x, sigma)) / sigma
            dt = sigma_next - sigma
            if sigma_next == 0:
                x = x + derivative * dt
            else:  # the trapezoid: the slope here averaged with the slope where Euler lands
                guess = x + derivative * dt
                slope = (guess - denoiser(guess, sigma_next)) / sigma_next
                x = x + (derivative + slope) / 2 * dt
            steps.end(i, x)
        return x

    def _dpm_2(self, denoiser: Denoiser, x: torch.Tensor, sigmas: list[float], steps: _Steps) -> torch.Tensor:
        for i in range(len(sigmas) - 1):
            steps.begin(i)
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            derivative = (x - denoiser(x, sigma)) / sigma
            if sigma_next == 0:
                x = x + derivative * (sigma_next - sigma)
            else:  # the slope at the geometric midpoint carries the whole step
                middle = math.exp((math.log(sigma) + math.log(sigma_next)) / 2)
                half = x + derivative * (middle - sigma)
                x = x + (half - denoiser(half, middle)) / middle * (sigma_next - sigma)
            steps.end(i, x)
        return x

    def _dpmpp_sde(self, denoiser: Denoiser, x: torch.Tensor, sigmas: list[float], steps: _Steps) -> torch.Tensor:
        """DPM-Solver++ (stochastic, r = 1/2, η = 1) in λ, with Brownian-tree noise."""
        if len(sigmas) <= 1:
            return x
        noise = BrownianNoise(x, sigmas, self.seed)
        sigmas = offset_first_sigma(sigmas, self.sampling)
        r, eta = 0.5, 1.0
        for i in range(len(sigmas) - 1):
            steps.begin(i)
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            denoised = denoiser(x, sigma)
            if sigma_next == 0:
                x = denoised
            else:
                lam_s, lam_t = half_log_snr(sigma), half_log_snr(sigma_next)
                h = lam_t - lam_s
                lam_mid = lam_s + r * h
                sigma_mid = sigma_of_half_log_snr(lam_mid)
                alpha_s, alpha_mid, alpha_t = 1.0 - sigma, 1.0 - sigma_mid, 1.0 - sigma_next
                down, up = ancestral_step(math.exp(-lam_s), math.exp(-lam_mid), eta)
                h_ = -math.log(down) - lam_s
                x_mid = (alpha_mid / alpha_s) * math.exp(-h_) * x - alpha_mid * math.expm1(-h_) * denoised
                x_mid = x_mid + alpha_mid * noise(sigma, sigma_mid) * up
                denoised_mid = denoiser(x_mid, sigma_mid)
                down, up = ancestral_step(math.exp(-lam_s), math.exp(-lam_t), eta)
                h_ = -math.log(down) - lam_s
                blended = (1 - 1 / (2 * r)) * denoised + (1 / (2 * r)) * denoised_mid
                x = (alpha_t / alpha_s) * math.exp(-h_) * x - alpha_t * math.expm1(-h_) * blended
                x = x + alpha_t * noise(sigma, sigma_next) * up
            steps.end(i, x)
        return x

    def _dpmpp_2m_sde(self, denoiser: Denoiser, x: torch.Tensor, sigmas: list[float], steps: _Steps) -> torch.Tensor:
        """DPM-Solver++(2M) SDE, midpoint form, η = 1, in λ with Brownian-tree noise."""
        if len(sigmas) <= 1:
            return x
        noise = BrownianNoise(x, sigmas, self.seed)
        sigmas = offset_first_sigma(sigmas, self.sampling)
        eta = 1.0
        previous: torch.Tensor | None = None
        h_last: float | None = None
        for i in range(len(sigmas) - 1):
            steps.begin(i)
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            denoised = denoiser(x, sigma)
            h: float | None = None
            if sigma_next == 0:
                x = denoised
            else:
                h = half_log_snr(sigma_next) - half_log_snr(sigma)
                h_eta = h * (eta + 1)
                alpha_t = 1.0 - sigma_next
                x = sigma_next / sigma * math.exp(-h * eta) * x - alpha_t * math.expm1(-h_eta) * denoised
                if previous is not None and h_last is not None:
                    x = x - 0.5 * alpha_t * math.expm1(-h_eta) * (h / h_last) * (denoised - previous)
                x = x + noise(sigma, sigma_next) * sigma_next * math.sqrt(-math.expm1(-2 * h * eta))
            previous, h_last = denoised, h
            steps.end(i, x)
        return x

    # -- multistep with stored coefficients ----------------------------------------------------------

    def _deis(self, denoiser: Denoiser, x: torch.Tensor, sigmas: list[float], steps: _Steps) -> torch.Tensor:
        """DEIS (tAB, order 3): Adams–Bashforth on the ODE's slope over the VP time the σ map to."""
        order_max = 3
        coefficients = deis_coefficients(sigmas, order_max)
        slopes: list[torch.Tensor] = []
        for i in range(len(sigmas) - 1):
            steps.begin(i)
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            slope = (x - denoiser(x, sigma)) / sigma
            order = 1 if sigma_next <= 0 else min(order_max, i + 1)
            if order == 1:
                x = x + (sigma_next - sigma) * slope
            else:
                current, *earlier = coefficients[i]
                x = x + current * slope + sum(c * s for c, s in zip(earlier, reversed(slopes), strict=False))
            slopes = [*slopes, slope][-(order_max - 1) :]
            steps.end(i, x)
        return x

    def _uni_pc(self, denoiser: Denoiser, x: torch.Tensor, sigmas: list[float], steps: _Steps) -> torch.Tensor:
        return UniPC(denoiser, steps).sample(x, sigmas)


def _euler_step(
    x: torch.Tensor, denoised: torch.Tensor, sigmas: list[float], i: int, state: dict[str, object], noise: object
) -> torch.Tensor:
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    derivative = (x - denoised) / sigma
    return x + derivative * (sigma_next - sigma)


def _euler_ancestral_step(
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


def _dpmpp_2m_step(
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


def _res_multistep_step(
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


# -- DEIS ---------------------------------------------------------------------------------------------

_VP_EPS, _EDM_SIGMA_MIN, _EDM_SIGMA_MAX = 1e-3, 0.002, 80.0


def deis_coefficients(sigmas: list[float], max_order: int, points: int = 10000) -> list[list[float]]:
    """DEIS's tAB coefficients (arXiv 2204.13902; the zju-pi/diff-sampler tables ComfyUI uses): σ are mapped
    to the time of the VP SDE that EDM's σ ∈ [0.002, 80] spans, and each coefficient integrates a Lagrange
    basis polynomial over the previous times, weighted by dσ/dt, with a Riemann sum of `points` terms."""
    beta_d = 2 * (math.log(_EDM_SIGMA_MIN**2 + 1) / _VP_EPS - math.log(_EDM_SIGMA_MAX**2 + 1)) / (_VP_EPS - 1)
    beta_min = math.log(_EDM_SIGMA_MAX**2 + 1) - 0.5 * beta_d
    beta_0, beta_1 = beta_min, beta_d + beta_min
    sigma_tensor = torch.tensor(sigmas, dtype=torch.float32)
    times = ((beta_min**2 + 2 * beta_d * torch.log(sigma_tensor**2 + 1)).sqrt() - beta_min) / beta_d
    table: list[list[float]] = []
    for i in range(len(sigmas) - 1):
        order = min(i + 1, max_order)
        if order == 1:
            table.append([])
            continue
        start, stop = times[i], times[i + 1]
        taus = torch.linspace(float(start), float(stop), points)
        dtau = (stop - start) / points
        # -½ d(log ᾱ)/dτ / √(ᾱ(1-ᾱ)) with log ᾱ(τ) = -½τ²(β1-β0) - τβ0: dσ/dτ of the VP-to-EDM map.
        alpha = torch.exp(-0.5 * taus**2 * (beta_1 - beta_0) - taus * beta_0)
        weight = 0.5 * (taus * (beta_1 - beta_0) + beta_0) / torch.sqrt(alpha * (1 - alpha))
        previous = times[[i - k for k in range(order)]]
        row = []
        for j in range(order):
            basis = torch.ones_like(taus)
            for k in range(order):
                if k != j:
                    basis = basis * (taus - previous[k]) / (previous[j] - previous[k])
            row.append(float(torch.sum(weight * basis) * dtau))
        table.append(row)
    return table


# -- UniPC --------------------------------------------------------------------------------------------


class UniPC:
    """UniPC (arXiv 2302.04867), B(h) = h ("bh1"), data prediction, multistep predictor-corrector of order
    up to 3, lower orders at the end, as ComfyUI runs it: its σ are read as a VE schedule and converted to
    VP coordinates (α = 1/√(1+σ²)), the last σ = 0 replaced by 0.001, the result scaled back."""

    def __init__(self, denoiser: Denoiser, steps: _Steps) -> None:
        self.denoiser, self.steps = denoiser, steps

    @staticmethod
    def _alpha(sigma: float) -> float:
        return 1.0 / math.sqrt(sigma * sigma + 1.0)

    @staticmethod
    def _std(sigma: float) -> float:
        return sigma / math.sqrt(sigma * sigma + 1.0)

    @staticmethod
    def _lambda(sigma: float) -> float:
        return -math.log(sigma)

    def _x0(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        return self.denoiser(x * math.sqrt(sigma * sigma + 1.0), sigma)  # VP x → the denoiser's x

    def sample(self, x: torch.Tensor, sigmas: list[float]) -> torch.Tensor:
        times = list(sigmas)
        if times[-1] == 0:
            times[-1] = 0.001
        total = len(times) - 1
        if total < 1:
            return x
        order = max(1, min(3, len(times) - 2))
        x = x / math.sqrt(1.0 + times[0] ** 2)
        self.steps.begin(0)
        models = [self._x0(x, times[0])]
        stamps = [times[0]]
        for step in range(1, order):
            x, model = self._update(x, models, stamps, times[step], step, corrector=True)
            if model is None:
                model = self._x0(x, times[step])
            models.append(model)
            stamps.append(times[step])
            self.steps.end(step - 1, x * math.sqrt(1 + times[step] ** 2))
            self.steps.begin(step)
        for step in range(order, total + 1):
            step_order = min(order, total + 1 - step)
            x, model = self._update(x, models, stamps, times[step], step_order, corrector=step != total)
            models, stamps = [*models[1:], models[-1]], [*stamps[1:], times[step]]
            if step < total:
                models[-1] = model if model is not None else self._x0(x, times[step])
            self.steps.end(step - 1, x * math.sqrt(1 + times[step] ** 2))
            if step < total:
                self.steps.begin(step)
        return x / self._alpha(times[-1])

    def _update(
        self, x: torch.Tensor, models: list[torch.Tensor], stamps: list[float], t: float, order: int, corrector: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        s0, model0 = stamps[-1], models[-1]
        lam0, lam_t = self._lambda(s0), self._lambda(t)
        alpha_t, std_t, std0 = self._alpha(t), self._std(t), self._std(s0)
        h = lam_t - lam0
        ratios: list[float] = []
        differences: list[torch.Tensor] = []
        for i in range(1, order):
            r = (self._lambda(stamps[-(i + 1)]) - lam0) / h
            ratios.append(r)
            differences.append((models[-(i + 1)] - model0) / r)
        ratios.append(1.0)
        hh = -h
        h_phi_1 = math.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1.0
        b_h = hh
        rows, rhs = [], []
        factorial = 1
        for i in range(1, order + 1):
            rows.append([r ** (i - 1) for r in ratios])
            rhs.append(h_phi_k * factorial / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1.0 / factorial
        matrix, vector = torch.tensor(rows, dtype=torch.float64), torch.tensor(rhs, dtype=torch.float64)
        base = std_t / std0 * x - alpha_t * h_phi_1 * model0
        predicted = torch.zeros_like(x)
        if differences:
            rho_p = [0.5] if order == 2 else torch.linalg.solve(matrix[:-1, :-1], vector[:-1]).tolist()
            predicted = sum((rho * d for rho, d in zip(rho_p, differences, strict=True)), torch.zeros_like(x))
        x_t = base - alpha_t * b_h * predicted
        if not corrector:
            return x_t, None
        rho_c = [0.5] if order == 1 else torch.linalg.solve(matrix, vector).tolist()
        model_t = self._x0(x_t, t)
        corrected = sum((rho * d for rho, d in zip(rho_c[:-1], differences, strict=True)), torch.zeros_like(x))
        return base - alpha_t * b_h * (corrected + rho_c[-1] * (model_t - model0)), model_t
