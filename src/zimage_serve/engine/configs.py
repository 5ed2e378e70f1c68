"""Component configs: Z-Image-Turbo's published ones, and configs inferred from tensor shapes.

ComfyUI's split files carry no config, so, as ComfyUI does, the architecture is read off the shapes of
the (already diffusers-named) tensors. Fields that shapes cannot tell take Turbo's values.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from zimage_serve.errors import ModelLoadError

TURBO_TRANSFORMER: dict[str, Any] = {
    "all_patch_size": [2],
    "all_f_patch_size": [1],
    "in_channels": 16,
    "dim": 3840,
    "n_layers": 30,
    "n_refiner_layers": 2,
    "n_heads": 30,
    "n_kv_heads": 30,
    "norm_eps": 1e-5,
    "qk_norm": True,
    "cap_feat_dim": 2560,
    "rope_theta": 256.0,
    "t_scale": 1000.0,
    "axes_dims": [32, 48, 48],
    "axes_lens": [1536, 512, 512],
}
TURBO_TEXT_ENCODER: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 2560,
    "intermediate_size": 9728,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 40960,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "attention_bias": False,
}
FLUX_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
    "force_upcast": True,
}

Shapes = Mapping[str, torch.Tensor]


def transformer_config(state: Shapes, origin: Path) -> dict[str, Any]:
    need = _need(state, origin)
    dim, cap_feat_dim = need("cap_embedder.1.weight").shape
    head_dim = need("layers.0.attention.norm_q.weight").shape[0]
    kv_dim = need("layers.0.attention.to_k.weight").shape[0]
    in_channels = need("all_x_embedder.2-1.weight").shape[1] // 4
    if head_dim % 16:
        raise ModelLoadError(origin, f"head size {head_dim} (from norm_q) cannot be split into RoPE axes")
    config = dict(TURBO_TRANSFORMER)
    config.update(
        dim=dim,
        cap_feat_dim=cap_feat_dim,
        n_heads=dim // head_dim,
        n_kv_heads=kv_dim // head_dim,
        n_layers=_count_blocks(state, "layers"),
        n_refiner_layers=_count_blocks(state, "noise_refiner"),
        in_channels=in_channels,
        axes_dims=rope_axes(head_dim),
    )
    return config


def rope_axes(head_dim: int) -> list[int]:
    """Turbo's split of a 128-wide head (32 for the sequence axis, 48 each for rows and columns), scaled."""
    return [head_dim // 4, head_dim * 3 // 8, head_dim * 3 // 8]


def text_encoder_config(state: Shapes, origin: Path) -> dict[str, Any]:
    need = _need(state, origin)
    vocab_size, hidden_size = need("embed_tokens.weight").shape
    head_dim = need("layers.0.self_attn.q_norm.weight").shape[0]
    config = dict(TURBO_TEXT_ENCODER)
    config.update(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        head_dim=head_dim,
        intermediate_size=need("layers.0.mlp.gate_proj.weight").shape[0],
        num_hidden_layers=_count_blocks(state, "layers"),
        num_attention_heads=need("layers.0.self_attn.q_proj.weight").shape[0] // head_dim,
        num_key_value_heads=need("layers.0.self_attn.k_proj.weight").shape[0] // head_dim,
    )
    return config


def vae_config(ldm_state: Shapes, origin: Path) -> dict[str, Any]:
    """From the original (BFL/LDM) key layout, before conversion: the converter needs the block counts."""
    need = _need(ldm_state, origin)
    levels = _count_blocks(ldm_state, "encoder.down")
    config = dict(FLUX_VAE)
    config.update(
        in_channels=need("encoder.conv_in.weight").shape[1],
        out_channels=need("decoder.conv_out.weight").shape[0],
        latent_channels=need("decoder.conv_in.weight").shape[1],
        block_out_channels=[need(f"encoder.down.{i}.block.0.conv2.weight").shape[0] for i in range(levels)],
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        layers_per_block=_count_blocks(ldm_state, "encoder.down.0.block"),
        use_quant_conv="quant_conv.weight" in ldm_state,
        use_post_quant_conv="post_quant_conv.weight" in ldm_state,
        mid_block_add_attention="encoder.mid.attn_1.q.weight" in ldm_state,
    )
    return config


def _need(state: Shapes, origin: Path) -> Any:
    def get(key: str) -> torch.Tensor:
        if key not in state:
            raise ModelLoadError(origin, f"missing tensor {key!r}, needed to work out the model's size")
        return state[key]

    return get


def _count_blocks(state: Shapes, prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    indices = {int(m.group(1)) for key in state if (m := pattern.match(key))}
    return max(indices) + 1 if indices else 0
