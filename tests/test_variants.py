"""Z-Image (base) and Turbo: told apart by names or metadata, each with its defaults; CFG as diffusers means it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

from tests.checkpoints import copy_tokenizer, write_comfy_root
from zimage_serve.engine import GenerationParams, ZImageEngine, open_engine
from zimage_serve.engine.schedule import TURBO_SCHEDULER_CONFIG
from zimage_serve.engine.variants import BASE, TURBO, detect_variant
from zimage_serve.errors import InvalidParameterError
from zimage_serve.nano.default import default_model
from zimage_serve.nano.random_model import write_random_model

SIZE = {"width": 64, "height": 64}


@pytest.mark.parametrize(
    ("name", "variant"),
    [
        ("z_image.safetensors", BASE),
        ("z_image_bf16.safetensors", BASE),
        ("z_image_turbo_bf16.safetensors", TURBO),
        ("Z-Image", BASE),
        ("Z-Image-Turbo", TURBO),
        ("models--Tongyi-MAI--Z-Image/snapshots/0123abcd", BASE),
        ("models--Tongyi-MAI--Z-Image-Turbo/snapshots/0123abcd", TURBO),
        ("z-image/my_finetune.safetensors", TURBO),  # a folder above says nothing about the file
        ("zimage-nano-copy", TURBO),
    ],
)
def test_the_variant_is_told_from_the_name(tmp_path: Path, name: str, variant: str) -> None:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir() if not name.endswith(".safetensors") else path.write_bytes(b"")
    assert detect_variant(path) == variant


def test_a_folders_own_metadata_wins_over_its_name(tmp_path: Path) -> None:
    folder = tmp_path / "Z-Image-Turbo"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_zimage_serve": {"variant": "base"}}))
    assert detect_variant(folder) == BASE
    assert detect_variant(default_model()) == TURBO  # zimage-nano declares it


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model in a folder named as the base model's repository, declaring nothing."""
    folder = write_random_model(tmp_path_factory.mktemp("base") / "Z-Image", seed=1)
    index = json.loads((folder / "model_index.json").read_text())
    index.pop("_zimage_serve", None)
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def batches(engine: ZImageEngine) -> list[int]:
    """The batch of every transformer call (its latents come as a list, one per image)."""
    seen: list[int] = []
    engine.model.transformer.register_forward_pre_hook(lambda _module, args: seen.append(len(args[0])))
    return seen


def test_the_base_model_defaults_to_50_steps_and_guidance_4(base_folder: Path) -> None:
    engine = open_engine(base_folder, device="cpu")
    assert engine.variant == BASE
    seen = batches(engine)
    result = engine.generate(GenerationParams("a red circle", negative_prompt="blurry", **SIZE))
    assert (result.params.steps, result.params.guidance_scale) == (50, 4.0)
    assert seen == [2] * 50  # cfg doubles the batch, not the calls
    turbo = open_engine(base_folder, device="cpu", variant=TURBO)
    seen = batches(turbo)
    result = turbo.generate(GenerationParams("a red circle", **SIZE))
    assert (result.params.steps, result.params.guidance_scale) == (8, 0.0) and seen == [1] * 8


def test_guidance_and_the_negative_prompt_matter(base_folder: Path) -> None:
    engine = open_engine(base_folder, device="cpu")

    def image(**values: Any) -> Any:
        params = GenerationParams("a red circle", seed=3, steps=6, **SIZE, **values)
        return torch.tensor(list(engine.generate(params).images[0].tobytes()), dtype=torch.float32)

    plain = image(guidance_scale=0.0)
    guided = image(guidance_scale=4.0, negative_prompt="blurry")
    other_negative = image(guidance_scale=4.0, negative_prompt="a green square")
    assert (plain - guided).abs().mean() > 1 and (guided - other_negative).abs().mean() > 1


def test_cfg_truncation_stops_guiding_after_its_point(base_folder: Path) -> None:
    engine = open_engine(base_folder, device="cpu")
    seen = batches(engine)
    engine.generate(GenerationParams("x", steps=8, guidance_scale=4.0, cfg_truncation=0.5, **SIZE))
    # 8 shifted sigmas: 1, .95, .9, .83, .75, .64, .5, .3 → 1 - σ past 0.5 only at the last step.
    assert seen == [2] * 7 + [1]


@pytest.mark.parametrize(
    ("normalization", "truncation"), [(0.0, 1.0), (1.0, 1.0), (0.9, 0.6)], ids=["plain", "normalised", "both"]
)
def test_guidance_options_mean_what_they_mean_in_diffusers(
    base_folder: Path, normalization: float, truncation: float
) -> None:
    """The engine's latents equal diffusers' ZImagePipeline's with the same noise and options (fp32, CPU)."""
    engine = open_engine(base_folder, device="cpu", dtype="fp32")
    model = engine.model
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(TURBO_SCHEDULER_CONFIG),
        vae=model.vae,
        text_encoder=model.text_encoder,
        tokenizer=model.tokenizer,
        transformer=model.transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    noise = engine.initial_noise([5], 64, 64)
    options = {"guidance_scale": 3.0, "cfg_normalization": normalization, "cfg_truncation": truncation}
    reference = pipe(
        "a red circle",
        negative_prompt="a blue square",
        height=64,
        width=64,
        num_inference_steps=6,
        latents=noise.clone(),
        output_type="latent",
        **{**options, "cfg_normalization": normalization if normalization else False},
    ).images.float()
    raw = engine.denoise(
        noise.clone(), engine.encode_prompt("a red circle"), engine.encode_prompt("a blue square"), steps=6, **options
    )
    config = model.vae.config
    ours = (raw - float(config.shift_factor or 0.0)) * float(config.scaling_factor)
    assert torch.linalg.vector_norm(ours - reference) / torch.linalg.vector_norm(reference) < 1e-4


def test_comfyuis_base_file_gets_the_base_defaults(base_folder: Path, tmp_path: Path) -> None:
    root = write_comfy_root(base_folder, tmp_path / "models")
    (root / "diffusion_models" / "z_image_turbo_bf16.safetensors").rename(
        root / "diffusion_models" / "z_image.safetensors"
    )
    tokenizer = copy_tokenizer(base_folder, tmp_path / "tokenizer")
    engine = open_engine(root / "diffusion_models" / "z_image.safetensors", tokenizer=tokenizer, device="cpu")
    assert engine.variant == BASE and engine.resolve(GenerationParams("x")).steps == 50


def test_an_unknown_variant_is_refused_by_name() -> None:
    from zimage_serve.engine.variants import check_variant

    with pytest.raises(InvalidParameterError, match="variant: 'medium' is not one of auto, base, turbo"):
        check_variant("medium")


def test_generate_takes_the_guidance_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.support.images import read_png_text
    from tests.test_cli import run

    out = tmp_path / "base.png"
    args = ["generate", "a red circle", "-o", str(out), "--variant", "base", "--steps", "3", "--negative", "blurry"]
    code, _, stderr = run([*args, "--cfg-normalization", "1", "--cfg-truncation", "0.5"], capsys)
    assert code == 0, stderr
    assert "base): " in stderr and "3 steps, guidance 4" in stderr  # the base model's guidance by default
    meta = json.loads(read_png_text(out)["zimage"])
    assert (meta["guidance_scale"], meta["cfg_normalization"], meta["cfg_truncation"]) == (4.0, 1.0, 0.5)
    code, _, stderr = run([*args, "--cfg-truncation", "2"], capsys)
    assert code == 1 and "cfg_truncation: 2.0 is outside 0..1" in stderr
