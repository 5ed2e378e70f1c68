"""Loading a whole model: check every component first, then read each onto its device."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from zimage_serve.engine import activations, components
from zimage_serve.engine.components import PreparedComponent
from zimage_serve.engine.devices import MemoryMode, pick_device, pick_dtypes, pick_memory_mode
from zimage_serve.engine.fastpath import FastPath, int8_matmul_enabled
from zimage_serve.engine.fp8 import check_weight_dtype, fp8_bytes_saved, quantise_transformer
from zimage_serve.engine.layouts import ModelSources
from zimage_serve.engine.libraries import load_model_libraries
from zimage_serve.engine.placement import Placement
from zimage_serve.engine.residency import Residency
from zimage_serve.errors import ModelLoadError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    sources: ModelSources
    placement: Placement
    transformer: Any  # diffusers ZImageTransformer2DModel
    text_encoder: Any  # transformers Qwen3Model
    vae: Any  # diffusers AutoencoderKL
    tokenizer: PreTrainedTokenizerBase

    @property
    def residency(self) -> Residency | None:
        """Smart memory's, when in use."""
        return self.placement.residency


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
    # transformers is imported with the first model, not with the engine (engine/libraries.py).
    load_model_libraries()
    from transformers import AutoTokenizer

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
    weight_dtype: str = "default",
    fast: FastPath | None = None,
) -> LoadedModel:
    """Check, place and load. An explicit `placement` overrides the device/dtype/mode choice; `fast` says
    whether INT8 weight files multiply in INT8."""
    check_weight_dtype(weight_dtype)
    prepared = prepare_all(sources)
    tokenizer = load_tokenizer(sources.tokenizer, prepared["text_encoder"].config["vocab_size"])
    if placement is None:
        placement = choose_placement(prepared, device, dtype, memory_mode, weight_dtype)
    log.info("loading %s (%s) on %s", sources.name, sources.layout, placement.describe())
    loaded = LoadedModel(
        sources=sources,
        placement=placement,
        transformer=load_transformer(
            prepared["transformer"],
            placement.load_device,
            placement.dtype,
            weight_dtype,
            int8_matmul_enabled(fast or FastPath(), placement.device),
        ),
        text_encoder=components.load(prepared["text_encoder"], placement.load_device, placement.dtype),
        vae=components.load(prepared["vae"], placement.load_device, placement.vae_dtype),
        tokenizer=tokenizer,
    )
    if placement.memory_mode is MemoryMode.SMART:
        manage(loaded, placement.residency or Residency(placement.device))
    return loaded


def manage(loaded: LoadedModel, residency: Residency) -> LoadedModel:
    """Hand the model's components (loaded in host memory) to smart memory."""
    text, transformer, vae = loaded.text_encoder, loaded.transformer, loaded.vae
    residency.add(text, "text encoder", activations.text_encoder(text.config), one_pass=True)
    residency.add(transformer, "transformer", activations.transformer(transformer.config))
    residency.add(vae, "VAE", activations.vae(vae.config))
    loaded.placement = replace(loaded.placement, residency=residency)
    return loaded


def load_transformer(
    prepared: PreparedComponent, device: torch.device, dtype: torch.dtype, weight_dtype: str, int8_matmul: bool = False
) -> Any:
    """FP8 weights are made on the host and then moved: the card never holds the bf16 copy. A file's own
    INT8 layers stay INT8 with `int8_matmul` (and are dequantised otherwise)."""
    if weight_dtype == "default":
        return components.load(prepared, device, dtype, int8_matmul)
    transformer = components.load(prepared, torch.device("cpu"), dtype, int8_matmul)
    count = quantise_transformer(transformer, weight_dtype)
    log.info("transformer: %d projections in %s", count, weight_dtype)
    return transformer.to(device)


def choose_placement(
    prepared: dict[str, PreparedComponent], device: str, dtype: str, memory_mode: str, weight_dtype: str = "default"
) -> Placement:
    target = pick_device(device)
    model_dtype, vae_dtype = pick_dtypes(target, dtype)
    weight_bytes = sum(_bytes_at(p, model_dtype) for p in prepared.values())
    element = torch.empty((), dtype=model_dtype).element_size()
    tensors = {name: info.numel for name, info in prepared["transformer"].checkpoint.tensors.items()}
    weight_bytes -= fp8_bytes_saved(tensors, weight_dtype, element)
    mode = pick_memory_mode(target, memory_mode, weight_bytes)
    return Placement(target, model_dtype, vae_dtype, weight_dtype=weight_dtype).with_memory_mode(mode)


def _bytes_at(prepared: PreparedComponent, dtype: torch.dtype) -> int:
    """Size once loaded in `dtype`, which may differ from the stored dtype."""
    element = torch.empty((), dtype=dtype).element_size()
    return element * sum(info.numel for info in prepared.checkpoint.tensors.values())
