"""Images in and out: VAE encode/decode, loading uploaded images, saving and previewing results."""

from __future__ import annotations

import functools
import hashlib
import os
import secrets
from pathlib import Path
from stat import S_ISREG
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from PIL import Image, ImageOps, ImageSequence

from zimage_serve.engine.pixels import to_pil
from zimage_serve.errors import GenerationCancelled, InvalidParameterError
from zimage_serve.image_safety import ImageFacts, ImageRefused, facts, refusing
from zimage_serve.limits import Limits, enforce
from zimage_serve.png import png_bytes, png_info
from zimage_serve.workflow.context import Interrupted, NodeContext, ResourceLists
from zimage_serve.workflow.folders import UnknownFileError
from zimage_serve.workflow.naming import check_prefix, write_new
from zimage_serve.workflow.spec import Combo, Node, NodeResult, Output, String, link

if TYPE_CHECKING:
    import torch

# Facts are cached per file, whatever the limits: counting stops being exact only far beyond any limit.
MAX_FACTS_PIXELS = 2**40


class VAEDecode(Node):
    display_name = "VAE Decode"
    category = "latent"
    description = "Decodes latent images back into pixel space images."
    required = {
        "samples": link("LATENT", "The latent to be decoded."),
        "vae": link("VAE", "The VAE model used for decoding the latent."),
    }
    outputs = (Output("IMAGE", tooltip="The decoded image."),)

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        try:
            return NodeResult((inputs["vae"].decode(inputs["samples"]["samples"], cancel=ctx.interrupted),))
        except GenerationCancelled as exc:
            raise Interrupted(str(exc)) from exc


class VAEEncode(Node):
    display_name = "VAE Encode"
    category = "latent"
    description = "Encodes images into latents (the start of image-to-image)."
    required = {"pixels": link("IMAGE"), "vae": link("VAE")}
    outputs = (Output("LATENT"),)

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        return NodeResult(({"samples": vae_encoded(ctx, inputs["vae"], inputs["pixels"])},))


def vae_encoded(ctx: NodeContext, vae: Any, pixels: torch.Tensor) -> torch.Tensor:
    """The VAE's raw latents of `pixels`; an interrupt stops the encoder between its blocks."""
    try:
        latents: torch.Tensor = vae.encode(pixels, cancel=ctx.interrupted)
    except GenerationCancelled as exc:
        raise Interrupted(str(exc)) from exc
    return latents


def open_image(path: str | Path, limits: Limits | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """IMAGE (frames, H, W, 3) in 0..1 and MASK (frames, H, W) = 1 - alpha, as ComfyUI's LoadImage.

    The pixels over every frame are checked from the headers before a frame is decoded, and no more
    frames are decoded than a batch may hold."""
    import torch

    limits = limits or Limits()
    images: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    with refusing("image"), Image.open(path) as opened:
        found = facts(opened, "image", limits.upload_pixels)
        enforce(limits, "batch", found.frames, "image (frames)")
        for frame in ImageSequence.Iterator(opened):
            frame = ImageOps.exif_transpose(frame) or frame
            if frame.mode == "I":
                frame = frame.point(lambda value: value * (1 / 255))
            rgb = np.asarray(frame.convert("RGB"), dtype=np.float32) / 255.0
            if images and rgb.shape != images[0].shape:
                break  # frames of another size are dropped, as in ComfyUI
            images.append(rgb)
            if "A" in frame.getbands():
                alpha = np.asarray(frame.getchannel("A"), dtype=np.float32) / 255.0
                masks.append(1.0 - alpha)
            else:
                masks.append(np.zeros((64, 64), dtype=np.float32))
            if len(images) >= found.frames:
                break
    image = torch.from_numpy(np.stack(images))
    if any(m.shape != masks[0].shape for m in masks):
        masks = [np.zeros((64, 64), dtype=np.float32) for _ in masks]
    return image, torch.from_numpy(np.stack(masks))


class LoadImage(Node):
    display_name = "Load Image"
    category = "image"
    description = "Loads an image from the input folder (uploads land there)."
    required = {"image": Combo(resource="input_images", options={"image_upload": True})}
    outputs: ClassVar[tuple[Output, ...]] = (Output("IMAGE"), Output("MASK"))
    custom_checks = ("image",)
    owned = True  # reads the caller's own uploads

    @classmethod
    def check(cls, lists: ResourceLists, limits: Limits, **inputs: Any) -> str | None:
        name = inputs.get("image")
        try:
            found = _image_facts(*_identity(_input_file(lists, str(name))))
        except (UnknownFileError, OSError) as exc:
            return (
                f"Invalid image file: {name} ({exc})"
                if isinstance(exc, UnknownFileError)
                else f"Invalid image file: {name}"
            )
        if isinstance(found, str):
            return f"Invalid image file: {name} ({found})"
        if found.pixels > limits.upload_pixels:
            return limits.refusal("upload_pixels", found.pixels)
        if found.frames > limits.batch:
            return limits.refusal("batch", found.frames) + " (the file's frames)"
        return None

    @classmethod
    def fingerprint(cls, lists: ResourceLists, **inputs: Any) -> Any:
        try:
            return _content_hash(*_identity(_input_file(lists, str(inputs.get("image")))))
        except (UnknownFileError, OSError):
            return None

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        image, mask = open_image(ctx.folders.input_file(inputs["image"]), ctx.limits)
        return NodeResult((image, mask))


class LoadImageMask(LoadImage):
    display_name = "Load Image (as Mask)"
    category = "mask"
    description = "One channel of an input image as a mask (alpha inverted: transparent = 1)."
    required = {
        "image": Combo(resource="input_images", options={"image_upload": True}),
        "channel": Combo(choices=("alpha", "red", "green", "blue")),
    }
    outputs = (Output("MASK"),)

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        import torch

        path = ctx.folders.input_file(inputs["image"])
        with refusing("image"), Image.open(path) as opened:
            facts(opened, "image", ctx.limits.upload_pixels)
            frame = ImageOps.exif_transpose(opened) or opened
            if frame.getbands() != ("R", "G", "B", "A"):
                if frame.mode == "I":
                    frame = frame.point(lambda value: value * (1 / 255))
                frame = frame.convert("RGBA")
            band = inputs["channel"][0].upper()
            plane = np.asarray(frame.getchannel(band), dtype=np.float32) / 255.0
        mask = torch.from_numpy(1.0 - plane if band == "A" else plane.copy())
        return NodeResult((mask[None],))


# Every prompt naming an input image checks it and hashes it. Both answers are kept per file identity
# (path, inode, size, mtime): a file written again gets a new identity and is read again.
FileIdentity = tuple[str, int, int, int]


def _identity(path: str) -> FileIdentity:
    stat = os.stat(path)
    if not S_ISREG(stat.st_mode):
        raise IsADirectoryError(path)  # a folder named like an image is no image
    return (path, stat.st_ino, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=1024)
def _image_facts(path: str, inode: int, size: int, mtime_ns: int) -> ImageFacts | str:
    """The file's format, frames and pixels (from its headers; every frame verified), or why it is no image."""
    try:
        with refusing("image"), Image.open(path) as image:
            found = facts(image, "image", MAX_FACTS_PIXELS)
            image.verify()
    except ImageRefused as exc:
        return exc.reason
    return found


@functools.lru_cache(maxsize=1024)
def _content_hash(path: str, inode: int, size: int, mtime_ns: int) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def _input_file(lists: ResourceLists, name: str) -> str:
    find = getattr(lists, "input_file", None)
    if find is None:
        raise UnknownFileError("image", name, "cannot be looked up here")
    path: str = find(name)
    return path


BATCH_NUMBER = "%batch_num%"  # in a prefix: the image's place in its batch


def save_images(
    ctx: NodeContext, images: torch.Tensor, folder: Path, prefix: str, kind: str, compress_level: int
) -> list[dict[str, str]]:
    info = png_info(prompt=ctx.prompt or None, extra_pnginfo=ctx.extra_pnginfo)
    saved = []
    for index, picture in enumerate(to_pil(images)):
        data = png_bytes(picture, info, compress_level)
        filename, subfolder = write_new(folder, prefix.replace(BATCH_NUMBER, str(index)), data, ctx.outputs)
        saved.append({"filename": filename, "subfolder": subfolder, "type": kind})
    return saved


class SaveImage(Node):
    display_name = "Save Image"
    category = "image"
    description = "Saves the input images to your output folder."
    required = {
        "images": link("IMAGE", "The images to save."),
        "filename_prefix": String(
            default="ComfyUI",
            tooltip="The prefix for the file to save. This may include formatting information such as "
            "%date:yyyy-MM-dd% or %batch_num%.",
        ),
    }
    hidden = {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}
    output_node = True
    custom_checks = ("filename_prefix",)

    @classmethod
    def check(cls, lists: ResourceLists, limits: Limits, **inputs: Any) -> str | None:
        try:
            check_prefix(str(inputs.get("filename_prefix")).replace(BATCH_NUMBER, "0"))
        except InvalidParameterError as exc:
            return str(exc)
        return None

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        saved = save_images(ctx, inputs["images"], ctx.folders.output, inputs["filename_prefix"], "output", 4)
        return NodeResult((), {"images": saved})


class PreviewImage(Node):
    display_name = "Preview Image"
    category = "image"
    description = "Saves the input images to the temp folder, to be shown and then discarded."
    required = {"images": link("IMAGE")}
    hidden = {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}
    output_node = True

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        prefix = "ComfyUI_temp_" + "".join(secrets.choice("abcdefghijklmnopqrstupvxyz") for _ in range(5))
        saved = save_images(ctx, inputs["images"], ctx.folders.temp, prefix, "temp", 1)
        return NodeResult((), {"images": saved})
