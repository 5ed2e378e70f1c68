"""What the loader nodes do when they run: files become MODEL, CLIP and VAE values.

Kept apart from the node declarations (`loaders`), which the server process reads to validate prompts:
this module brings in torch, diffusers and transformers, which only the worker needs.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from zimage_serve.engine.components import ComponentSource
from zimage_serve.engine.keymap import Kind
from zimage_serve.engine.latent_preview import PREVIEWS
from zimage_serve.engine.layouts import diffusers_component, single_file
from zimage_serve.engine.parts import (
    FLUX_LATENT,
    DiffusionModel,
    LatentFormat,
    TextEncoder,
    Vae,
    load_diffusion_model,
    load_text_encoder,
    load_vae,
)
from zimage_serve.engine.trained_size import declared_size
from zimage_serve.errors import ModelLoadError
from zimage_serve.workflow.context import NodeContext
from zimage_serve.workflow.tokens import tokenizer_folder


def component(path: Path, kind: Kind) -> ComponentSource:
    """A component from a single file or from a diffusers folder (such as the built-in zimage-nano)."""
    if path.is_dir():
        return diffusers_component(path, kind)
    return single_file(kind, path)


def latent_format_of(path: Path) -> LatentFormat:
    """A diffusers folder brings its VAE's factors; ComfyUI's Z-Image files use the Flux VAE's."""
    config = path / "vae" / "config.json"
    if not path.is_dir() or not config.is_file():
        return FLUX_LATENT
    try:
        values = json.loads(config.read_text(encoding="utf-8"))
        return LatentFormat(float(values["scaling_factor"]), float(values.get("shift_factor") or 0.0))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(config, f"cannot read the latent scaling factors: {exc}") from exc


def load_model_file(ctx: NodeContext, resource: str, name: str, weight_dtype: str = "default") -> DiffusionModel:
    path = ctx.folders.resolve(resource, name)
    model = load_diffusion_model(
        name, component(path, "transformer"), ctx.placement, latent_format_of(path), weight_dtype
    )
    if not path.is_dir():
        return model
    PREVIEWS.know_file(model.latent_format, path / "vae")  # its previews' map, before its VAE is loaded
    return replace(model, trained_size=declared_size(path))


def load_vae_file(ctx: NodeContext, resource: str, name: str) -> Vae:
    """A VAE; the previews of its latent space learn their map from it (or from the map its folder brings)."""
    path = ctx.folders.resolve(resource, name)
    vae = load_vae(name, component(path, "vae"), ctx.placement)
    if not (path.is_dir() and PREVIEWS.know_file(vae.scaling, path / "vae")):
        PREVIEWS.teach(vae)
    return vae


def load_clip_file(ctx: NodeContext, resource: str, name: str) -> TextEncoder:
    path = ctx.folders.resolve(resource, name)
    tokenizer = tokenizer_folder(ctx.folders, resource, name)
    return load_text_encoder(name, component(path, "text_encoder"), tokenizer, ctx.placement)
