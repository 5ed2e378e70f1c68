"""Save Image (Advanced): ComfyUI's V3 saver of PNG (8 or 16 bits), EXR (32-bit float) and AVIF files.

Its `format` input is a DynamicCombo: each format brings its own bit depths and colour spaces (and AVIF its
quality and animation), which API-format graphs send as `format.bit_depth` and so on. Files are
`<prefix>_<counter:05>.<ext>`, without SaveImage's trailing underscore; `%batch_num%` in the prefix is the
image's place in the batch. Every format keeps the graph where it keeps text (engine-free encoders in
`zimage_serve.image_formats`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from zimage_serve import image_formats
from zimage_serve.engine.pixels import to_pil
from zimage_serve.errors import InvalidParameterError
from zimage_serve.png import png_bytes, png_info
from zimage_serve.workflow.context import NodeContext
from zimage_serve.workflow.naming import write_new
from zimage_serve.workflow.nodes.image import BATCH_NUMBER, SaveImage
from zimage_serve.workflow.spec import (
    Combo,
    DynamicCombo,
    DynamicOption,
    Float,
    Int,
    NodeResult,
    Output,
)

FORMATS = DynamicCombo(
    tooltip="The file format, and the options it has.",
    choices=(
        DynamicOption(
            "png",
            {
                "bit_depth": Combo(choices=("8-bit", "16-bit"), default="8-bit", options={"advanced": True}),
                "input_color_space": Combo(choices=("sRGB",), default="sRGB", options={"advanced": True}),
            },
        ),
        DynamicOption(
            "exr",
            {
                "bit_depth": Combo(choices=("32-bit float",), default="32-bit float", options={"advanced": True}),
                "input_color_space": Combo(
                    choices=image_formats.EXR_COLOR_SPACES,
                    default="sRGB",
                    options={"advanced": True},
                    tooltip="What the pixels are: sRGB-encoded, HLG-encoded Rec. 2020 (HDR), or already linear",
                ),
            },
        ),
        DynamicOption(
            "avif",
            {
                "bit_depth": Combo(choices=image_formats.AVIF_BIT_DEPTHS, default="auto", options={"advanced": True}),
                "input_color_space": Combo(
                    choices=image_formats.AVIF_COLOR_SPACES, default="sRGB", options={"advanced": True}
                ),
                "crf": Int(default=18, min=1, max=63, options={"advanced": True}, tooltip="Lower is better quality"),
                "save_mode": DynamicCombo(
                    options={"display_name": "save mode", "advanced": True},
                    choices=(
                        DynamicOption("still images"),
                        DynamicOption(
                            "animated",
                            {
                                "fps": Float(default=6.0, min=0.01, max=1000.0, step=0.01),
                                "loop_count": Int(
                                    default=0, min=0, max=1000, options={"advanced": True}, tooltip="0 loops forever"
                                ),
                            },
                        ),
                    ),
                ),
            },
        ),
    ),
)


def _check_linked(chosen: dict[str, Any], declared: DynamicCombo, name: str) -> None:
    """The chosen option's values against their declared ranges and choices: one that came by a link was
    not checked when the graph was (ComfyUI checks only values written in the graph)."""
    option = declared.option(chosen.get(name))
    if option is None:
        raise InvalidParameterError(name, f"{chosen.get(name)!r} is not one of {', '.join(declared.keys())}")
    for key, spec in option.inputs.items():
        value, field = chosen.get(key), f"{name}.{key}"
        if isinstance(spec, DynamicCombo):
            _check_linked(value if isinstance(value, dict) else {key: value}, spec, key)
        elif isinstance(spec, Int | Float) and (
            isinstance(value, bool) or not isinstance(value, int | float) or not spec.min <= value <= spec.max
        ):
            raise InvalidParameterError(field, f"{value!r} is outside {spec.min}..{spec.max}")
        elif isinstance(spec, Combo) and value not in spec.choices:
            raise InvalidParameterError(field, f"{value!r} is not one of {', '.join(spec.choices)}")


class SaveImageAdvanced(SaveImage):
    display_name = "Save Image (Advanced)"
    description = "Saves the input images to your output folder as PNG (8 or 16 bits), EXR or AVIF."
    required = {**SaveImage.required, "format": FORMATS}
    outputs = (Output("IMAGE", "images"),)

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        images, prefix, chosen = inputs["images"], inputs["filename_prefix"], inputs["format"]
        kind = chosen["format"]
        texts = image_formats.metadata_texts(ctx.prompt or None, ctx.extra_pnginfo)
        array = images.detach().to("cpu").float().numpy()
        _check_linked(chosen, FORMATS, "format")
        import av  # FFmpeg's libraries: loaded by the first run that saves this way

        try:
            files = self._encoded(images, array, chosen, texts, ctx)
        except image_formats.FormatError as exc:
            raise InvalidParameterError("format", str(exc)) from exc
        except av.FFmpegError as exc:  # what the encoder refuses (an image too small for AV1, say)
            raise InvalidParameterError("format", f"the {kind} encoder refused these images: {exc}") from exc
        saved = []
        for index, (data, extension) in enumerate(files):
            filename, subfolder = write_new(
                ctx.folders.output,
                prefix.replace(BATCH_NUMBER, str(index)),
                data,
                ctx.outputs,
                extension=extension,
                trailing=False,
            )
            saved.append({"filename": filename, "subfolder": subfolder, "type": "output"})
        ui: dict[str, list[Any]] = {"images": saved}
        if kind == "avif" and len(array) > 1 and chosen["save_mode"]["save_mode"] == "animated":
            ui["animated"] = [True]
        return NodeResult((images,), ui)

    @staticmethod
    def _encoded(
        images: Any, array: np.ndarray, chosen: dict[str, Any], texts: dict[str, str], ctx: NodeContext
    ) -> list[tuple[bytes | memoryview, str]]:
        """(file bytes, extension) of each file, in batch order."""
        kind, space = chosen["format"], chosen["input_color_space"]
        if kind == "png" and chosen["bit_depth"] == "8-bit":  # SaveImage's own file, with its suffix changed
            info = png_info(prompt=ctx.prompt or None, extra_pnginfo=ctx.extra_pnginfo)
            return [(png_bytes(picture, info, 4), "png") for picture in to_pil(images)]
        if kind == "png":
            return [(image_formats.png16_bytes(frame, texts), "png") for frame in array]
        if kind == "exr":
            return [(image_formats.exr_bytes(frame, space, texts), "exr") for frame in array]
        depth, crf, mode = chosen["bit_depth"], chosen["crf"], chosen["save_mode"]
        if mode["save_mode"] == "animated":
            sequence = image_formats.avif_bytes(
                list(array), depth, space, crf, texts, fps=mode["fps"], loop_count=mode["loop_count"]
            )
            return [(sequence, "avif")]
        return [(image_formats.avif_bytes([frame], depth, space, crf, texts), "avif") for frame in array]
