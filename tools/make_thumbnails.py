"""Make the template browser's thumbnails shipped in src/zimage_serve/workflows/thumbnails/.

    .venv/bin/python tools/make_thumbnails.py

zimage-nano's is its own workflow's image (run here, on the CPU, in seconds); the 6B models' weights
are not on this machine, so their thumbnails are a title card rather than a picture that would pretend.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "src" / "zimage_serve" / "workflows" / "thumbnails"
SIZE = 256


def nano() -> Image.Image:
    with tempfile.TemporaryDirectory() as folder:
        workflow = ROOT / "src" / "zimage_serve" / "workflows" / "zimage_nano.api.json"
        subprocess.run(
            [sys.executable, "-m", "zimage_serve.cli", "run", str(workflow), "--output-dir", folder], check=True
        )
        [image] = sorted(Path(folder).rglob("*.png"))
        return Image.open(image).convert("RGB").resize((SIZE, SIZE), Image.Resampling.NEAREST)


def card(title: str, lines: list[str]) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), "#1d2433")
    draw = ImageDraw.Draw(image)
    draw.rounded_rectangle((12, 12, SIZE - 12, SIZE - 12), radius=18, outline="#3b82f6", width=4)
    draw.text((28, 70), title, fill="white", font=ImageFont.load_default(size=26))
    for index, line in enumerate(lines):
        draw.text((28, 120 + 28 * index), line, fill="#9ca3af", font=ImageFont.load_default(size=18))
    return image


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    nano().save(OUT / "zimage-nano-1.webp", quality=85)
    card("Z-Image-Turbo", ["text to image", "8 steps, 1024 x 1024", "Tongyi-MAI"]).save(
        OUT / "z-image-turbo-1.webp", quality=85
    )
    card("Z-Image", ["text to image", "50 steps, cfg 4, negative", "Tongyi-MAI"]).save(
        OUT / "z-image-1.webp", quality=85
    )


if __name__ == "__main__":
    main()
