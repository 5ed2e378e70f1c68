"""PNG files with their provenance: our generation parameters, and ComfyUI's `prompt`/`workflow` chunks.

ComfyUI writes `prompt` (the API-format graph) and one chunk per `extra_pnginfo` key (normally
`workflow`) as JSON text; its frontend reloads a graph from them. We write the same, plus the
parameters as `parameters` (the A1111 text that image viewers and model sites read) and as JSON.
"""

from __future__ import annotations

import io
import json
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

PARAMETERS_KEY = "parameters"
JSON_KEY = "zimage"


def png_info(
    parameters: Mapping[str, Any] | None = None,
    prompt: Mapping[str, Any] | None = None,
    extra_pnginfo: Mapping[str, Any] | None = None,
) -> PngInfo:
    info = PngInfo()
    if parameters:
        info.add_text(PARAMETERS_KEY, a1111_text(parameters))
        info.add_text(JSON_KEY, json.dumps(dict(parameters), ensure_ascii=False), zip=True)
    if prompt is not None:
        info.add_text("prompt", json.dumps(prompt))
    for key, value in (extra_pnginfo or {}).items():
        info.add_text(key, json.dumps(value))
    return info


def png_bytes(image: Image.Image, info: PngInfo | None = None, compress_level: int = 4) -> memoryview:
    """The whole file in memory, to be written in one call into a name claimed for it (see
    `workflow.naming.claim`): the name is created only once the image is encoded, and a crash leaves
    at most a short file under a name nobody else uses."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=compress_level)
    return buffer.getbuffer()


def save_png(image: Image.Image, path: Path, info: PngInfo | None = None, compress_level: int = 4) -> Path:
    """Write atomically (temp file, then rename) so a crash never leaves half a PNG under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Created with open(), not mkstemp, so the file gets the user's umask rather than mode 0600.
    temp = path.with_name(f".{path.stem}.{secrets.token_hex(6)}.tmp")
    try:
        with open(temp, "xb") as file:
            file.write(png_bytes(image, info, compress_level))
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return path


def a1111_text(parameters: Mapping[str, Any]) -> str:
    """`prompt\\nNegative prompt: ...\\nSteps: 8, Sampler: euler, ...` as A1111 writes it."""
    lines = [str(parameters.get("prompt", ""))]
    if parameters.get("negative_prompt"):
        lines.append(f"Negative prompt: {parameters['negative_prompt']}")
    fields = {
        "Steps": parameters.get("steps"),
        "Sampler": parameters.get("sampler"),
        "CFG scale": _cfg(parameters.get("guidance_scale")),
        "Seed": parameters.get("seed"),
        "Size": f"{parameters.get('width')}x{parameters.get('height')}",
        "Shift": parameters.get("shift"),
        "Model": parameters.get("model"),
    }
    lines.append(", ".join(f"{k}: {v}" for k, v in fields.items() if v is not None))
    return "\n".join(lines)


def _cfg(guidance_scale: Any) -> Any:
    # A1111 and ComfyUI count CFG so that 1 means off; diffusers' guidance_scale counts from 0.
    return None if guidance_scale is None else guidance_scale + 1
