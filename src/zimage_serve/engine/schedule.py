"""The flow-matching sigma schedule `zimage generate` samples Z-Image-Turbo with.

N steps use N sigmas linearly spaced from 1 to 1/N, shifted by ``s*σ / (1 + (s-1)*σ)``, then a final 0:
diffusers' FlowMatchEulerDiscreteScheduler (>= 0.39) for Turbo's config, and ComfyUI's "simple"
schedule with ModelSamplingAuraFlow's shift wherever 1000/N is whole (ComfyUI reads its 1000-entry
table, so 3 steps land at t = 0.667 and 0.334, not 2/3 and 1/3). It costs exactly N transformer calls
(no call at σ = 0). The steps themselves are `engine/sampling.py`'s, as every workflow's are.
"""

from __future__ import annotations

from typing import Any

TURBO_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "use_dynamic_shifting": False,
    "shift": 3.0,
}


def sigma_schedule(steps: int, shift: float = 3.0) -> list[float]:
    """The N+1 sigmas (last one 0) that N steps walk through."""
    if steps < 1:
        raise ValueError("steps must be at least 1")
    base = [1.0 - (1.0 - 1.0 / steps) * i / (steps - 1) for i in range(steps)] if steps > 1 else [1.0]
    return [shift * s / (1 + (shift - 1) * s) for s in base] + [0.0]
