"""Reading back what the server and the CLI write."""

from __future__ import annotations

from pathlib import Path

from PIL import Image


def read_png_text(path: Path) -> dict[str, str]:
    """A PNG's text chunks (ComfyUI's "prompt" and "workflow", A1111's "parameters", our "zimage")."""
    with Image.open(path) as image:
        image.load()
        return {str(k): str(v) for k, v in getattr(image, "text", {}).items()}
