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

INT8_LAYER = re.compile(
    r"^(?P<layer>(?:model\.diffusion_model\.)?(?:layers|noise_refiner|context_refiner)\.\d+\."
    r"(?:attention\.qkv|attention\.out|feed_forward\.w[123]|adaLN_modulation\.0))\.weight$"
)
FP8_LAYER = re.compile(r"^(?P<layer>model\.layers\.(?P<block>\d+)\.(?:self_attn|mlp)\.\w+_proj)\.weight$")
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
