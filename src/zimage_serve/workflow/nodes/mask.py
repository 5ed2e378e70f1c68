"""ComfyUI's core mask nodes. MASK values are (batch, height, width) tensors in 0..1; 1 is masked."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from zimage_serve.limits import enforce
from zimage_serve.workflow.context import NodeContext
from zimage_serve.workflow.spec import (
    MAX_RESOLUTION,
    Autogrow,
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

if TYPE_CHECKING:
    import torch

CHANNELS = ("red", "green", "blue", "alpha")


class SolidMask(SizedNode):
    category = "mask"
    required = {
        "value": Float(default=1.0, min=0.0, max=1.0, step=0.01),
        "width": Int(default=512, min=1, max=MAX_RESOLUTION, step=1),
        "height": Int(default=512, min=1, max=MAX_RESOLUTION, step=1),
    }
    outputs = (Output("MASK"),)

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        import torch

        self.enforce_demands(ctx.limits, inputs)
        shape = (1, inputs["height"], inputs["width"])
        return NodeResult((torch.full(shape, float(inputs["value"]), dtype=torch.float32),))


class InvertMask(Node):
    category = "mask"
    required = {"mask": link("MASK")}
    outputs = (Output("MASK"),)

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        return NodeResult((1.0 - inputs["mask"],))


class ImageToMask(Node):
    display_name = "Convert Image to Mask"
    category = "mask"
    required = {"image": link("IMAGE"), "channel": Combo(choices=CHANNELS)}
    outputs = (Output("MASK"),)

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        import torch

        image: torch.Tensor = inputs["image"]
        index = CHANNELS.index(inputs["channel"])
        if index >= image.shape[-1]:  # no alpha channel: nothing is transparent
            return NodeResult((torch.ones(image.shape[:-1], dtype=image.dtype),))
        return NodeResult((image[..., index],))


class MaskToImage(Node):
    display_name = "Convert Mask to Image"
    category = "mask"
    required = {"mask": link("MASK")}
    outputs = (Output("IMAGE"),)

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        mask: torch.Tensor = inputs["mask"]
        return NodeResult((mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1]).movedim(1, -1).expand(-1, -1, -1, 3),))


class BatchMasksNode(Node):
    """ComfyUI's V3 Batch Masks: any number of masks (two at least) in one batch, each fitted to the first's
    size."""

    display_name = "Batch Masks"
    category = "mask"
    required = {"masks": Autogrow(member=link("MASK"), member_name="mask", prefix="mask", min=2, max=50)}
    outputs = (Output("MASK"),)

    @classmethod
    def batch(cls, constants: dict[str, Any], linked: dict[str, int]) -> int:
        return sum(linked.values()) or 1

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        import torch

        masks = [mask.reshape(-1, mask.shape[-2], mask.shape[-1]) for mask in inputs["masks"].values()]
        height, width = masks[0].shape[-2:]
        fitted = [
            mask
            if mask.shape[-2:] == (height, width)
            else torch.nn.functional.interpolate(mask[:, None], size=(height, width), mode="bilinear")[:, 0]
            for mask in masks
        ]
        enforce(ctx.limits, "batch", sum(mask.shape[0] for mask in fitted), "masks")
        return NodeResult((torch.cat(fitted),))


class GrowMask(Node):
    display_name = "Grow Mask"
    category = "mask"
    description = "Dilates (expand > 0) or erodes (expand < 0) the mask by that many pixels."
    required = {
        "mask": link("MASK"),
        "expand": Int(default=0, min=-MAX_RESOLUTION, max=MAX_RESOLUTION, step=1),
        "tapered_corners": Boolean(default=True),
    }
    outputs = (Output("MASK"),)

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        import numpy as np
        import torch

        from zimage_serve.engine.libraries import importing

        with importing():  # scipy (about 60 MiB) only for the node that needs it, one importing thread at a time
            from scipy import ndimage

        mask: torch.Tensor = inputs["mask"]
        expand = inputs["expand"]
        corner = 0 if inputs["tapered_corners"] else 1
        footprint = np.array([[corner, 1, corner], [1, 1, 1], [corner, 1, corner]], dtype=bool)
        grow = ndimage.grey_dilation if expand > 0 else ndimage.grey_erosion
        out = []
        for plane in mask.reshape(-1, *mask.shape[-2:]).float().numpy():
            for _ in range(min(abs(expand), max(plane.shape))):  # past the mask's size nothing changes
                plane = grow(plane, footprint=footprint)
            out.append(torch.from_numpy(np.ascontiguousarray(plane)))
        return NodeResult((torch.stack(out),))
