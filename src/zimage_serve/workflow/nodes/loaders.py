"""Loader nodes: files named in a workflow become MODEL, CLIP and VAE values."""

from __future__ import annotations

from typing import Any

from zimage_serve.engine.names import WEIGHT_DTYPES
from zimage_serve.errors import ModelLoadError
from zimage_serve.workflow.context import NodeContext
from zimage_serve.workflow.spec import Combo, Float, Node, NodeResult, Output, link

CLIP_TYPES = ("lumina2",)  # Qwen3-4B for Z-Image; other families' encoders are not served here


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
        from zimage_serve.workflow.nodes.loading import load_model_file

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

            ctx = replace(ctx, placement=ctx.placement.on_cpu())
        from zimage_serve.workflow.nodes.loading import load_clip_file

        return NodeResult((load_clip_file(ctx, "text_encoders", inputs["clip_name"]),))


class VAELoader(Node):
    display_name = "Load VAE"
    category = "loaders"
    required = {"vae_name": Combo(resource="vae")}
    outputs = (Output("VAE"),)

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        from zimage_serve.workflow.nodes.loading import load_vae_file

        return NodeResult((load_vae_file(ctx, "vae", inputs["vae_name"]),))


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
        from zimage_serve.workflow.nodes.loading import load_clip_file, load_model_file, load_vae_file

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
        vae = load_vae_file(ctx, "checkpoints", name)
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
        from zimage_serve.engine.lora import load_lora

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
        from zimage_serve.engine.lora import load_lora

        lora = load_lora(ctx.folders.resolve("loras", inputs["lora_name"]))
        return NodeResult((inputs["model"].with_lora(lora, inputs["strength_model"]), inputs["clip"]))
