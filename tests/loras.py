"""Tiny LoRA files for the tiny transformer, in the layouts Z-Image LoRAs are published in."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file

TARGETS = re.compile(r"^layers\.\d+\.(attention\.to_[qkv]|attention\.to_out\.0|feed_forward\.w[123])\.weight$")


def lora_pairs(
    transformer_state: dict[str, torch.Tensor], rank: int = 4, seed: int = 0, scale: float = 0.5
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module name → (down A [rank, in], up B [out, rank]) for the main blocks' linear layers."""
    generator = torch.Generator().manual_seed(seed)
    pairs = {}
    for key, weight in sorted(transformer_state.items()):
        if TARGETS.match(key):
            out_features, in_features = weight.shape
            down = torch.randn((rank, in_features), generator=generator) * scale
            up = torch.randn((out_features, rank), generator=generator) * scale
            pairs[key.removesuffix(".weight")] = (down, up)
    return pairs


def write_diffusers(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], path: Path) -> Path:
    """ai-toolkit / PEFT: diffusion_model.<module>.lora_A.weight and lora_B.weight."""
    state = {}
    for module, (down, up) in pairs.items():
        state[f"diffusion_model.{module}.lora_A.weight"] = down
        state[f"diffusion_model.{module}.lora_B.weight"] = up
    save_file(state, path)
    return path


def write_kohya(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], path: Path, alpha: float | None = None) -> Path:
    """sd-scripts: lora_unet_<module with underscores>.lora_down/lora_up.weight and .alpha (= rank: scale 1)."""
    state = {}
    for module, (down, up) in pairs.items():
        name = "lora_unet_" + module.replace(".", "_")
        state[f"{name}.lora_down.weight"] = down
        state[f"{name}.lora_up.weight"] = up
        state[f"{name}.alpha"] = torch.tensor(float(alpha if alpha is not None else down.shape[0]))
    save_file(state, path)
    return path


def write_comfy(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], path: Path) -> Path:
    """ComfyUI's own module names: one fused attention.qkv (shared A, stacked B) and attention.out."""
    state = {}
    blocks = sorted({m.rsplit(".attention.", 1)[0] for m in pairs if ".attention." in m})
    for block in blocks:
        q, k, v = (pairs[f"{block}.attention.to_{p}"] for p in "qkv")
        if not (torch.equal(q[0], k[0]) and torch.equal(q[0], v[0])):
            raise ValueError("a fused qkv LoRA needs one shared down matrix")
        state[f"diffusion_model.{block}.attention.qkv.lora_A.weight"] = q[0]
        state[f"diffusion_model.{block}.attention.qkv.lora_B.weight"] = torch.cat([q[1], k[1], v[1]])
        down, up = pairs[f"{block}.attention.to_out.0"]
        state[f"diffusion_model.{block}.attention.out.lora_A.weight"] = down
        state[f"diffusion_model.{block}.attention.out.lora_B.weight"] = up
    for module, (down, up) in pairs.items():
        if ".feed_forward." in module:
            state[f"diffusion_model.{module}.lora_A.weight"] = down
            state[f"diffusion_model.{module}.lora_B.weight"] = up
    save_file(state, path)
    return path


def shared_qkv_down(
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The same LoRA with to_k/to_v using to_q's down matrix, expressible in the fused layout."""
    shared = dict(pairs)
    for module in pairs:
        if module.endswith(".attention.to_q"):
            block = module.removesuffix(".to_q")
            for p in "kv":
                shared[f"{block}.to_{p}"] = (pairs[module][0].clone(), pairs[f"{block}.to_{p}"][1])
    return shared
