"""ComfyUI's quantised files: INT8 ConvRot diffusion models and FP8-mixed text encoders, on tiny files
written in the published layouts (tests/quant_checkpoints.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.quant_checkpoints import (
    BASE_INT8,
    PREFIX,
    TE_FP8,
    TURBO_INT8,
    hadamard_by_digits,
    marker,
    write_quant_models_root,
)
from tests.workflows import TURBO_WORKFLOW, saved_image
from zimage_serve.engine import comfy_quant, components
from zimage_serve.engine.comfy_quant import Int8Linear, QuantConf, regular_hadamard
from zimage_serve.engine.fastpath import FastPath
from zimage_serve.engine.layouts import single_file
from zimage_serve.engine.placement import Placement
from zimage_serve.errors import ModelLoadError
from zimage_serve.workflow.execute import Executor
from zimage_serve.workflow.folders import Folders
from zimage_serve.workflow.nodes import NODES


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ComfyUI models root: the bf16 files and, made from them, the INT8 and FP8-mixed ones."""
    return write_quant_models_root(tmp_path_factory.mktemp("quant") / "models")


def executor(models: Path, tmp_path: Path, int8_matmul: str = "off") -> Executor:
    placement = Placement.choose("cpu", fast=FastPath(int8_matmul=int8_matmul))  # type: ignore[arg-type]
    return Executor(NODES, Folders.default(tmp_path / "data", [models]), placement)


def graph(unet: str, clip: str = "qwen_3_4b.safetensors", lora: str | None = None) -> dict[str, Any]:
    """The Turbo template's graph at 96² and 4 steps, with these files."""
    prompt: dict[str, Any] = json.loads(TURBO_WORKFLOW.read_text())
    prompt["28"]["inputs"]["unet_name"] = unet
    prompt["30"]["inputs"]["clip_name"] = clip
    prompt["13"]["inputs"].update(width=96, height=96)
    prompt["3"]["inputs"].update(steps=4, seed=7)
    if lora is not None:
        prompt["40"] = {
            "class_type": "LoraLoaderModelOnly",
            "inputs": {"model": ["28", 0], "lora_name": lora, "strength_model": 1.0},
        }
        prompt["11"]["inputs"]["model"] = ["40", 0]
    return prompt


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def load(path: Path, kind: str = "transformer", int8_matmul: bool = False) -> torch.nn.Module:
    prepared = components.prepare(single_file(kind, path))  # type: ignore[arg-type]
    return components.load(prepared, torch.device("cpu"), torch.float32, int8_matmul)


@pytest.mark.parametrize("group", [4, 16, 64, 256])
def test_the_rotation_is_the_regular_hadamard_matrix(group: int) -> None:
    rotation = regular_hadamard(group).double()
    assert torch.allclose(rotation, torch.from_numpy(hadamard_by_digits(group)), atol=1e-7)
    assert torch.allclose(rotation, rotation.T)
    assert torch.allclose(rotation @ rotation, torch.eye(group, dtype=torch.float64), atol=1e-6)
    sums = rotation.sum(dim=1)
    assert torch.allclose(sums, sums[0].expand(group))  # regular: every row sums the same


def test_int8_codes_dequantise_to_the_weights_they_came_from() -> None:
    weight = torch.randn(48, 64, generator=torch.Generator().manual_seed(0))
    codes, scale = comfy_quant.quantise_int8(weight, 16)
    back = comfy_quant.dequantise(QuantConf("int8_tensorwise", True, 16), codes, scale, torch.float32)
    error = float((back - weight).norm() / weight.norm())
    assert 0 < error < 0.01
    unrotated = comfy_quant.dequantise(QuantConf("int8_tensorwise", False), codes, scale, torch.float32)
    assert float((unrotated - weight).norm() / weight.norm()) > 0.5  # the rotation is not optional


def test_the_int8_file_loads_with_its_high_precision_layers_untouched(models: Path) -> None:
    original = load(models / "diffusion_models" / "z_image_turbo_bf16.safetensors").state_dict()
    dequantised = load(models / "diffusion_models" / TURBO_INT8).state_dict()
    assert original.keys() == dequantised.keys()
    quantised = [k for k in original if k.endswith(".weight") and ("feed_forward" in k or "attention.to_" in k)]
    assert len(quantised) == 4 * 7  # q, k, v (the fused qkv split), out, w1, w2, w3 of 4 blocks
    for key, value in original.items():
        error = float((dequantised[key] - value).norm() / value.norm())
        if key in quantised or key.endswith("adaLN_modulation.0.weight"):
            assert 0 < error < 0.012, key
        else:  # the file keeps it in float32: the bf16 weight it was made from, exactly
            assert error == 0, key

    kept = load(models / "diffusion_models" / TURBO_INT8, int8_matmul=True)
    int8 = {name for name, module in kept.named_modules() if isinstance(module, Int8Linear)}
    assert len(int8) == 23 + 2 * 4  # the file's 23 layers, each fused qkv counted as its three parts
    assert {
        "layers.0.attention.to_q",
        "context_refiner.0.feed_forward.w2",
        "noise_refiner.0.adaLN_modulation.0",
    } <= int8
    assert not any("embedder" in name or "final_layer" in name for name in int8)
    rows = torch.randn(9, 48, generator=torch.Generator().manual_seed(1))
    dequantised_model = load(models / "diffusion_models" / TURBO_INT8)
    for name in ("layers.1.attention.to_v", "layers.0.feed_forward.w2", "noise_refiner.0.adaLN_modulation.0"):
        exact, w8a8 = dequantised_model.get_submodule(name), kept.get_submodule(name)
        x = rows if exact.in_features == 48 else torch.randn(9, exact.in_features)
        assert float((w8a8(x) - exact(x)).norm() / exact(x).norm()) < 0.03, name


def test_the_header_conf_wins_and_detection_never_reads_the_name(models: Path, tmp_path: Path) -> None:
    neutral = tmp_path / "my_model.safetensors"
    shutil.copy(models / "diffusion_models" / BASE_INT8, neutral)
    assert len([m for m in load(neutral, int8_matmul=True).modules() if isinstance(m, Int8Linear)]) == 31

    # A marker tensor that disagrees with the header: the header's conf is the one read.
    tensors = load_file(neutral)
    tensors[f"{PREFIX}layers.0.attention.out.comfy_quant"] = marker({"format": "nvfp4"})
    from safetensors import safe_open

    with safe_open(str(neutral), "pt") as handle:
        metadata = handle.metadata()
    save_file(tensors, neutral, metadata=metadata)
    assert isinstance(load(neutral, int8_matmul=True).get_submodule("layers.0.attention.to_out.0"), Int8Linear)

    save_file(tensors, neutral)  # the same without the header: the marker's unknown format is refused
    with pytest.raises(ModelLoadError, match=r"layers\.0\.attention\.out: quantisation format 'nvfp4'"):
        load(neutral)


@pytest.mark.parametrize(
    ("conf", "why"),
    [
        ({"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 32}, "power of 4"),
        ({"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 256}, "do not divide"),
        ({"format": "float8_e4m3fn"}, "needs a 2-D F8_E4M3"),
        ("not json", "not a JSON"),
    ],
)
def test_a_layer_the_loader_cannot_read_is_named(models: Path, tmp_path: Path, conf: Any, why: str) -> None:
    tensors = load_file(models / "diffusion_models" / TURBO_INT8)
    key = f"{PREFIX}layers.1.feed_forward.w1.comfy_quant"
    tensors[key] = marker(conf) if isinstance(conf, dict) else torch.tensor(list(b"{not json"), dtype=torch.uint8)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, bad)
    with pytest.raises(ModelLoadError, match=why) as caught:
        load(bad)
    assert "bad.safetensors" in str(caught.value) and "layers.1.feed_forward.w1" in str(caught.value)


def test_the_fp8_mixed_text_encoder_gives_hidden_states_close_to_the_bf16_ones(models: Path) -> None:
    original = load(models / "text_encoders" / "qwen_3_4b.safetensors", "text_encoder")
    mixed = load(models / "text_encoders" / TE_FP8, "text_encoder")
    ids = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = original(ids, output_hidden_states=True).hidden_states[-2]
        b = mixed(ids, output_hidden_states=True).hidden_states[-2]
    assert 0 < float((a - b).norm() / a.norm()) < 0.06
    first, last = original.state_dict(), mixed.state_dict()
    for key in ("layers.0.mlp.down_proj.weight", "layers.2.self_attn.q_proj.weight", "embed_tokens.weight"):
        assert torch.equal(first[key], last[key]), key  # the layers the file keeps in bf16


@pytest.mark.parametrize("int8_matmul", ["off", "on"])
def test_the_int8_template_files_make_the_bf16_image(models: Path, tmp_path: Path, int8_matmul: str) -> None:
    run = executor(models, tmp_path, int8_matmul)
    reference = saved_image(run, graph("z_image_turbo_bf16.safetensors"), "9")
    int8 = saved_image(run, graph(TURBO_INT8), "9")
    both = saved_image(run, graph(TURBO_INT8, TE_FP8), "9")
    print(
        f"PSNR against bf16, int8 matmul {int8_matmul}: DiT {psnr(int8, reference):.1f} dB, "
        f"DiT + FP8 text encoder {psnr(both, reference):.1f} dB"
    )
    assert np.abs(int8 - reference).mean() > 0  # it is not silently the bf16 file
    assert psnr(int8, reference) > 46
    assert psnr(both, reference) > 46


def test_a_lora_applies_to_int8_weights_and_comes_off_exactly(models: Path, tmp_path: Path) -> None:
    run = executor(models, tmp_path, "on")
    plain = saved_image(run, graph(TURBO_INT8), "9")
    styled = saved_image(run, graph(TURBO_INT8, lora="style.safetensors"), "9")
    reference = saved_image(run, graph("z_image_turbo_bf16.safetensors", lora="style.safetensors"), "9")
    assert np.abs(styled - plain).mean() > 2  # the LoRA changed the INT8 model's image
    assert psnr(styled, reference) > 30  # as it changes the bf16 model's
    assert np.array_equal(saved_image(run, graph(TURBO_INT8), "9"), plain)  # and came off, codes and scales exactly


def test_a_bad_int8_matmul_option_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    from tests.support.cli import run

    code, _, stderr = run(["generate", "x", "--int8-matmul", "maybe"], capsys)
    assert code == 2 and "--int8-matmul" in stderr and "auto, on, off" in stderr


@pytest.mark.parametrize(
    ("marker_tensor", "metadata", "why"),
    [
        (torch.zeros(4, dtype=torch.float32), None, "1-D uint8"),
        (torch.zeros(70_000, dtype=torch.uint8), None, "at most 65536 bytes"),
        (torch.tensor(list(b"[" * 50_000), dtype=torch.uint8), None, "not a JSON quantisation conf"),
        (None, {"_quantization_metadata": "[" * 50_000}, "_quantization_metadata"),
        (marker({"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 4**7}), None, "up to 4096"),
    ],
)
def test_a_hostile_marker_or_header_is_refused_before_anything_large_is_read(
    models: Path, tmp_path: Path, marker_tensor: torch.Tensor | None, metadata: dict[str, str] | None, why: str
) -> None:
    tensors = load_file(models / "diffusion_models" / TURBO_INT8)
    if marker_tensor is not None:
        tensors[f"{PREFIX}layers.0.feed_forward.w2.comfy_quant"] = marker_tensor
    bad = tmp_path / "hostile.safetensors"
    save_file(tensors, bad, metadata=metadata)
    with pytest.raises(ModelLoadError, match=why):
        load(bad)


def test_a_controlnet_with_quantised_layers_loads_dequantised(tmp_path: Path) -> None:
    from tests.controlnets import write_controlnet
    from tests.quant_checkpoints import int8_convrot
    from zimage_serve.engine.controlnet import load_controlnet

    plain = write_controlnet(tmp_path / "plain.safetensors", "2.1 lite")
    tensors = load_file(plain)
    layer = "control_layers.0.attention.to_q"
    codes, scale = int8_convrot(tensors[f"{layer}.weight"].float(), 16)
    tensors.update({f"{layer}.weight": codes, f"{layer}.weight_scale": scale})
    tensors[f"{layer}.comfy_quant"] = marker({"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 16})
    quantised = tmp_path / "quantised.safetensors"
    save_file(tensors, quantised)
    placement = Placement.choose("cpu")
    original = load_controlnet("plain", plain, placement).module.state_dict()[f"{layer}.weight"]
    loaded = load_controlnet("quantised", quantised, placement).module.state_dict()[f"{layer}.weight"]
    assert 0 < float((loaded - original).norm() / original.norm()) < 0.02
