"""ComfyUI's core image nodes, with its class names, inputs, defaults and outputs.

IMAGE values are (batch, height, width, channels) tensors in 0..1, as ComfyUI passes them. Sizes a node
makes count against the pixel limit when it runs (and, where the inputs say the size, when validated).
"""

from __future__ import annotations

import math
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


# ComfyUI's aspect ratios, as its frontend shows them (portrait ones first within each pair).
ASPECT_RATIOS = {
    "1:1 (Square)": (1, 1),
    "2:3 (Portrait Photo)": (2, 3),
    "3:2 (Photo)": (3, 2),
    "3:4 (Portrait Standard)": (3, 4),
    "4:3 (Standard)": (4, 3),
    "9:16 (Portrait Widescreen)": (9, 16),
    "16:9 (Widescreen)": (16, 9),
    "21:9 (Ultrawide)": (21, 9),
}


class ResolutionSelector(Node):
    display_name = "Resolution Selector"
    category = "utilities"
    description = "A width and height for an aspect ratio and a number of megapixels, for Empty Latent Image nodes."
    required = {
        "aspect_ratio": Combo(choices=tuple(ASPECT_RATIOS), default="1:1 (Square)"),
        "megapixels": Float(
            default=1.0, min=0.1, max=16.0, step=0.1, tooltip="The image's size: 1.0 is about 1024×1024."
        ),
        "multiple": Int(
            default=8,
            min=8,
            max=128,
            step=4,
            tooltip="Width and height are rounded to the nearest multiple of this.",
            options={"advanced": True},
        ),
    }
    outputs = (Output("INT", "width"), Output("INT", "height"))

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        across, down = ASPECT_RATIOS[inputs["aspect_ratio"]]
        multiple = int(inputs.get("multiple", 8))
        scale = math.sqrt(float(inputs["megapixels"]) * 1024 * 1024 / (across * down))
        width = round(across * scale / multiple) * multiple
        height = round(down * scale / multiple) * multiple
        return NodeResult((int(width), int(height)))


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

    @classmethod
    def batch(cls, constants: dict[str, Any], linked: dict[str, int]) -> int:
        return linked.get("image1", 1) + linked.get("image2", 1)

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        return NodeResult((batched_images(ctx, [inputs["image1"], inputs["image2"]], "image2"),))


class BatchImagesNode(Node):
    """ComfyUI's V3 Batch Images: any number of images (two at least) in one batch."""

    display_name = "Batch Images"
    category = "image"
    required = {
        "images": Autogrow(member=link("IMAGE"), member_name="image", prefix="image", min=2, max=50),
    }
    outputs = (Output("IMAGE"),)

    @classmethod
    def batch(cls, constants: dict[str, Any], linked: dict[str, int]) -> int:
        return sum(linked.values()) or 1

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        images = list(inputs["images"].values())
        return NodeResult((batched_images(ctx, images, "images"),))


def batched_images(ctx: NodeContext, images: list[torch.Tensor], field: str) -> torch.Tensor:
    """One batch of `images`, each fitted to the first's size (bilinear, centre crop) and to the fewest
    channels among them, as ComfyUI batches them."""
    import torch

    height, width = images[0].shape[1:3]
    fitted = [
        image if image.shape[1:3] == (height, width) else scale(image, width, height, "bilinear", "center")
        for image in images
    ]
    channels = min(image.shape[-1] for image in fitted)
    enforce(ctx.limits, "batch", sum(image.shape[0] for image in fitted), field)
    return torch.cat([image[..., :channels] for image in fitted])


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
        from zimage_serve.engine.edges import canny

        return NodeResult((canny(inputs["image"], inputs["low_threshold"], inputs["high_threshold"]),))


class ImageScaleToTotalPixels(Node):
    display_name = "Scale Image to Total Pixels"
    category = "image/upscaling"
    required = {
        "image": link("IMAGE"),
        "upscale_method": Combo(choices=UPSCALE_METHODS),
        "megapixels": Float(default=1.0, min=0.01, max=16.0, step=0.01),
    }
    # Newer ComfyUI adds it; optional here so workflows saved before it run too.
    optional = {"resolution_steps": Int(default=1, min=1, max=256)}
    outputs = (Output("IMAGE"),)

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        import math

        image: torch.Tensor = inputs["image"]
        steps = inputs.get("resolution_steps", 1)
        factor = math.sqrt(inputs["megapixels"] * 1024 * 1024 / (image.shape[2] * image.shape[1]))
        width = max(steps, round(image.shape[2] * factor / steps) * steps)
        height = max(steps, round(image.shape[1] * factor / steps) * steps)
        enforce(ctx.limits, "pixels", width * height, "megapixels")
        return NodeResult((scale(image, width, height, inputs["upscale_method"], "disabled"),))


def gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    """ComfyUI's blur kernel: a Gaussian over coordinates spanning -1..1 across the kernel (not pixels)."""
    import torch

    axis = torch.linspace(-1, 1, size)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    weights = torch.exp(-(x * x + y * y) / (2.0 * sigma * sigma))
    return weights / weights.sum()


def _filtered(image: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Each channel convolved with `kernel`, the edges reflected."""
    import torch

    channels, radius = image.shape[-1], kernel.shape[-1] // 2
    samples = torch.nn.functional.pad(image.float().movedim(-1, 1), (radius,) * 4, mode="reflect")
    weight = kernel.to(samples.dtype).expand(channels, 1, *kernel.shape)
    return torch.nn.functional.conv2d(samples, weight, groups=channels).movedim(1, -1)


class ImageBlur(Node):
    category = "image/postprocessing"
    required = {
        "image": link("IMAGE"),
        "blur_radius": Int(default=1, min=1, max=31, step=1),
        "sigma": Float(default=1.0, min=0.1, max=10.0, step=0.1),
    }
    outputs = (Output("IMAGE"),)

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        radius = inputs["blur_radius"]
        kernel = gaussian_kernel(radius * 2 + 1, inputs["sigma"])
        return NodeResult((_filtered(inputs["image"], kernel),))


class ImageSharpen(Node):
    category = "image/postprocessing"
    required = {
        "image": link("IMAGE"),
        "sharpen_radius": Int(default=1, min=1, max=31, step=1),
        "sigma": Float(default=1.0, min=0.1, max=10.0, step=0.01),
        "alpha": Float(default=1.0, min=0.0, max=5.0, step=0.01),
    }
    outputs = (Output("IMAGE"),)

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        size = inputs["sharpen_radius"] * 2 + 1
        kernel = gaussian_kernel(size, inputs["sigma"]) * -(inputs["alpha"] * 10)
        centre = size // 2
        kernel[centre, centre] = kernel[centre, centre] - kernel.sum() + 1.0  # the weights sum to one
        return NodeResult((_filtered(inputs["image"], kernel).clamp(0, 1),))


class ImagePadForOutpaint(Node):
    display_name = "Pad Image for Outpainting"
    category = "image"
    description = "Grey borders to outpaint into, and a mask that is white there, feathered into the image."
    required = {
        "image": link("IMAGE"),
        "left": Int(default=0, min=0, max=MAX_RESOLUTION, step=8),
        "top": Int(default=0, min=0, max=MAX_RESOLUTION, step=8),
        "right": Int(default=0, min=0, max=MAX_RESOLUTION, step=8),
        "bottom": Int(default=0, min=0, max=MAX_RESOLUTION, step=8),
        "feathering": Int(default=40, min=0, max=MAX_RESOLUTION, step=1),
    }
    outputs = (Output("IMAGE"), Output("MASK"))

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        import torch

        image: torch.Tensor = inputs["image"]
        left, top, right, bottom = (inputs[side] for side in ("left", "top", "right", "bottom"))
        batch, height, width, channels = image.shape
        enforce(ctx.limits, "pixels", (height + top + bottom) * (width + left + right), "left")
        padded = torch.full((batch, height + top + bottom, width + left + right, channels), 0.5, dtype=torch.float32)
        padded[:, top : top + height, left : left + width, :] = image
        mask = torch.ones((height + top + bottom, width + left + right), dtype=torch.float32)
        inner = torch.zeros((height, width), dtype=torch.float32)
        feathering = inputs["feathering"]
        if feathering > 0 and feathering * 2 < height and feathering * 2 < width:
            # Distance to the nearest padded side (sides without padding do not count), then a squared ramp.
            rows = torch.arange(height, dtype=torch.float32)[:, None].expand(height, width)
            cols = torch.arange(width, dtype=torch.float32)[None, :].expand(height, width)
            far_h, far_w = torch.full_like(rows, height), torch.full_like(cols, width)
            distance = torch.stack(
                [
                    rows if top else far_h,
                    height - rows if bottom else far_h,
                    cols if left else far_w,
                    width - cols if right else far_w,
                ]
            ).amin(0)
            ramp = (feathering - distance) / feathering
            inner = torch.where(distance < feathering, ramp * ramp, inner)
        mask[top : top + height, left : left + width] = inner
        return NodeResult((padded, mask[None]))


class ImageCompositeMasked(Node):
    category = "image"
    description = "The source pasted onto the destination at (x, y), through the mask where one is given."
    required = {
        "destination": link("IMAGE"),
        "source": link("IMAGE"),
        "x": Int(default=0, min=0, max=MAX_RESOLUTION, step=1),
        "y": Int(default=0, min=0, max=MAX_RESOLUTION, step=1),
        "resize_source": Boolean(default=False),
    }
    optional = {"mask": link("MASK")}
    outputs = (Output("IMAGE"),)

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        import torch

        from zimage_serve.engine.resize import repeat_to_batch

        destination = inputs["destination"].clone().float().movedim(-1, 1)
        source = inputs["source"].float().movedim(-1, 1)[:, : destination.shape[1]]
        if inputs["resize_source"]:
            source = torch.nn.functional.interpolate(source, size=destination.shape[2:], mode="bilinear")
        source = repeat_to_batch(source, destination.shape[0])
        left = min(inputs["x"], destination.shape[3])
        top = min(inputs["y"], destination.shape[2])
        mask = inputs.get("mask")
        if mask is None:
            mask = torch.ones_like(source[:, :1])
        else:
            mask = torch.nn.functional.interpolate(
                mask.float().reshape(-1, 1, *mask.shape[-2:]), size=source.shape[2:], mode="bilinear"
            )
            mask = repeat_to_batch(mask, source.shape[0])
        visible_h = min(source.shape[2], destination.shape[2] - top)
        visible_w = min(source.shape[3], destination.shape[3] - left)
        mask = mask[:, :, :visible_h, :visible_w]
        region = destination[:, :, top : top + visible_h, left : left + visible_w]
        pasted = mask * source[:, :, :visible_h, :visible_w] + (1.0 - mask) * region
        destination[:, :, top : top + visible_h, left : left + visible_w] = pasted
        return NodeResult((destination.movedim(1, -1),))


def scale(image: torch.Tensor, width: int, height: int, method: str, crop: str) -> torch.Tensor:
    from zimage_serve.engine.resize import scale_image

    return scale_image(image, width, height, method, crop)
