"""The flow-matching sigma schedule Z-Image-Turbo is sampled with.

N steps use N sigmas linearly spaced from 1 to 1/N, shifted by ``s*σ / (1 + (s-1)*σ)``, then a final 0.
This equals ComfyUI's "simple" schedule with ModelSamplingAuraFlow's shift, and diffusers >= 0.39, and
costs exactly N transformer calls (no call at σ = 0).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

TURBO_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "use_dynamic_shifting": False,
    "shift": 3.0,
}


def make_scheduler(
    steps: int, shift: float, config: dict[str, Any] | None = None, device: torch.device | None = None
) -> FlowMatchEulerDiscreteScheduler:
    """A fresh scheduler per generation: its step counter is state, so it is never shared."""
    settings = dict(config or TURBO_SCHEDULER_CONFIG)
    settings.update(shift=shift, use_dynamic_shifting=False)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(settings)
    base = torch.linspace(1.0, 1.0 / steps, steps).tolist()
    scheduler.set_timesteps(sigmas=base, device=device)
    scheduler.set_begin_index(0)
    return scheduler


def sigma_schedule(steps: int, shift: float = 3.0) -> list[float]:
    """The N+1 sigmas (last one 0) that N steps walk through."""
    return [float(s) for s in make_scheduler(steps, shift).sigmas]
