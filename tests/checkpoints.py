"""Tiny checkpoints in each official layout, written the way the published files are.

The diffusers folder comes from the project's random-model writer. The ComfyUI files are derived from
it here with an independent, hand-written mapping (the inverse of what the loader applies), so a bug
in the loader's mapping cannot cancel itself out.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

COMFY_PREFIX = "model.diffusion_model."


def diffusers_state(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of one component folder, shards or not."""
    index = next(folder.glob("*.safetensors.index.json"), None)
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index
        else [p.name for p in folder.glob("*.safetensors")]
    )
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(folder / name))
    return state


def comfy_transformer(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if re.search(r"\.attention\.to_[kv]\.weight$", key):
            continue
        if key.endswith(".attention.to_q.weight"):
            base = key.removesuffix("to_q.weight")
            fused = torch.cat([value, state[base + "to_k.weight"], state[base + "to_v.weight"]])
            out[base + "qkv.weight"] = fused
            continue
        new = (
            key.replace(".attention.to_out.0.", ".attention.out.")
            .replace(".attention.norm_q.", ".attention.q_norm.")
            .replace(".attention.norm_k.", ".attention.k_norm.")
            .replace("all_x_embedder.2-1.", "x_embedder.")
            .replace("all_final_layer.2-1.", "final_layer.")
        )
        out[new] = value
    return {prefix + key: value for key, value in out.items()}


def comfy_text_encoder(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"model.{key}": value for key, value in state.items()}


def ldm_vae(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL names -> the original (BFL ae.safetensors) names."""
    out: dict[str, torch.Tensor] = {}
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for key, value in state.items():
        new = key
        new = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", new)
        new = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        new = re.sub(
            r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
            lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.",
            new,
        )
        new = re.sub(
            r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
            lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.",
            new,
        )
        new = re.sub(
            r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.", new
        )
        new = new.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        match = re.match(
            r"^(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(\w+)$", new
        )
        if match:
            new = f"{match[1]}.mid.attn_1.{attn[match[2]]}.{match[3]}"
            if value.ndim == 2:
                value = value[:, :, None, None]  # the original stores these as 1x1 convolutions
        out[new] = value.contiguous()
    return out


def write_comfy_root(diffusers_folder: Path, root: Path, prefix: str = "") -> Path:
    """A ComfyUI models/ folder holding the template's file names, converted from `diffusers_folder`."""
    for sub in ("diffusion_models", "text_encoders", "vae", "loras"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    save_file(
        comfy_transformer(diffusers_state(diffusers_folder / "transformer"), prefix),
        root / "diffusion_models" / "z_image_turbo_bf16.safetensors",
    )
    save_file(
        comfy_text_encoder(diffusers_state(diffusers_folder / "text_encoder")),
        root / "text_encoders" / "qwen_3_4b.safetensors",
    )
    levels = len(json.loads((diffusers_folder / "vae" / "config.json").read_text())["block_out_channels"])
    save_file(ldm_vae(diffusers_state(diffusers_folder / "vae"), levels), root / "vae" / "ae.safetensors")
    return root


def copy_tokenizer(diffusers_folder: Path, destination: Path) -> Path:
    shutil.copytree(diffusers_folder / "tokenizer", destination)
    return destination
