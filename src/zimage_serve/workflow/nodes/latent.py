"""Empty latents to start text-to-image from."""

from __future__ import annotations

from typing import Any

import torch

from zimage_serve.workflow.context import NodeContext
from zimage_serve.workflow.spec import MAX_RESOLUTION, Int, Node, NodeResult, Output

BATCH = Int(default=1, min=1, max=4096, tooltip="The number of latent images in the batch.")


def empty_latent(channels: int, width: int, height: int, batch_size: int) -> dict[str, Any]:
    return {"samples": torch.zeros((batch_size, channels, height // 8, width // 8), dtype=torch.float32)}


class EmptySD3LatentImage(Node):
    category = "latent/sd3"
    description = "An empty 16-channel latent (the Flux VAE's, as Z-Image uses) of the given size."
    required = {
        "width": Int(default=1024, min=16, max=MAX_RESOLUTION, step=16),
        "height": Int(default=1024, min=16, max=MAX_RESOLUTION, step=16),
        "batch_size": BATCH,
    }
    outputs = (Output("LATENT"),)

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        return NodeResult((empty_latent(16, inputs["width"], inputs["height"], inputs["batch_size"]),))


class EmptyLatentImage(Node):
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

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        return NodeResult((empty_latent(4, inputs["width"], inputs["height"], inputs["batch_size"]),))
