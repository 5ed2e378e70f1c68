"""Every bad generation parameter is refused with the field named."""

from __future__ import annotations

from typing import Any

import pytest

from zimage_serve.engine import GenerationParams
from zimage_serve.errors import InvalidParameterError


def test_defaults_leave_steps_and_guidance_to_the_model() -> None:
    params = GenerationParams("x")
    assert (params.steps, params.guidance_scale, params.shift, params.sampler) == (None, None, 3.0, "euler")
    assert (params.cfg_normalization, params.cfg_truncation) == (0.0, 1.0)
    assert params.max_sequence_length == 512 and not params.cfg_enabled
    params.validate()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("prompt", ""),
        ("prompt", "   \n"),
        ("prompt", None),
        ("width", 100),
        ("width", 48),
        ("width", 4112),  # beyond zimage_serve/limits.py MAX_SIDE
        ("height", 0),
        ("height", 1024.0),
        ("height", True),
        ("steps", 0),
        ("steps", 201),
        ("steps", "8"),
        ("guidance_scale", -1),
        ("guidance_scale", float("nan")),
        ("guidance_scale", 31),
        ("cfg_normalization", -0.5),
        ("cfg_normalization", float("nan")),
        ("cfg_truncation", 1.5),
        ("cfg_truncation", "half"),
        ("shift", 0),
        ("sampler", "dpmpp_9m"),
        ("seed", -1),
        ("seed", 2**64),
        ("batch_size", 0),
        ("batch_size", 65),
        ("max_sequence_length", 513),
        ("negative_prompt", 5),
    ],
)
def test_bad_values_name_their_field(field: str, value: Any) -> None:
    kwargs: dict[str, Any] = {"prompt": "a red circle", field: value}
    with pytest.raises(InvalidParameterError) as caught:
        GenerationParams(**kwargs).validate()
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}:")


@pytest.mark.parametrize("size", [64, 128, 1024, 1008, 2048])
def test_good_sizes(size: int) -> None:
    GenerationParams("x", width=size, height=size).validate()


def test_seeds_wrap_at_64_bits() -> None:
    assert GenerationParams("x", seed=2**64 - 1, batch_size=2).image_seeds() == [2**64 - 1, 0]
