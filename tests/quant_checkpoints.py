"""Tiny checkpoints in ComfyUI's quantised layouts, made from tiny bf16 ones as the published files were.

- INT8 ConvRot diffusion model (`z_image_turbo_int8_convrot.safetensors`): in every main block and noise
  refiner the fused qkv, the attention's out, the three feed-forward projections and the first adaLN
  projection, and in the context refiners the same without adaLN, are int8 codes of the weight rotated by
  the group-wise regular Hadamard matrix, with a float32 scale per row and a `.comfy_quant` marker; every
  other tensor is float32.
- FP8-mixed text encoder (`qwen_3_4b_fp8_mixed.safetensors`): the linear projections of the middle blocks
  in float8_e4m3fn with one float32 scale each; embeddings, norms, and the first and last blocks in bf16.

Written with numpy here, independently of the loader's own torch code, so that a mistake in one cannot
cancel the same mistake in the other.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from tests.checkpoints import comfy_text_encoder, comfy_transformer, copy_tokenizer, diffusers_state, ldm_vae
from tests.loras import lora_pairs, write_kohya
from zimage_serve.nano.random_model import TinyConfig, write_random_model

INT8_LAYER = re.compile(
    r"^(?P<layer>(?:model\.diffusion_model\.)?(?:layers|noise_refiner|context_refiner)\.\d+\."
    r"(?:attention\.qkv|attention\.out|feed_forward\.w[123]|adaLN_modulation\.0))\.weight$"
)
FP8_LAYER = re.compile(r"^(?P<layer>model\.layers\.(?P<block>\d+)\.(?:self_attn|mlp)\.\w+_proj)\.weight$")
PREFIX = "model.diffusion_model."
GROUP = 16  # divides every quantised layer's input width of the tiny model (48, 128), as 256 does Turbo's
# dim 48: its feed-forward is 128 wide, so every layer the published file quantises can be rotated here too
TINY_QUANT = TinyConfig(
    transformer={"dim": 48, "n_layers": 2, "n_refiner_layers": 1, "n_heads": 1, "n_kv_heads": 1, "cap_feat_dim": 32}
)
TURBO_BF16 = "z_image_turbo_bf16.safetensors"
TURBO_INT8 = "z_image_turbo_int8_convrot.safetensors"
BASE_INT8 = "z_image_int8_convrot.safetensors"
TE_BF16 = "qwen_3_4b.safetensors"
TE_FP8 = "qwen_3_4b_fp8_mixed.safetensors"
_REGULAR_4 = np.array([[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]], dtype=np.float64)


def hadamard_by_digits(group: int) -> np.ndarray:
    """H_G entry by entry: the product, over the base-4 digits of row and column, of the 4×4 regular
    Hadamard matrix's entries, over √G (the Kronecker power, computed another way)."""
    digits = round(np.log(group) / np.log(4))
    assert 4**digits == group
    index = np.arange(group)
    matrix = np.ones((group, group))
    for position in range(digits):
        row, column = (index // 4**position) % 4, (index // 4**position) % 4
        matrix *= _REGULAR_4[row[:, None], column[None, :]]
    return matrix / np.sqrt(group)


def int8_convrot(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes of the weight rotated per group of input columns, float32 scale per row [out, 1])."""
    w = weight.double().numpy()
    out, width = w.shape
    rotated = (w.reshape(out, width // group, group) @ hadamard_by_digits(group).T).reshape(out, width)
    scale = np.maximum(np.abs(rotated).max(axis=1, keepdims=True) / 127.0, 1e-30)
    codes = np.clip(np.round(rotated / scale), -128, 127).astype(np.int8)  # numpy rounds half to even
    return torch.from_numpy(codes), torch.from_numpy(scale.astype(np.float32))


def fp8_tensorwise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn codes, float32 0-d scale) with scale = max|W| / 448."""
    w = weight.double()
    scale = (w.abs().max() / 448.0).float()
    return (w / scale.double()).clamp(-448, 448).to(torch.float8_e4m3fn), scale.reshape(())


def marker(conf: dict[str, object]) -> torch.Tensor:
    return torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)


def write_int8_convrot(
    comfy_state: dict[str, torch.Tensor], path: Path, group: int, header_metadata: bool = False
) -> dict[str, dict[str, object]]:
    """The INT8 ConvRot file of a ComfyUI-layout transformer state; returns each quantised layer's conf.
    With `header_metadata` the confs are also in the header's `_quantization_metadata`, as tools that save
    both write them."""
    out: dict[str, torch.Tensor] = {}
    confs: dict[str, dict[str, object]] = {}
    for key, value in comfy_state.items():
        match = INT8_LAYER.match(key)
        if match is None:
            out[key] = value.float().contiguous()
            continue
        layer = match["layer"]
        conf: dict[str, object] = {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": group}
        out[key], out[f"{layer}.weight_scale"] = int8_convrot(value, group)
        out[f"{layer}.comfy_quant"] = marker(conf)
        confs[layer] = conf
    metadata = (
        {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": confs})} if header_metadata else None
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, path, metadata=metadata)
    return confs


def write_fp8_mixed(comfy_state: dict[str, torch.Tensor], path: Path) -> list[str]:
    """The FP8-mixed file of a ComfyUI-layout (`model.`) Qwen3 state; returns the FP8 layers."""
    blocks = {int(m["block"]) for key in comfy_state if (m := FP8_LAYER.match(key))}
    kept = {min(blocks), max(blocks)}
    out: dict[str, torch.Tensor] = {}
    layers = []
    for key, value in comfy_state.items():
        match = FP8_LAYER.match(key)
        if match is None or int(match["block"]) in kept:
            out[key] = value.to(torch.bfloat16).contiguous()
            continue
        layer = match["layer"]
        out[key], out[f"{layer}.weight_scale"] = fp8_tensorwise(value)
        out[f"{layer}.comfy_quant"] = marker({"format": "float8_e4m3fn"})
        layers.append(layer)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, path)
    return layers


def write_quant_models_root(root: Path) -> Path:
    """A ComfyUI models root with every file the official Z-Image templates name, in their layouts: the
    bf16 Turbo transformer, the INT8 ConvRot Turbo and base transformers (the base one with its confs in the
    header too), the bf16 and FP8-mixed text encoders, the VAE; a tokenizer beside the text encoders (the
    published files carry none) and a LoRA."""
    tiny = write_random_model(root.parent / "Z-Image-Tiny-48", TINY_QUANT, seed=3)
    for sub in ("diffusion_models", "text_encoders", "vae", "loras"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    transformer = comfy_transformer(diffusers_state(tiny / "transformer"), PREFIX)
    save_file({k: v.contiguous() for k, v in transformer.items()}, root / "diffusion_models" / TURBO_BF16)
    write_int8_convrot(transformer, root / "diffusion_models" / TURBO_INT8, GROUP)
    write_int8_convrot(transformer, root / "diffusion_models" / BASE_INT8, GROUP, header_metadata=True)
    text_encoder = comfy_text_encoder(diffusers_state(tiny / "text_encoder"))
    save_file({k: v.contiguous() for k, v in text_encoder.items()}, root / "text_encoders" / TE_BF16)
    write_fp8_mixed(text_encoder, root / "text_encoders" / TE_FP8)
    copy_tokenizer(tiny, root / "text_encoders" / "tokenizer")
    levels = len(json.loads((tiny / "vae" / "config.json").read_text())["block_out_channels"])
    save_file(ldm_vae(diffusers_state(tiny / "vae"), levels), root / "vae" / "ae.safetensors")
    write_kohya(lora_pairs(diffusers_state(tiny / "transformer")), root / "loras" / "style.safetensors")
    return root
