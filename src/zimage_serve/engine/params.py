"""Generation parameters, validated field by field; steps and guidance default to the model's variant's."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from zimage_serve.errors import InvalidParameterError
from zimage_serve.limits import side_refusal, size_refusal  # sizes' one home, the server's too

MAX_SEQUENCE_LENGTH = 512
MAX_SEED = 0xFFFF_FFFF_FFFF_FFFF
MAX_STEPS = 200
MAX_BATCH = 64
MAX_GUIDANCE = 30.0
SAMPLERS = ("euler",)


@dataclass(frozen=True)
class GenerationParams:
    """One request. `width`/`height` of None mean the model's native size; `steps` and `guidance_scale`
    of None, its variant's defaults (Turbo 8 steps and none, the base model 50 and 4: engine/variants.py).

    `guidance_scale` follows diffusers: 0 turns classifier-free guidance off (ComfyUI's cfg = 1);
    above 0 the prediction is ``pos + g * (pos - neg)`` (ComfyUI's cfg = g + 1). With diffusers'
    meanings too: `cfg_normalization` k > 0 caps the guided prediction's norm at k times the positive
    one's (diffusers' True is 1.0); `cfg_truncation` c < 1 stops guidance on the steps after the
    normalised time 1 - σ passes c.
    """

    prompt: str
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    cfg_normalization: float = 0.0
    cfg_truncation: float = 1.0
    shift: float = 3.0
    sampler: str = "euler"
    seed: int = 0
    batch_size: int = 1
    max_sequence_length: int = MAX_SEQUENCE_LENGTH
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def cfg_enabled(self) -> bool:
        return self.guidance_scale is not None and self.guidance_scale > 0

    def image_seeds(self) -> list[int]:
        """Image i of a batch uses seed + i, so it can be reproduced alone."""
        return [(self.seed + i) & MAX_SEED for i in range(self.batch_size)]

    def validate(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise InvalidParameterError("prompt", "must be a non-empty text")
        if not isinstance(self.negative_prompt, str):
            raise InvalidParameterError("negative_prompt", "must be text")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is None:
                continue
            _require_int(name, value)
            why = side_refusal(value)
            if why is not None:
                raise InvalidParameterError(name, why)
        if self.width is not None and self.height is not None:  # the model's own size is checked once resolved
            refused = size_refusal(self.width, self.height)
            if refused is not None:
                raise InvalidParameterError(*refused)
        if self.steps is not None:
            _require_int("steps", self.steps)
            if not 1 <= self.steps <= MAX_STEPS:
                raise InvalidParameterError("steps", f"{self.steps} is outside 1..{MAX_STEPS}")
        if self.guidance_scale is not None:
            _require_number("guidance_scale", self.guidance_scale)
            if not 0 <= self.guidance_scale <= MAX_GUIDANCE:
                raise InvalidParameterError(
                    "guidance_scale", f"{self.guidance_scale} is outside 0..{MAX_GUIDANCE} (0 turns it off)"
                )
        _require_number("cfg_normalization", self.cfg_normalization)
        if not 0 <= self.cfg_normalization <= 100:
            raise InvalidParameterError(
                "cfg_normalization", f"{self.cfg_normalization} is outside 0..100 (0 is off; 1 is diffusers' True)"
            )
        _require_number("cfg_truncation", self.cfg_truncation)
        if not 0 <= self.cfg_truncation <= 1:
            raise InvalidParameterError(
                "cfg_truncation", f"{self.cfg_truncation} is outside 0..1 (1 guides every step)"
            )
        _require_number("shift", self.shift)
        if not 0 < self.shift <= 100:
            raise InvalidParameterError("shift", f"{self.shift} must be above 0 and at most 100")
        if self.sampler not in SAMPLERS:
            raise InvalidParameterError("sampler", f"{self.sampler!r} is not one of {', '.join(SAMPLERS)}")
        _require_int("seed", self.seed)
        if not 0 <= self.seed <= MAX_SEED:
            raise InvalidParameterError("seed", f"{self.seed} is outside 0..{MAX_SEED}")
        _require_int("batch_size", self.batch_size)
        if not 1 <= self.batch_size <= MAX_BATCH:
            raise InvalidParameterError("batch_size", f"{self.batch_size} is outside 1..{MAX_BATCH}")
        _require_int("max_sequence_length", self.max_sequence_length)
        if not 16 <= self.max_sequence_length <= MAX_SEQUENCE_LENGTH:
            raise InvalidParameterError(
                "max_sequence_length",
                f"{self.max_sequence_length} is outside 16..{MAX_SEQUENCE_LENGTH}",
            )

    def to_metadata(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("extra")
        data.update(self.extra)
        return data


def _require_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParameterError(name, f"must be a whole number, got {value!r}")


def _require_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise InvalidParameterError(name, f"must be a number, got {value!r}")
