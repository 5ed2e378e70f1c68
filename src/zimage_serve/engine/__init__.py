"""The engine: Z-Image-Turbo's components loaded from any layout, run as a staged pipeline.

The names below are loaded on first use: importing a light submodule (`engine.names`) must not bring in
torch, diffusers and transformers, which the server process never needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

    from zimage_serve.engine.fastpath import FastPath
    from zimage_serve.engine.layouts import ModelSources
    from zimage_serve.engine.loader import LoadedModel
    from zimage_serve.engine.params import GenerationParams
    from zimage_serve.engine.pipeline import GenerationResult, StepInfo, ZImageEngine
    from zimage_serve.engine.text import PromptEmbedding

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

_WHERE = {
    "FastPath": "fastpath",
    "GenerationParams": "params",
    "GenerationResult": "pipeline",
    "LoadedModel": "loader",
    "ModelSources": "layouts",
    "PromptEmbedding": "text",
    "StepInfo": "pipeline",
    "ZImageEngine": "pipeline",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"zimage_serve.engine.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    variant: str | None = None,
) -> ZImageEngine:
    """`variant` (base or turbo) overrides what the names say (engine/variants.py)."""
    from dataclasses import replace

    from zimage_serve.engine.layouts import resolve
    from zimage_serve.engine.loader import load_model
    from zimage_serve.engine.pipeline import ZImageEngine

    sources = resolve(model, text_encoder=text_encoder, vae=vae, tokenizer=tokenizer)
    if variant is not None:
        sources = replace(sources, variant=variant)
    loaded = load_model(
        sources, device=device, dtype=dtype, memory_mode=memory_mode, weight_dtype=weight_dtype, fast=fast
    )
    return ZImageEngine(loaded, native_size=sources.native_size, fast=fast)
