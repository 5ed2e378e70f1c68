"""Loading a whole model: check every component first, then read each onto its device."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from zimage_serve.engine import components
from zimage_serve.engine.components import PreparedComponent
from zimage_serve.engine.devices import Placement, pick_device, pick_dtypes, pick_memory_mode
from zimage_serve.engine.layouts import ModelSources
from zimage_serve.engine.offload import OffloadHooks, apply_memory_mode
from zimage_serve.errors import ModelLoadError

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    sources: ModelSources
    placement: Placement
    transformer: Any  # diffusers ZImageTransformer2DModel
    text_encoder: Any  # transformers Qwen3Model
    vae: Any  # diffusers AutoencoderKL
    tokenizer: PreTrainedTokenizerBase
    hooks: OffloadHooks = field(default_factory=OffloadHooks)


def prepare_all(sources: ModelSources) -> dict[str, PreparedComponent]:
    """Header and config checks for the three weight files, and that they fit together."""
    prepared = {
        "transformer": components.prepare(sources.transformer),
        "text_encoder": components.prepare(sources.text_encoder),
        "vae": components.prepare(sources.vae),
    }
    transformer, te, vae = (prepared[k] for k in ("transformer", "text_encoder", "vae"))
    if te.config["hidden_size"] != transformer.config["cap_feat_dim"]:
        raise ModelLoadError(
            te.checkpoint.origin,
            f"this text encoder gives {te.config['hidden_size']}-wide features but the diffusion model "
            f"({transformer.checkpoint.origin.name}) expects {transformer.config['cap_feat_dim']}",
        )
    if vae.config["latent_channels"] != transformer.config["in_channels"]:
        raise ModelLoadError(
            vae.checkpoint.origin,
            f"this VAE has {vae.config['latent_channels']} latent channels but the diffusion model "
            f"expects {transformer.config['in_channels']}",
        )
    return prepared


def load_tokenizer(folder: Path, vocab_size: int) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # transformers raises many types for a broken folder
        raise ModelLoadError(folder, f"cannot load the tokenizer: {exc}") from exc
    if len(tokenizer) > vocab_size:
        raise ModelLoadError(
            folder, f"the tokenizer has {len(tokenizer)} tokens but the text encoder only embeds {vocab_size}"
        )
    return tokenizer


def load_model(
    sources: ModelSources,
    device: str = "auto",
    dtype: str = "auto",
    memory_mode: str = "auto",
    placement: Placement | None = None,
) -> LoadedModel:
    """Check, place and load. An explicit `placement` overrides the device/dtype/mode choice."""
    prepared = prepare_all(sources)
    tokenizer = load_tokenizer(sources.tokenizer, prepared["text_encoder"].config["vocab_size"])
    if placement is None:
        placement = choose_placement(prepared, device, dtype, memory_mode)
    log.info("loading %s (%s) on %s", sources.name, sources.layout, placement.describe())
    loaded = LoadedModel(
        sources=sources,
        placement=placement,
        transformer=components.load(prepared["transformer"], placement.load_device, placement.dtype),
        text_encoder=components.load(prepared["text_encoder"], placement.load_device, placement.dtype),
        vae=components.load(prepared["vae"], placement.load_device, placement.vae_dtype),
        tokenizer=tokenizer,
    )
    loaded.hooks = apply_memory_mode(placement, [loaded.text_encoder, loaded.transformer, loaded.vae])
    return loaded


def choose_placement(prepared: dict[str, PreparedComponent], device: str, dtype: str, memory_mode: str) -> Placement:
    target = pick_device(device)
    model_dtype, vae_dtype = pick_dtypes(target, dtype)
    weight_bytes = sum(_bytes_at(p, model_dtype) for p in prepared.values())
    return Placement(target, model_dtype, vae_dtype, pick_memory_mode(target, memory_mode, weight_bytes))


def _bytes_at(prepared: PreparedComponent, dtype: torch.dtype) -> int:
    """Size once loaded in `dtype`, which may differ from the stored dtype."""
    element = torch.empty((), dtype=dtype).element_size()
    return element * sum(info.numel for info in prepared.checkpoint.tensors.values())
