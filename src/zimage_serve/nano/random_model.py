"""A random-weight model of Z-Image's exact architecture, written as an official diffusers folder.

It is the starting point of zimage-nano's training, the stand-in default until trained weights ship,
and what the tests build their checkpoints from. Every weight is drawn at random (no zero-initialised
layer), so a mis-mapped tensor anywhere changes the output.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
from transformers import Qwen3Config, Qwen3Model

from zimage_serve.engine import configs
from zimage_serve.engine.construction import building
from zimage_serve.engine.schedule import TURBO_SCHEDULER_CONFIG
from zimage_serve.nano import scenes
from zimage_serve.nano.tokenizer import train_tokenizer

if TYPE_CHECKING:
    from zimage_serve.engine.loader import LoadedModel


@dataclass(frozen=True)
class TinyConfig:
    """Sizes of each component; field names follow the diffusers / transformers configs."""

    transformer: dict[str, Any] = field(
        default_factory=lambda: {
            "dim": 64,
            "n_layers": 2,
            "n_refiner_layers": 1,
            "n_heads": 2,
            "n_kv_heads": 2,
            "cap_feat_dim": 32,
        }
    )
    text_encoder: dict[str, Any] = field(
        default_factory=lambda: {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "max_position_embeddings": 1024,
        }
    )
    vae: dict[str, Any] = field(default_factory=lambda: {"block_out_channels": [32, 32, 32, 32], "layers_per_block": 1})
    vocab_size: int = 384
    native_size: int = 64


def caption_corpus(lines: int = 400) -> list[str]:
    """zimage-nano's own captions, English and Chinese: enough for a byte-level BPE to find merges."""
    rng = random.Random(0)
    return [
        scenes.caption(scenes.random_scene(rng), language, rng)
        for _ in range(lines // 2)
        for language in scenes.LANGUAGES
    ]


def transformer_config(tiny: TinyConfig) -> dict[str, Any]:
    config = dict(configs.TURBO_TRANSFORMER)
    config.update(tiny.transformer)
    head_dim = config["dim"] // config["n_heads"]
    config["axes_dims"] = configs.rope_axes(head_dim)
    return config


def text_encoder_config(tiny: TinyConfig, vocab_size: int) -> dict[str, Any]:
    return {**configs.TURBO_TEXT_ENCODER, **tiny.text_encoder, "vocab_size": vocab_size}


def vae_config(tiny: TinyConfig) -> dict[str, Any]:
    config = {**configs.FLUX_VAE, **tiny.vae}
    levels = len(config["block_out_channels"])
    config.update(down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels)
    return config


def write_random_model(
    folder: Path,
    tiny: TinyConfig | None = None,
    seed: int = 0,
    max_shard_size: str | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Write the five components and `model_index.json` under `folder`; return `folder`."""
    tiny = tiny or TinyConfig()
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)

    tokenizer = train_tokenizer(caption_corpus(), tiny.vocab_size)
    tokenizer.save_pretrained(folder / "tokenizer")

    with building():
        transformer = ZImageTransformer2DModel.from_config(transformer_config(tiny))
        text_encoder = Qwen3Model(Qwen3Config(**text_encoder_config(tiny, len(tokenizer))))
        vae = AutoencoderKL.from_config(vae_config(tiny))

    shard = {"max_shard_size": max_shard_size} if max_shard_size else {}
    for name, module in (("transformer", transformer), ("text_encoder", text_encoder), ("vae", vae)):
        randomise(module, generator)
        module.to(dtype)
        module.save_pretrained(folder / name, safe_serialization=True, **shard)
    FlowMatchEulerDiscreteScheduler.from_config(TURBO_SCHEDULER_CONFIG).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(model_index(tiny.native_size), indent=2) + "\n")
    return folder


def model_index(native_size: int | None = None) -> dict[str, Any]:
    extra = {"_zimage_serve": {"variant": "turbo", **({"native_size": native_size} if native_size else {})}}
    return {
        **extra,
        "_class_name": "ZImagePipeline",
        "_diffusers_version": "0.36.0.dev0",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen3Model"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "ZImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def build_random_model(
    device: torch.device, dtype: torch.dtype, tiny: TinyConfig | None = None, seed: int = 0
) -> LoadedModel:
    """The whole model built in memory on `device` with random weights; `tiny=None` gives Turbo's full
    sizes (6.2 B transformer, 4 B text encoder): the same work per image as the real weights, for
    benchmarks on machines that cannot download them. The tokenizer is zimage-nano's (a byte-level BPE
    with Qwen's chat template); token ids index the random embedding like any others."""
    from transformers import AutoTokenizer

    from zimage_serve.engine.components import ComponentSource
    from zimage_serve.engine.devices import MemoryMode
    from zimage_serve.engine.layouts import ModelSources
    from zimage_serve.engine.loader import LoadedModel
    from zimage_serve.engine.placement import Placement
    from zimage_serve.nano.default import SHIPPED

    tokenizer = AutoTokenizer.from_pretrained(str(SHIPPED / "tokenizer"))
    if tiny is None:
        transformer_settings = dict(configs.TURBO_TRANSFORMER)
        te_settings = dict(configs.TURBO_TEXT_ENCODER)
        vae_settings = dict(configs.FLUX_VAE)
        native = 1024
    else:
        transformer_settings = transformer_config(tiny)
        te_settings = text_encoder_config(tiny, len(tokenizer))
        vae_settings = vae_config(tiny)
        native = tiny.native_size
    generator = torch.Generator(device).manual_seed(seed)
    with building(), torch.device(device):
        transformer = ZImageTransformer2DModel.from_config(transformer_settings).to(dtype)
        text_encoder = Qwen3Model(Qwen3Config(**te_settings)).to(dtype)
        vae = AutoencoderKL.from_config(vae_settings).to(dtype)
    for module in (transformer, text_encoder, vae):
        randomise(module, generator)
        module.eval().requires_grad_(False)
    memory = Path("<random weights in memory>")
    sources = ModelSources(
        name="z-image-turbo (random weights)" if tiny is None else "tiny (random weights)",
        layout="in memory",
        transformer=ComponentSource("transformer", memory, transformer_settings),
        text_encoder=ComponentSource("text_encoder", memory, te_settings),
        vae=ComponentSource("vae", memory, vae_settings),
        tokenizer=SHIPPED / "tokenizer",
        scheduler_config=dict(TURBO_SCHEDULER_CONFIG),
        native_size=native,
    )
    placement = Placement(device, dtype, dtype, MemoryMode.GPU)
    return LoadedModel(sources, placement, transformer, text_encoder, vae, tokenizer)


@torch.no_grad()
def randomise(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Scaled Gaussian weights everywhere, drawn where the weights already are (a 6 B model never visits
    the host); norm scales near one so activations stay in range."""
    for name, param in module.named_parameters():
        if "norm" in name and name.endswith("weight"):
            param.normal_(1.0, 0.1, generator=generator)
        elif param.ndim >= 2:
            param.normal_(0.0, 1.0 / math.sqrt(math.prod(param.shape[1:])), generator=generator)
        else:
            param.normal_(0.0, 0.02, generator=generator)
