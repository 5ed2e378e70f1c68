"""The engine: Z-Image-Turbo's components loaded from any layout, run as a staged pipeline."""

from __future__ import annotations

from pathlib import Path

from zimage_serve.engine.fastpath import FastPath
from zimage_serve.engine.layouts import ModelSources, resolve
from zimage_serve.engine.loader import LoadedModel, load_model
from zimage_serve.engine.params import GenerationParams
from zimage_serve.engine.pipeline import GenerationResult, PromptEmbedding, StepInfo, ZImageEngine

__all__ = [
    "FastPath",
    "GenerationParams",
    "GenerationResult",
    "LoadedModel",
    "ModelSources",
    "PromptEmbedding",
    "StepInfo",
    "ZImageEngine",
    "open_engine",
]


def open_engine(
    model: Path,
    *,
    text_encoder: Path | None = None,
    vae: Path | None = None,
    tokenizer: Path | None = None,
    device: str = "auto",
    dtype: str = "auto",
    memory_mode: str = "auto",
    fast: FastPath | None = None,
    weight_dtype: str = "default",
) -> ZImageEngine:
    sources = resolve(model, text_encoder=text_encoder, vae=vae, tokenizer=tokenizer)
    loaded = load_model(sources, device=device, dtype=dtype, memory_mode=memory_mode, weight_dtype=weight_dtype)
    return ZImageEngine(loaded, native_size=sources.native_size, fast=fast)
