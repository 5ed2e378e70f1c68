"""ComfyUI's model sampling for flow-matching models: the noise level σ of each timestep, and back.

For a flow model ``x = (1-σ)·x0 + σ·ε``; a velocity prediction ``v = ε - x0`` gives ``x0 = x - σ·v``. The
schedules (`engine/schedulers.py`) and the samplers (`engine/sampling.py`) are built on these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


def half_log_snr(sigma: float) -> float:
    """λ = log((1 - σ) / σ) for a flow model (ComfyUI's CONST); the SDE and DPM++ SDE samplers step in it."""
    return math.log((1.0 - sigma) / sigma)


def sigma_of_half_log_snr(value: float) -> float:
    return 1.0 / (1.0 + math.exp(value))
