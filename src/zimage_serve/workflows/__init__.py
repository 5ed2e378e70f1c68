"""Ready API-format workflows shipped with the package: zimage-nano (no download), Z-Image-Turbo, Z-Image, and
Z-Image with alibaba-pai's distill LoRA (8 steps, cfg 1)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FOLDER = Path(__file__).parent
NANO = FOLDER / "zimage_nano.api.json"
TURBO = FOLDER / "z_image_turbo.api.json"
BASE = FOLDER / "z_image.api.json"
DISTILL = FOLDER / "z_image_distill.api.json"


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data
