"""ComfyUI's core image nodes, with its class names, inputs, defaults and outputs.

IMAGE values are (batch, height, width, channels) tensors in 0..1, as ComfyUI passes them. Sizes a node
makes count against the pixel limit when it runs (and, where the inputs say the size, when validated).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from zimage_serve.workflow.context import NodeContext
from zimage_serve.workflow.limits import enforce
from zimage_serve.workflow.spec import MAX_RESOLUTION, Combo, Float, Int, Node, NodeResult, Output, SizedNode, link

if TYPE_CHECKING:
    import torch

UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")
BATCH = Int(default=1, min=1, max=4096, limit="batch")


class EmptyImage(SizedNode):
    category = "image"
    description = "A batch of images of one colour (0xRRGGBB)."
    required = {
        "width": Int(default=512, min=1, max=MAX_RESOLUTION, step=1),
        "height": Int(default=512, min=1, max=MAX_RESOLUTION, step=1),
        "batch_size": BATCH,
        "color": Int(default=0, min=0, max=0xFFFFFF, step=1, options={"display": "color"}),
    }
    outputs = (Output("IMAGE"),)

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        import torch

        self.enforce_demands(ctx.limits, inputs)
        color = inputs["color"]
        rgb = torch.tensor([(color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF], dtype=torch.float32) / 255.0
        image = rgb.expand(inputs["batch_size"], inputs["height"], inputs["width"], 3).contiguous()
        return NodeResult((image,))


class ImageInvert(Node):
    category = "image"
    required = {"image": link("IMAGE")}
    outputs = (Output("IMAGE"),)

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        return NodeResult((1.0 - inputs["image"],))


class ImageScale(Node):
    display_name = "Upscale Image"
    category = "image/upscaling"
    required = {
        "image": link("IMAGE"),
        "upscale_method": Combo(choices=UPSCALE_METHODS),
        "width": Int(default=512, min=0, max=MAX_RESOLUTION, step=1),
        "height": Int(default=512, min=0, max=MAX_RESOLUTION, step=1),
        "crop": Combo(choices=("disabled", "center")),
    }
    outputs = (Output("IMAGE"),)

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        image: torch.Tensor = inputs["image"]
        width, height = inputs["width"], inputs["height"]
        if width == 0 and height == 0:
            return NodeResult((image,))
        old_height, old_width = image.shape[1:3]
        if width == 0:  # 0 keeps the aspect ratio from the other side
            width = max(1, round(old_width * height / old_height))
        elif height == 0:
            height = max(1, round(old_height * width / old_width))
        enforce(ctx.limits, "pixels", width * height, "width")
        return NodeResult((scale(image, width, height, inputs["upscale_method"], inputs["crop"]),))


class ImageScaleBy(Node):
    display_name = "Upscale Image By"
    category = "image/upscaling"
    required = {
        "image": link("IMAGE"),
        "upscale_method": Combo(choices=UPSCALE_METHODS),
        "scale_by": Float(default=1.0, min=0.01, max=8.0, step=0.01),
    }
    outputs = (Output("IMAGE"),)

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        image: torch.Tensor = inputs["image"]
        width = max(1, round(image.shape[2] * inputs["scale_by"]))
        height = max(1, round(image.shape[1] * inputs["scale_by"]))
        enforce(ctx.limits, "pixels", width * height, "scale_by")
        return NodeResult((scale(image, width, height, inputs["upscale_method"], "disabled"),))


class ImageScaleToMaxDimension(Node):
    display_name = "Scale Image to Max Dimension"
    category = "image/upscaling"
    required = {
        "image": link("IMAGE"),
        # ComfyUI's list, "bilinear" twice included, so a saved workflow's value and the menu both match.
        "upscale_method": Combo(choices=("area", "lanczos", "bilinear", "nearest-exact", "bilinear", "bicubic")),
        "largest_size": Int(default=512, min=0, max=MAX_RESOLUTION, step=1),
    }
    outputs = (Output("IMAGE"),)

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        image: torch.Tensor = inputs["image"]
        height, width, largest = image.shape[1], image.shape[2], inputs["largest_size"]
        if height > width:
            width, height = round(width / height * largest), largest
        elif width > height:
            width, height = largest, round(height / width * largest)
        else:
            width = height = largest
        enforce(ctx.limits, "pixels", width * height, "largest_size")
        return NodeResult((scale(image, max(1, width), max(1, height), inputs["upscale_method"], "disabled"),))


class GetImageSize(Node):
    display_name = "Get Image Size"
    category = "image"
    description = "An image's width, height and batch size, to set other nodes' sizes from."
    required = {"image": link("IMAGE")}
    outputs = (Output("INT", "width"), Output("INT", "height"), Output("INT", "batch_size"))

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        image: torch.Tensor = inputs["image"]
        return NodeResult((int(image.shape[2]), int(image.shape[1]), int(image.shape[0])))


class ImageCrop(Node):
    display_name = "Image Crop"
    category = "image/transform"
    required = {
        "image": link("IMAGE"),
        "width": Int(default=512, min=1, max=MAX_RESOLUTION, step=1),
        "height": Int(default=512, min=1, max=MAX_RESOLUTION, step=1),
        "x": Int(default=0, min=0, max=MAX_RESOLUTION, step=1),
        "y": Int(default=0, min=0, max=MAX_RESOLUTION, step=1),
    }
    outputs = (Output("IMAGE"),)

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        image: torch.Tensor = inputs["image"]
        # As ComfyUI: the corner is kept inside the image, and the crop ends where the image does.
        x = min(inputs["x"], image.shape[2] - 1)
        y = min(inputs["y"], image.shape[1] - 1)
        return NodeResult((image[:, y : y + inputs["height"], x : x + inputs["width"], :],))


class ImageBatch(Node):
    display_name = "Batch Images"
    category = "image"
    required = {"image1": link("IMAGE"), "image2": link("IMAGE")}
    outputs = (Output("IMAGE"),)

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        import torch

        first: torch.Tensor = inputs["image1"]
        second: torch.Tensor = inputs["image2"]
        if second.shape[1:3] != first.shape[1:3]:  # the second is fitted to the first, as ComfyUI does
            second = scale(second, first.shape[2], first.shape[1], "bilinear", "center")
        channels = min(first.shape[-1], second.shape[-1])
        enforce(ctx.limits, "batch", first.shape[0] + second.shape[0], "image2")
        return NodeResult((torch.cat((first[..., :channels], second[..., :channels])),))


class Canny(Node):
    category = "image/preprocessors"
    description = "Edges (white on black) by kornia's Canny detector, as ComfyUI computes them: a control image."
    required = {
        "image": link("IMAGE"),
        "low_threshold": Float(default=0.4, min=0.01, max=0.99, step=0.01),
        "high_threshold": Float(default=0.8, min=0.01, max=0.99, step=0.01),
    }
    outputs = (Output("IMAGE"),)

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        from kornia.filters import canny

        image: torch.Tensor = inputs["image"]
        _, edges = canny(image[..., :3].float().movedim(-1, 1), inputs["low_threshold"], inputs["high_threshold"])
        return NodeResult((edges.repeat(1, 3, 1, 1).movedim(1, -1),))


def scale(image: torch.Tensor, width: int, height: int, method: str, crop: str) -> torch.Tensor:
    from zimage_serve.engine.resize import scale_image

    return scale_image(image, width, height, method, crop)
