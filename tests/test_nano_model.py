"""The shipped zimage-nano: its layout, size, speed class and, above all, what its images show."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zimage_serve.engine import GenerationParams, ZImageEngine, open_engine
from zimage_serve.nano.checker import ATTRIBUTES, read
from zimage_serve.nano.default import SHIPPED
from zimage_serve.nano.evaluate import evaluate

MAX_BYTES = 25 * 1024**2


@pytest.fixture(scope="module")
def nano() -> ZImageEngine:
    return open_engine(SHIPPED, device="cpu")


def test_ships_in_the_official_layout_within_25_mb() -> None:
    index = json.loads((SHIPPED / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "ZImageTransformer2DModel"]
    assert index["text_encoder"] == ["transformers", "Qwen3Model"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert index["tokenizer"][1].startswith("Qwen2Tokenizer")
    total = sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file())
    assert total <= MAX_BYTES, f"{total / 1024**2:.1f} MB"
    vae = json.loads((SHIPPED / "vae" / "config.json").read_text())
    assert vae["latent_channels"] == 16 and len(vae["block_out_channels"]) == 4  # 8x downsampling
    scheduler = json.loads((SHIPPED / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["shift"] == 3.0


def test_native_resolution_and_any_text(nano: ZImageEngine) -> None:
    assert nano.native_size >= 128
    assert nano.model.sources.name == "zimage-nano"
    result = nano.generate(GenerationParams("emoji 🎨 and ñ, ü, 日本語 too", seed=1))
    assert result.images[0].size == (nano.native_size, nano.native_size)


def test_held_out_accuracy_on_twenty_images(nano: ZImageEngine) -> None:
    report = evaluate(nano, count=20, seed=12345)
    for attribute in ATTRIBUTES:
        assert report.accuracy(attribute) >= 0.85, (attribute, report.accuracy(attribute))


def test_the_readme_prompt_colours(nano: ZImageEngine) -> None:
    for seed in range(5):
        reading = read(nano.generate(GenerationParams("一个红色的圆形在蓝色背景上", seed=seed)).images[0])
        assert (reading.background, reading.colour) == ("blue", "red"), seed


def test_the_readme_prompt_draws_a_circle_most_of_the_time(nano: ZImageEngine) -> None:
    shapes = [
        read(nano.generate(GenerationParams("一个红色的圆形在蓝色背景上", seed=s)).images[0]).shape for s in range(10)
    ]
    assert shapes.count("circle") >= 8, shapes


def test_shipped_weights_are_in_git(nano: ZImageEngine) -> None:
    assert (Path(SHIPPED) / "transformer" / "diffusion_pytorch_model.safetensors").is_file()


def test_chinese_tokenizes_one_character_a_token(nano: ZImageEngine) -> None:
    """Whole Chinese phrases as one opaque token hid colour, size and shape from the model (first model)."""
    tokenizer = nano.model.tokenizer
    ids = tokenizer("一个大白色的圆形，背景是紫色", add_special_tokens=False)["input_ids"]
    assert [tokenizer.decode([i]) for i in ids] == list("一个大白色的圆形，背景是紫色")
    english = tokenizer("a small red circle", add_special_tokens=False)["input_ids"]
    assert [tokenizer.decode([i]) for i in english] == ["a", " small", " red", " circle"]
