"""Empty latents to start text-to-image from."""

from __future__ import annotations

from typing import Any, ClassVar

from zimage_serve.workflow.context import NodeContext
from zimage_serve.workflow.spec import MAX_RESOLUTION, Int, NodeResult, Output, SizedNode

BATCH = Int(default=1, min=1, max=4096, limit="batch", tooltip="The number of latent images in the batch.")


class EmptyLatent(SizedNode):
    """An empty latent of a size in pixels: its pixels per image count against the limit."""

    channels: ClassVar[int] = 16

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
