"""The templates the frontend's template browser lists: the shipped workflows, in UI format (made from
the API workflows by `workflow.ui_export`), each with a thumbnail and a description."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zimage_serve import workflows

THUMBNAILS = workflows.FOLDER / "thumbnails"


@dataclass(frozen=True)
class Template:
    name: str
    title: str
    description: str
    workflow: Path
    models: tuple[str, ...]
    tags: tuple[str, ...] = ("Text to Image", "Image")

    @property
    def thumbnail(self) -> Path:
        return THUMBNAILS / f"{self.name}-1.webp"

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
)


def index() -> list[dict[str, Any]]:
    """`templates/index.json`: one category of ours."""
    return [
        {
            "moduleName": "default",
            "title": "Z-Image",
            "type": "image",
            "category": "Z-Image",
            "templates": [template.entry() for template in TEMPLATES],
        }
    ]


def find(name: str) -> Template | None:
    return next((t for t in TEMPLATES if t.name == name), None)
