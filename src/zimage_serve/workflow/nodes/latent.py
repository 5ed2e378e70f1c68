"""ComfyUI's latent nodes: empty latents to start from, inpaint latents with noise masks, upscaling, batching."""

from __future__ import annotations

from typing import Any, ClassVar

from zimage_serve.workflow.context import NodeContext
from zimage_serve.workflow.nodes.image import vae_encoded
from zimage_serve.workflow.spec import (
    MAX_RESOLUTION,
    Boolean,
    Combo,
    Float,
    Int,
    Node,
    NodeResult,
    Output,
    SizedNode,
    link,
)

BATCH = Int(default=1, min=1, max=4096, limit="batch", tooltip="The number of latent images in the batch.")


class EmptyLatent(SizedNode):
    """An empty latent of a size in pixels: its pixels per image count against the limit, and the models
    draw it, so its sides are bounded as everywhere else."""

    channels: ClassVar[int] = 16
    drawn = True

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        self.enforce_demands(ctx.limits, inputs)
        return NodeResult((empty_latent(self.channels, inputs["width"], inputs["height"], inputs["batch_size"]),))


def empty_latent(channels: int, width: int, height: int, batch_size: int) -> dict[str, Any]:
    import torch

    return {"samples": torch.zeros((batch_size, channels, height // 8, width // 8), dtype=torch.float32)}


class EmptySD3LatentImage(EmptyLatent):
    category = "latent/sd3"
    description = "An empty 16-channel latent (the Flux VAE's, as Z-Image uses) of the given size."
    required = {
        "width": Int(default=1024, min=16, max=MAX_RESOLUTION, step=16),
        "height": Int(default=1024, min=16, max=MAX_RESOLUTION, step=16),
        "batch_size": BATCH,
    }
    outputs = (Output("LATENT"),)


class EmptyLatentImage(EmptyLatent):
    display_name = "Empty Latent Image"
    category = "latent"
    description = "An empty 4-channel latent; samplers widen an empty latent to the model's channels."
    required = {
        "width": Int(
            default=512, min=16, max=MAX_RESOLUTION, step=8, tooltip="The width of the latent images in pixels."
        ),
        "height": Int(
            default=512, min=16, max=MAX_RESOLUTION, step=8, tooltip="The height of the latent images in pixels."
        ),
        "batch_size": BATCH,
    }
    outputs = (Output("LATENT", tooltip="The empty latent image batch."),)
    channels = 4


LATENT_UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "bislerp")


class SetLatentNoiseMask(Node):
    display_name = "Set Latent Noise Mask"
    category = "latent/inpaint"
    description = "Samplers regenerate only where the mask is white; elsewhere the latent stays as it is."
    required = {"samples": link("LATENT"), "mask": link("MASK")}
    outputs = (Output("LATENT"),)

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        mask = inputs["mask"]
        return NodeResult(({**inputs["samples"], "noise_mask": mask.reshape(-1, 1, *mask.shape[-2:])},))


def _inpaint_pixels(pixels: Any, mask: Any) -> tuple[Any, Any, Any]:
    """ComfyUI's inpaint preparation: the mask at the image's size, both cut to whole latent cells (centred),
    and the pixels with the masked region (mask rounded) set to grey."""
    import torch

    height, width = pixels.shape[1], pixels.shape[2]
    mask = torch.nn.functional.interpolate(
        mask.float().reshape(-1, 1, *mask.shape[-2:]), size=(height, width), mode="bilinear"
    )
    cut_h, cut_w = height // 8 * 8, width // 8 * 8
    if (cut_h, cut_w) != (height, width):
        top, left = (height % 8) // 2, (width % 8) // 2
        pixels = pixels[:, top : top + cut_h, left : left + cut_w, :]
        mask = mask[:, :, top : top + cut_h, left : left + cut_w]
    keep = (1.0 - mask.round()).squeeze(1).unsqueeze(-1)
    grey = (pixels[..., :3].float() - 0.5) * keep + 0.5
    return pixels, mask, grey


class VAEEncodeForInpaint(Node):
    display_name = "VAE Encode (for Inpainting)"
    category = "latent/inpaint"
    description = (
        "Encodes the image with its masked region grey, and sets the mask (grown by a few pixels) as the "
        "latent's noise mask."
    )
    required = {
        "pixels": link("IMAGE"),
        "vae": link("VAE"),
        "mask": link("MASK"),
        "grow_mask_by": Int(default=6, min=0, max=64, step=1),
    }
    outputs = (Output("LATENT"),)

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        import math

        import torch

        _, mask, grey = _inpaint_pixels(inputs["pixels"], inputs["mask"])
        grow = inputs["grow_mask_by"]
        if grow:
            kernel = torch.ones((1, 1, grow, grow))
            padding = math.ceil((grow - 1) / 2)
            grown = torch.clamp(torch.nn.functional.conv2d(mask.round(), kernel, padding=padding), 0, 1)
            mask = grown[:, :, : mask.shape[2], : mask.shape[3]]
        return NodeResult(({"samples": vae_encoded(ctx, inputs["vae"], grey), "noise_mask": mask.round()},))


class InpaintModelConditioning(Node):
    category = "conditioning/inpaint"
    description = (
        "The image's latent with the mask as its noise mask, for inpainting. Z-Image has no inpaint input "
        "channels, so the conditionings pass through unchanged (ComfyUI's extra keys would go unread)."
    )
    required = {
        "positive": link("CONDITIONING"),
        "negative": link("CONDITIONING"),
        "vae": link("VAE"),
        "pixels": link("IMAGE"),
        "mask": link("MASK"),
        "noise_mask": Boolean(
            default=True,
            tooltip="Add a noise mask to the latent so sampling will only happen within the mask. Might "
            "improve results or completely break things depending on the model.",
        ),
    }
    outputs = (Output("CONDITIONING", "positive"), Output("CONDITIONING", "negative"), Output("LATENT", "latent"))

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        pixels, mask, _ = _inpaint_pixels(inputs["pixels"], inputs["mask"])
        latent: dict[str, Any] = {"samples": vae_encoded(ctx, inputs["vae"], pixels)}
        if inputs["noise_mask"]:
            latent["noise_mask"] = mask
        return NodeResult((inputs["positive"], inputs["negative"], latent))


class LatentUpscale(Node):
    display_name = "Upscale Latent"
    category = "latent"
    required = {
        "samples": link("LATENT"),
        "upscale_method": Combo(choices=LATENT_UPSCALE_METHODS),
        "width": Int(default=512, min=0, max=MAX_RESOLUTION, step=8),
        "height": Int(default=512, min=0, max=MAX_RESOLUTION, step=8),
        "crop": Combo(choices=("disabled", "center")),
    }
    outputs = (Output("LATENT"),)

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        from zimage_serve.engine.resize import common_upscale
        from zimage_serve.limits import enforce

        latent = inputs["samples"]
        samples = latent["samples"]
        width, height = inputs["width"], inputs["height"]
        if width == 0 and height == 0:
            return NodeResult((latent,))
        if width == 0:  # 0 keeps the aspect ratio from the other side; at least 64 pixels, as ComfyUI
            height = max(64, height)
            width = max(64, round(samples.shape[-1] * height / samples.shape[-2]))
        elif height == 0:
            width = max(64, width)
            height = max(64, round(samples.shape[-2] * width / samples.shape[-1]))
        else:
            width, height = max(64, width), max(64, height)
        enforce(ctx.limits, "pixels", width * height, "width")
        scaled = common_upscale(samples, width // 8, height // 8, inputs["upscale_method"], inputs["crop"])
        return NodeResult(({**latent, "samples": scaled},))


class LatentUpscaleBy(Node):
    display_name = "Upscale Latent By"
    category = "latent"
    required = {
        "samples": link("LATENT"),
        "upscale_method": Combo(choices=LATENT_UPSCALE_METHODS),
        "scale_by": Float(default=1.5, min=0.01, max=8.0, step=0.01),
    }
    outputs = (Output("LATENT"),)

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        from zimage_serve.engine.resize import common_upscale
        from zimage_serve.limits import enforce

        latent = inputs["samples"]
        samples = latent["samples"]
        width = round(samples.shape[-1] * inputs["scale_by"])
        height = round(samples.shape[-2] * inputs["scale_by"])
        enforce(ctx.limits, "pixels", width * height * 64, "scale_by")
        scaled = common_upscale(samples, max(1, width), max(1, height), inputs["upscale_method"], "disabled")
        return NodeResult(({**latent, "samples": scaled},))


class RepeatLatentBatch(Node):
    display_name = "Repeat Latent Batch"
    category = "latent/batch"
    required = {"samples": link("LATENT"), "amount": Int(default=1, min=1, max=64)}
    outputs = (Output("LATENT"),)

    @classmethod
    def batch(cls, constants: dict[str, Any], linked: dict[str, int]) -> int:
        amount = constants.get("amount")
        return linked.get("samples", 1) * (amount if isinstance(amount, int) else 1)

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        from zimage_serve.engine.resize import repeat_to_batch
        from zimage_serve.limits import enforce

        latent, amount = dict(inputs["samples"]), inputs["amount"]
        samples = latent["samples"]
        enforce(ctx.limits, "batch", samples.shape[0] * amount, "amount")
        latent["samples"] = samples.repeat(amount, 1, 1, 1)
        if "noise_mask" in latent and samples.shape[0] > 1:
            masks = latent["noise_mask"]
            if masks.shape[0] < samples.shape[0]:  # one mask per image before repeating, as ComfyUI
                masks = repeat_to_batch(masks, samples.shape[0])
            latent["noise_mask"] = masks.repeat(amount, 1, 1, 1)
        if "batch_index" in latent:
            index = latent["batch_index"]
            offset = max(index) - min(index) + 1
            latent["batch_index"] = index + [i + k * offset for k in range(1, amount) for i in index]
        return NodeResult((latent,))
