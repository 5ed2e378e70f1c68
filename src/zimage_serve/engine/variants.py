"""Which Z-Image a checkpoint is, and the defaults that follow: Turbo (distilled) or the base model.

They share one architecture, so the weights cannot say. What can: an explicit choice (`--variant`), our
own `_zimage_serve.variant` in a diffusers folder's model_index.json, or a name — a file or folder
whose own name says "turbo" is Turbo; one that names Z-Image without it (`z_image.safetensors`,
`Tongyi-MAI/Z-Image`) is the base model. Anything else is taken for Turbo, the engine's first model
(zimage-nano is sampled as Turbo is, and says so in its model_index.json). Folders above are not read:
a Turbo fine-tune kept under `/srv/z-image/` is still Turbo.

A third recipe is asked for by name only: `distill`, the base model with alibaba-pai's distill LoRA
(`Z-Image-Fun-Lora-Distill`), which makes it draw in 8 steps at cfg 1.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from zimage_serve.errors import InvalidParameterError

BASE, TURBO, DISTILL = "base", "turbo", "distill"
VARIANTS = (BASE, TURBO, DISTILL)
# The distill LoRA: its published 8-step file (the newest release first) and the weight its authors advise.
DISTILL_LORAS = (
    "Z-Image-Fun-Lora-Distill-8-Steps-2603-ComfyUI.safetensors",
    "Z-Image-Fun-Lora-Distill-8-Steps-2602-ComfyUI.safetensors",
)
DISTILL_STRENGTH = 0.8
NAMES_ZIMAGE = re.compile(r"z[-_ ]image", re.IGNORECASE)  # Z-Image, z_image; not "zimage-nano" or other names


@dataclass(frozen=True)
class Defaults:
    steps: int
    guidance_scale: float  # diffusers' convention: 0 is off; ComfyUI's cfg = guidance + 1


DEFAULTS = {
    TURBO: Defaults(steps=8, guidance_scale=0.0),
    BASE: Defaults(steps=50, guidance_scale=4.0),  # the diffusers example for Tongyi-MAI/Z-Image
    DISTILL: Defaults(steps=8, guidance_scale=0.0),
}


def detect_variant(path: Path) -> str:
    """The variant `path` (a diffusers folder or a diffusion-model file) holds."""
    if path.is_dir():
        declared = _declared(path / "model_index.json")
        if declared is not None:
            return declared
    name = path.name
    if path.parent.name == "snapshots":  # the Hugging Face cache: models--Tongyi-MAI--Z-Image/snapshots/<hash>
        name = path.parent.parent.name
    if "turbo" in name.lower():
        return TURBO
    if NAMES_ZIMAGE.search(name):
        return BASE
    return TURBO


def check_variant(value: str) -> str:
    if value not in VARIANTS:
        raise InvalidParameterError("variant", f"{value!r} is not one of auto, {', '.join(VARIANTS)}")
    return value


def _declared(index_file: Path) -> str | None:
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    extra = index.get("_zimage_serve") if isinstance(index, dict) else None
    value = extra.get("variant") if isinstance(extra, dict) else None
    return value if value in (BASE, TURBO) else None  # a checkpoint is one of the two; distill is a recipe
