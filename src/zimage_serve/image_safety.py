"""Opening images that clients sent, without letting one exhaust the machine.

A small file can decode to gigapixels: a 14 KB GIF of 400 frames of 2048² is 1.6 G pixels. Before any
pixel is decoded, the header gives each frame's size and the frame count; the pixels over every frame
are added up and compared with the budget. Pillow's own bomb check stays on, set to the same budget,
and its warning (between one and two budgets, which Pillow lets through) is an error here.
"""

from __future__ import annotations

import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from zimage_serve.errors import ZImageError

ALLOWED_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF", "MPO"})
MAX_FRAMES = 10_000  # more frames than this is refused before the frames are even counted one by one


class ImageRefused(ZImageError):
    """The file is not an image we decode, or decodes to more than allowed; `status` is the HTTP one."""

    def __init__(self, field: str, reason: str, status: int = 400) -> None:
        super().__init__(f"{field}: {reason}")
        self.field, self.reason, self.status = field, reason, status


@dataclass(frozen=True)
class ImageFacts:
    format: str
    width: int  # of the first frame
    height: int
    frames: int
    pixels: int  # over every frame


def use_bomb_limit(pixels: int) -> None:
    """Set Pillow's decompression-bomb limit for this process and make its warning an error."""
    Image.MAX_IMAGE_PIXELS = pixels
    warnings.simplefilter("error", Image.DecompressionBombWarning)


@contextmanager
def refusing(field: str) -> Iterator[None]:
    """Every way Pillow can fail on a file (opening, seeking, decoding), made an ImageRefused."""
    try:
        yield
    except ImageRefused:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRefused(field, f"decodes to too many pixels ({exc})", 413) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise ImageRefused(field, f"not a readable image ({exc})") from exc


def facts(image: Image.Image, field: str, max_pixels: int) -> ImageFacts:
    """Format, size and pixels over all frames, from the headers; refuses a format we do not decode and
    more pixels than `max_pixels` (413)."""
    if image.format not in ALLOWED_FORMATS:
        raise ImageRefused(field, f"{image.format} images are not accepted", 415)
    width, height = image.size
    frames = int(getattr(image, "n_frames", 1))
    if frames > MAX_FRAMES:
        raise ImageRefused(field, f"{frames:,} frames is more than the {MAX_FRAMES:,} accepted", 413)
    if image.format == "TIFF" and frames > 1:  # each page has its own size; seeking reads only its header
        pixels = 0
        for page in range(frames):
            image.seek(page)
            pixels += image.size[0] * image.size[1]
            if pixels > max_pixels:
                break
        image.seek(0)
    else:  # GIF, WebP, APNG and MPO frames are at most the canvas the header gives
        pixels = width * height * frames
    if pixels > max_pixels:
        shown = f"{frames:,} frames of {width}×{height}" if frames > 1 else f"{width}×{height}"
        raise ImageRefused(field, f"{shown} is {pixels:,} pixels, more than the {max_pixels:,} allowed", 413)
    return ImageFacts(str(image.format), width, height, frames, pixels)
