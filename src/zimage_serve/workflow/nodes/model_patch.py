"""ComfyUI's model-patch nodes for the Z-Image Fun ControlNet Union: load a patch, apply it to a MODEL."""

from __future__ import annotations

from typing import Any

from zimage_serve.workflow.context import NodeContext
from zimage_serve.workflow.spec import Combo, Float, Node, NodeResult, Output, link

STRENGTH = Float(default=1.0, min=-10.0, max=10.0, step=0.01)


class ModelPatchLoader(Node):
    category = "advanced/loaders"
    description = (
        "Loads a model patch from models/model_patches: a Z-Image Fun ControlNet Union file (1.0, 2.0, "
        "2.1, 2.1 lite) or a diffusers ZImageControlNetModel folder."
    )
    experimental = True
    required = {"name": Combo(resource="model_patches")}
    outputs = (Output("MODEL_PATCH"),)

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        from zimage_serve.engine.controlnet import load_controlnet

        name = inputs["name"]
        return NodeResult((load_controlnet(name, ctx.folders.resolve("model_patches", name), ctx.placement),))


class QwenImageDiffsynthControlnet(Node):
    category = "advanced/loaders/qwen"
    description = (
        "Steers the model with a ControlNet model patch and a control image (canny, HED, depth, pose, MLSD). "
        "With an inpainting patch (2.x), the mask (white = regenerate) marks what may change."
    )
    experimental = True
    required = {
        "model": link("MODEL"),
        "model_patch": link("MODEL_PATCH"),
        "vae": link("VAE"),
        "image": link("IMAGE"),
        "strength": STRENGTH,
    }
    optional = {"mask": link("MASK")}
    outputs = (Output("MODEL"),)

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        return NodeResult((_steered(**inputs),))


class ZImageFunControlnet(QwenImageDiffsynthControlnet):
    category = "advanced/loaders/zimage"
    description = (
        "Steers the model with a Z-Image Fun ControlNet: a control image, an image to inpaint and its mask "
        "(white = regenerate), or both. Each optional image is fitted to the latent's size."
    )
    required = {k: v for k, v in QwenImageDiffsynthControlnet.required.items() if k != "image"}
    optional = {"image": link("IMAGE"), "inpaint_image": link("IMAGE"), "mask": link("MASK")}


def _steered(
    model: Any,
    model_patch: Any,
    vae: Any,
    strength: float,
    image: Any = None,
    inpaint_image: Any = None,
    mask: Any = None,
) -> Any:
    from zimage_serve.engine.control_patch import ControlPatch

    patch = ControlPatch(model_patch, vae, strength, image=image, inpaint_image=inpaint_image, mask=mask)
    return model.with_control(patch)
