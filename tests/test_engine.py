"""The staged pipeline on a tiny random model of the real architecture (no mocks)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from zimage_serve.engine import GenerationParams, ZImageEngine, open_engine
from zimage_serve.engine.schedule import sigma_schedule
from zimage_serve.errors import GenerationCancelled

SIZE = {"width": 64, "height": 64}


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> ZImageEngine:
    return open_engine(tiny_model, device="cpu")


def pixels(engine: ZImageEngine, **kwargs: object) -> list[np.ndarray]:
    params = GenerationParams(**{"prompt": "a red circle on a blue background", **SIZE, **kwargs})
    return [np.asarray(image) for image in engine.generate(params).images]


def count_transformer_calls(engine: ZImageEngine) -> list[int]:
    calls = [0]

    def hook(*_: object) -> None:
        calls[0] += 1

    engine.model.transformer.register_forward_hook(hook)
    return calls


def test_turbo_sigma_schedule_matches_reference() -> None:
    expected = [1, 0.9545, 0.9, 0.8333, 0.75, 0.6429, 0.5, 0.3, 0]
    assert sigma_schedule(8, 3.0) == pytest.approx(expected, abs=1e-4)


def test_shift_one_is_linear() -> None:
    assert sigma_schedule(4, 1.0) == pytest.approx([1, 0.75, 0.5, 0.25, 0], abs=1e-6)


def test_eight_steps_make_exactly_eight_transformer_calls(tiny_model: Path) -> None:
    engine = open_engine(tiny_model, device="cpu")
    calls = count_transformer_calls(engine)
    pixels(engine, steps=8)
    assert calls[0] == 8
    calls[0] = 0
    # With guidance the positive and negative branches share one batched call per step.
    pixels(engine, steps=8, guidance_scale=2.0, negative_prompt="blurry")
    assert calls[0] == 8


def test_same_seed_is_bit_identical(engine: ZImageEngine) -> None:
    first, second = pixels(engine, seed=42)[0], pixels(engine, seed=42)[0]
    assert np.array_equal(first, second)
    assert first.std() > 1, "a constant image would make this test meaningless"


def test_different_seed_differs(engine: ZImageEngine) -> None:
    assert not np.array_equal(pixels(engine, seed=1)[0], pixels(engine, seed=2)[0])


def test_prompt_changes_the_image(engine: ZImageEngine) -> None:
    assert not np.array_equal(pixels(engine, prompt="a red circle")[0], pixels(engine, prompt="一个绿色的方形")[0])


def test_batch_image_i_equals_single_image_with_seed_plus_i(engine: ZImageEngine) -> None:
    assert torch.equal(engine.initial_noise([7, 8, 9], 64, 64)[2], engine.initial_noise([9], 64, 64)[0])
    batch = pixels(engine, seed=7, batch_size=3)
    assert len(batch) == 3
    # Same noise, same model; only the batched matrix products may round the last bit differently.
    single = pixels(engine, seed=9)[0]
    assert np.abs(batch[2].astype(int) - single.astype(int)).max() <= 1
    assert not np.array_equal(batch[0], batch[1])


def test_guidance_and_negative_prompt_change_the_image(engine: ZImageEngine) -> None:
    plain = pixels(engine, seed=3)[0]
    guided = pixels(engine, seed=3, guidance_scale=3.0, negative_prompt="blurry")[0]
    other_negative = pixels(engine, seed=3, guidance_scale=3.0, negative_prompt="sharp")[0]
    assert not np.array_equal(plain, guided)
    assert not np.array_equal(guided, other_negative)


def test_size_is_respected_and_native_size_is_default(engine: ZImageEngine) -> None:
    assert pixels(engine, width=96, height=64)[0].shape == (64, 96, 3)
    result = engine.generate(GenerationParams("a square"))
    assert result.images[0].size == (engine.native_size, engine.native_size)


def test_long_prompt_is_truncated_and_reported(engine: ZImageEngine) -> None:
    long_prompt = " ".join(f"word{i}" for i in range(600))
    result = engine.generate(GenerationParams(long_prompt, **SIZE))
    assert len(result.warnings) == 1 and "truncated" in result.warnings[0]
    embedding = engine.encode_prompt(long_prompt)
    assert embedding.embeds.shape[0] == 512
    assert embedding.truncated_tokens == embedding.token_count - 512 > 0
    assert engine.encode_prompt("short").truncated_tokens == 0


def test_prompt_embedding_is_second_to_last_hidden_state(engine: ZImageEngine) -> None:
    embedding = engine.encode_prompt("一个红色的圆形")
    ids = engine.model.tokenizer(
        "<|im_start|>user\n一个红色的圆形<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False
    )["input_ids"]
    with torch.inference_mode():
        states = engine.model.text_encoder(torch.tensor([ids]), output_hidden_states=True).hidden_states
    assert len(states) == engine.model.text_encoder.config.num_hidden_layers + 1
    assert torch.equal(embedding.embeds, states[-2][0])


def test_stages_compose_to_generate(engine: ZImageEngine) -> None:
    params = GenerationParams("a blue triangle", seed=11, **SIZE)
    whole = np.asarray(engine.generate(params).images[0])
    latents = engine.denoise(engine.initial_noise([11], 64, 64), engine.encode_prompt("a blue triangle"))
    staged = np.asarray(engine.decode(latents)[0])
    assert np.array_equal(whole, staged)


def test_step_callback_sees_every_step(engine: ZImageEngine) -> None:
    seen: list[tuple[int, int, float]] = []
    engine.generate(GenerationParams("x", steps=5, **SIZE), on_step=lambda s: seen.append((s.step, s.total, s.sigma)))
    assert [(s, t) for s, t, _ in seen] == [(i, 5) for i in range(1, 6)]
    assert seen[-1][2] == 0.0


def test_cancel_stops_between_steps(engine: ZImageEngine) -> None:
    calls = count_transformer_calls(engine)
    steps_done: list[int] = []
    with pytest.raises(GenerationCancelled, match="step 4 of 8"):
        engine.generate(
            GenerationParams("x", **SIZE),
            on_step=lambda s: steps_done.append(s.step),
            cancel=lambda: len(steps_done) >= 3,
        )
    assert steps_done == [1, 2, 3]
    assert calls[0] == 3
