"""ComfyUI's upscale-model nodes: load an ESRGAN-family model from models/upscale_models, upscale with it."""

from __future__ import annotations

from typing import Any

from zimage_serve.errors import GenerationCancelled
from zimage_serve.workflow.context import Interrupted, NodeContext
from zimage_serve.workflow.spec import Combo, Node, NodeResult, Output, link


class UpscaleModelLoader(Node):
    display_name = "Load Upscale Model"
    category = "loaders"
    description = "Loads an upscale model (ESRGAN, Real-ESRGAN, SwinIR, ...; .safetensors or .pth) with spandrel."
    required = {"model_name": Combo(resource="upscale_models")}
    outputs = (Output("UPSCALE_MODEL"),)

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        from zimage_serve.engine.upscale import load_upscale_model

        return NodeResult((load_upscale_model(ctx.folders.resolve("upscale_models", inputs["model_name"])),))


class ImageUpscaleWithModel(Node):
    display_name = "Upscale Image (using Model)"
    category = "image/upscaling"
    required = {"upscale_model": link("UPSCALE_MODEL"), "image": link("IMAGE")}
    outputs = (Output("IMAGE"),)

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        from zimage_serve.engine.cancel import cancellable
        from zimage_serve.engine.upscale import upscale
        from zimage_serve.limits import enforce

        model, image = inputs["upscale_model"], inputs["image"]
        enforce(ctx.limits, "pixels", image.shape[1] * image.shape[2] * model.scale**2, "image")
        try:
            with cancellable(ctx.interrupted):
                return NodeResult((upscale(model, image, ctx.placement.device, ctx.placement.residency),))
        except GenerationCancelled as exc:
            raise Interrupted(str(exc)) from exc
