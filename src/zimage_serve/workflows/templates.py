"""The templates the frontend's template browser lists, each with a thumbnail and a description: the shipped
API workflows (served in UI format, made by `workflow.ui_export`) and ComfyUI's own Z-Image templates
(`comfy_org/`, UI format already, served as published)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zimage_serve import workflows

THUMBNAILS = workflows.FOLDER / "thumbnails"
COMFY_ORG = workflows.FOLDER / "comfy_org"


@dataclass(frozen=True)
class Template:
    name: str
    title: str
    description: str
    workflow: Path
    models: tuple[str, ...]
    tags: tuple[str, ...] = ("Text to Image", "Image")
    ui_format: bool = False  # the file is a UI-format workflow, served as it is
    picture: str | None = None  # another template's thumbnail, when it has none of its own

    @property
    def thumbnail(self) -> Path:
        return THUMBNAILS / f"{self.picture or self.name}-1.webp"

    def entry(self) -> dict[str, Any]:
        """Its entry in the frontend's `templates/index.json`."""
        return {
            "name": self.name,
            "title": self.title,
            "description": self.description,
            "mediaType": "image",
            "mediaSubtype": "webp",
            "tags": list(self.tags),
            "models": list(self.models),
        }


TEMPLATES = (
    Template(
        "zimage-nano",
        "zimage-nano: shapes in a second",
        "The built-in model, nothing to download: coloured circles, squares and triangles from an English or "
        "Chinese caption, 128 × 128, on any CPU.",
        workflows.NANO,
        ("zimage-nano",),
    ),
    Template(
        "z-image-turbo",
        "Z-Image-Turbo text to image",
        "Tongyi-MAI's 6B distilled model: 8 steps at 1024 × 1024. Needs z_image_turbo_bf16.safetensors "
        "(diffusion_models), qwen_3_4b.safetensors (text_encoders) and ae.safetensors (vae) in a models folder.",
        workflows.TURBO,
        ("Z-Image-Turbo",),
    ),
    Template(
        "z-image",
        "Z-Image text to image",
        "Tongyi-MAI's 6B base model (not distilled): 50 steps, cfg 4 and a negative prompt, any size from 512² to "
        "2048². Needs z_image.safetensors (diffusion_models), qwen_3_4b.safetensors (text_encoders) and "
        "ae.safetensors (vae) in a models folder.",
        workflows.BASE,
        ("Z-Image",),
    ),
    Template(
        "z-image-distill",
        "Z-Image in 8 steps (distill LoRA)",
        "The base model with alibaba-pai's distill LoRA at 0.8: 8 steps at cfg 1, no negative prompt. Needs "
        "z_image.safetensors (diffusion_models), Z-Image-Fun-Lora-Distill-8-Steps-2603-ComfyUI.safetensors (loras), "
        "qwen_3_4b.safetensors (text_encoders) and ae.safetensors (vae) in a models folder.",
        workflows.DISTILL,
        ("Z-Image",),
        picture="z-image",
    ),
)


COMFY_ORG_TEMPLATES = (
    Template(
        "01_get_started_text_to_image",
        "Z-Image-Turbo text to image, 4 steps (ComfyUI's first template)",
        "ComfyUI's first-run template: Z-Image-Turbo in a subgraph at 4 steps, 1024 × 1024. Needs "
        "z_image_turbo_bf16.safetensors (diffusion_models), qwen_3_4b.safetensors (text_encoders) and ae.safetensors "
        "(vae) in a models folder.",
        COMFY_ORG / "01_get_started_text_to_image.json",
        ("Z-Image-Turbo",),
        ui_format=True,
        picture="z-image-turbo",
    ),
    Template(
        "image_z_image_turbo_int8",
        "Z-Image-Turbo INT8 text to image",
        "ComfyUI's INT8 template: the Turbo transformer in INT8 ConvRot and an FP8-mixed text encoder, 8 steps. "
        "Needs z_image_turbo_int8_convrot.safetensors (diffusion_models), qwen_3_4b_fp8_mixed.safetensors "
        "(text_encoders) and ae.safetensors (vae).",
        COMFY_ORG / "image_z_image_turbo_int8.json",
        ("Z-Image-Turbo",),
        tags=("Text to Image", "Int8"),
        ui_format=True,
        picture="z-image-turbo",
    ),
    Template(
        "image_z_image_int8",
        "Z-Image INT8 text to image",
        "ComfyUI's INT8 template of the base model: 25 steps, cfg 4, a Resolution Selector and Save Image "
        "(Advanced). Needs z_image_int8_convrot.safetensors (diffusion_models), qwen_3_4b.safetensors "
        "(text_encoders) and ae.safetensors (vae).",
        COMFY_ORG / "image_z_image_int8.json",
        ("Z-Image",),
        tags=("Text to Image", "Int8"),
        ui_format=True,
        picture="z-image",
    ),
)
# The browser's order: zimage-nano, then Z-Image-Turbo with ComfyUI's 4-step start first, then the base model.
NANO, TURBO, BASE, DISTILL = TEMPLATES
GET_STARTED, TURBO_INT8, BASE_INT8 = COMFY_ORG_TEMPLATES
BROWSER = (NANO, GET_STARTED, TURBO, TURBO_INT8, BASE, DISTILL, BASE_INT8)


def index() -> list[dict[str, Any]]:
    """`templates/index.json`: one category of ours."""
    return [
        {
            "moduleName": "default",
            "title": "Z-Image",
            "type": "image",
            "category": "Z-Image",
            "templates": [template.entry() for template in BROWSER],
        }
    ]


def find(name: str) -> Template | None:
    return next((t for t in BROWSER if t.name == name), None)
