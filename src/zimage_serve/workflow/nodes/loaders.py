"""Loader nodes: files named in a workflow become MODEL, CLIP and VAE values."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from zimage_serve.engine.components import ComponentSource
from zimage_serve.engine.fp8 import WEIGHT_DTYPES
from zimage_serve.engine.keymap import Kind
from zimage_serve.engine.layouts import diffusers_component, single_file
from zimage_serve.engine.lora import load_lora
from zimage_serve.engine.parts import (
    FLUX_LATENT,
    DiffusionModel,
    LatentFormat,
    TextEncoder,
    load_diffusion_model,
    load_text_encoder,
    load_vae,
)
from zimage_serve.errors import ModelLoadError
from zimage_serve.workflow.context import NodeContext
from zimage_serve.workflow.spec import Combo, Float, Node, NodeResult, Output, link
from zimage_serve.workflow.tokens import tokenizer_folder

CLIP_TYPES = ("lumina2",)  # Qwen3-4B for Z-Image; other families' encoders are not served here


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
    return load_diffusion_model(name, component(path, "transformer"), ctx.placing, latent_format_of(path), weight_dtype)


def load_clip_file(ctx: NodeContext, resource: str, name: str) -> TextEncoder:
    path = ctx.folders.resolve(resource, name)
    tokenizer = tokenizer_folder(ctx.folders, resource, name)
    return load_text_encoder(name, component(path, "text_encoder"), tokenizer, ctx.placing)


class UNETLoader(Node):
    display_name = "Load Diffusion Model"
    category = "advanced/loaders"
    description = "Loads a Z-Image diffusion model (transformer) from models/diffusion_models."
    required = {
        "unet_name": Combo(resource="diffusion_models"),
        "weight_dtype": Combo(choices=WEIGHT_DTYPES),
    }
    outputs = (Output("MODEL"),)

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        model = load_model_file(ctx, "diffusion_models", inputs["unet_name"], inputs["weight_dtype"])
        return NodeResult((model,))


class CLIPLoader(Node):
    display_name = "Load CLIP"
    category = "advanced/loaders"
    description = "Loads the text encoder. For Z-Image: Qwen3-4B (qwen_3_4b.safetensors) with type lumina2."
    required = {
        "clip_name": Combo(resource="text_encoders"),
        "type": Combo(choices=CLIP_TYPES),
    }
    optional = {"device": Combo(choices=("default", "cpu"), options={"advanced": True})}
    outputs = (Output("CLIP"),)

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        if inputs.get("device") == "cpu":
            from dataclasses import replace

            ctx = replace(ctx, placing=ctx.placing.on_cpu())
        return NodeResult((load_clip_file(ctx, "text_encoders", inputs["clip_name"]),))


class VAELoader(Node):
    display_name = "Load VAE"
    category = "loaders"
    required = {"vae_name": Combo(resource="vae")}
    outputs = (Output("VAE"),)

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        name = inputs["vae_name"]
        path = ctx.folders.resolve("vae", name)
        return NodeResult((load_vae(name, component(path, "vae"), ctx.placing),))


class CheckpointLoaderSimple(Node):
    display_name = "Load Checkpoint"
    category = "loaders"
    description = "Loads a whole model (diffusion model, text encoder and VAE) from a diffusers folder."
    required = {"ckpt_name": Combo(resource="checkpoints", tooltip="The name of the checkpoint (model) to load.")}
    outputs = (
        Output("MODEL", tooltip="The model used for denoising latents."),
        Output("CLIP", tooltip="The CLIP model used for encoding text prompts."),
        Output("VAE", tooltip="The VAE model used for encoding and decoding images to and from latent space."),
    )

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        name = inputs["ckpt_name"]
        path = ctx.folders.resolve("checkpoints", name)
        if not path.is_dir():
            raise ModelLoadError(
                path,
                "single-file checkpoints that bundle all three parts are not supported; use a diffusers folder, "
                "or UNETLoader + CLIPLoader + VAELoader with ComfyUI's split files",
            )
        model = load_model_file(ctx, "checkpoints", name)
        clip = load_clip_file(ctx, "checkpoints", name)
        vae = load_vae(name, component(path, "vae"), ctx.placing)
        return NodeResult((model, clip, vae))


STRENGTH = Float(default=1.0, min=-100.0, max=100.0, step=0.01)


class LoraLoaderModelOnly(Node):
    display_name = "LoraLoaderModelOnly"
    category = "loaders"
    description = "Applies a LoRA to the diffusion model; strength 0 leaves it unchanged."
    required = {
        "model": link("MODEL"),
        "lora_name": Combo(resource="loras"),
        "strength_model": STRENGTH,
    }
    outputs = (Output("MODEL"),)

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        lora = load_lora(ctx.folders.resolve("loras", inputs["lora_name"]))
        return NodeResult((inputs["model"].with_lora(lora, inputs["strength_model"]),))


class LoraLoader(Node):
    display_name = "Load LoRA"
    category = "loaders"
    description = (
        "Applies a LoRA to the diffusion model. Z-Image LoRAs carry no text-encoder weights, so the CLIP "
        "passes through unchanged."
    )
    required = {
        "model": link("MODEL", "The diffusion model the LoRA will be applied to."),
        "clip": link("CLIP", "The CLIP model the LoRA will be applied to."),
        "lora_name": Combo(resource="loras", tooltip="The name of the LoRA."),
        "strength_model": STRENGTH,
        "strength_clip": STRENGTH,
    }
    outputs = (Output("MODEL"), Output("CLIP"))

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        lora = load_lora(ctx.folders.resolve("loras", inputs["lora_name"]))
        return NodeResult((inputs["model"].with_lora(lora, inputs["strength_model"]), inputs["clip"]))
