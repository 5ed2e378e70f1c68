"""The base model with alibaba-pai's distill LoRA, 8 steps at cfg 1: the built-in template and
`zimage generate --variant distill`, on tiny files named as the published ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.checkpoints import copy_tokenizer, diffusers_state
from tests.loras import lora_pairs, shared_qkv_down, write_comfy
from tests.support.cli import run
from tests.support.images import read_png_text
from tests.workflows import saved_image
from zimage_serve import workflows
from zimage_serve.engine.placement import Placement
from zimage_serve.engine.variants import DISTILL_LORAS
from zimage_serve.templates.builtin import builtin
from zimage_serve.workflow.execute import Executor
from zimage_serve.workflow.folders import Folders
from zimage_serve.workflow.nodes import NODES

LORA = DISTILL_LORAS[0]


@pytest.fixture(scope="module")
def root(comfy_root: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder with the base model's file name, the distill LoRA's and a tokenizer."""
    models = tmp_path_factory.mktemp("distill") / "models"
    shutil.copytree(comfy_root, models)
    (models / "diffusion_models" / "z_image_turbo_bf16.safetensors").rename(
        models / "diffusion_models" / "z_image.safetensors"
    )
    copy_tokenizer(tiny_model, models / "text_encoders" / "tokenizer")
    (models / "loras").mkdir(exist_ok=True)
    write_comfy(shared_qkv_down(lora_pairs(diffusers_state(tiny_model / "transformer"))), models / "loras" / LORA)
    write_comfy(shared_qkv_down(lora_pairs(diffusers_state(tiny_model / "transformer"), seed=5)),
                models / "loras" / "style.safetensors")  # fmt: skip
    return models


def small(strength: float | None = None) -> dict[str, Any]:
    prompt = workflows.load(workflows.DISTILL)
    prompt["13"]["inputs"].update(width=64, height=64)
    if strength is not None:
        prompt["41"]["inputs"]["strength_model"] = strength
    return prompt


def test_the_template_runs_the_base_model_with_the_lora_at_8_steps_and_cfg_1(root: Path, tmp_path: Path) -> None:
    prompt = workflows.load(workflows.DISTILL)
    sampler = prompt["3"]["inputs"]
    assert (sampler["steps"], sampler["cfg"]) == (8, 1)
    assert prompt["28"]["inputs"]["unet_name"] == "z_image.safetensors"
    assert prompt["41"]["inputs"] == {"lora_name": LORA, "strength_model": 0.8, "model": ["28", 0]}
    executor = Executor(NODES, Folders.default(tmp_path / "data", [root]), Placement.choose("cpu"))
    with_lora, without = saved_image(executor, small(), "9"), saved_image(executor, small(strength=0.0), "9")
    assert np.abs(with_lora - without).mean() > 2  # the LoRA is on


def test_the_builtin_template_keeps_the_recipes_lora_and_offers_one_more(root: Path) -> None:
    template = builtin("z-image-distill")
    assert template is not None
    workflow = template.workflow
    assert workflow["40"]["inputs"]["model"] == ["41", 0] and workflow["11"]["inputs"]["model"] == ["40", 0]
    [target] = template.parameters["lora_name"].targets
    assert target.node == "40"  # the optional one, not the recipe's


def test_generate_with_the_distill_variant_finds_the_lora(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "d.png"
    model = root / "diffusion_models" / "z_image.safetensors"
    args = [
        "generate",
        "a fox",
        "-o",
        str(out),
        "--width",
        "64",
        "--height",
        "64",
        "--seed",
        "3",
        "--model",
        str(model),
    ]
    code, _, stderr = run([*args, "--variant", "distill"], capsys)
    assert code == 0, stderr
    assert f"lora: {root / 'loras' / LORA} at 0.8" in " ".join(stderr.split()), stderr
    assert "8 steps, guidance 0" in stderr and "distill" in stderr
    meta = json.loads(read_png_text(out)["zimage"])
    assert (meta["steps"], meta["guidance_scale"]) == (8, 0.0)

    plain = tmp_path / "p.png"
    code, _, stderr = run(["generate", "a fox", "-o", str(plain), *args[4:], "--steps", "8", "--guidance", "0"], capsys)
    assert code == 0, stderr
    assert (
        np.abs(np.asarray(Image.open(out), dtype=np.int16) - np.asarray(Image.open(plain), dtype=np.int16)).mean() > 2
    )
    other = tmp_path / "o.png"  # another LoRA beside the recipe's: the distill LoRA is still applied
    code, _, stderr = run(["generate", "a fox", "-o", str(other), *args[4:], "--variant", "distill", "--lora",
                           f"{root / 'loras' / 'style.safetensors'}:0"], capsys)  # fmt: skip
    assert code == 0 and stderr.count("lora:") == 2, stderr
    assert np.array_equal(np.asarray(Image.open(other)), np.asarray(Image.open(out)))
    half = tmp_path / "h.png"
    lora = f"{root / 'loras' / LORA}:0"
    code, _, stderr = run(
        ["generate", "a fox", "-o", str(half), *args[4:], "--variant", "distill", "--lora", lora], capsys
    )
    assert code == 0, stderr
    assert np.array_equal(np.asarray(Image.open(half)), np.asarray(Image.open(plain)))  # strength 0: no LoRA


def test_generate_says_where_the_distill_lora_goes_and_checks_lora_options(
    comfy_root: Path, tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = tmp_path / "models"
    shutil.copytree(comfy_root, models)
    copy_tokenizer(tiny_model, models / "text_encoders" / "tokenizer")
    model = str(models / "diffusion_models" / "z_image_turbo_bf16.safetensors")
    code, _, stderr = run(["generate", "x", "--model", model, "--variant", "distill"], capsys)
    flat = " ".join(stderr.split())
    assert code == 2 and "--variant" in flat and LORA in flat and str(models / "loras") in flat, stderr
    for bad, why in ((f"{tmp_path / 'none.safetensors'}", "is not a file"), (f"{model}:11", "outside -10..10")):
        code, _, stderr = run(["generate", "x", "--model", model, "--lora", bad], capsys)
        assert code == 2 and "--lora" in stderr and why in " ".join(stderr.split()), stderr
    code, _, stderr = run(["generate", "x", "--model", model, "--lora", model], capsys)  # not a LoRA
    assert code == 2 and "--lora" in stderr, stderr
