"""Reading a single-object scene back from pixels: background colour, object colour, shape, position.

It measures the image, not the model: the background is the colour of the border, the object is what
differs from it, the shape is a triangle when it is much wider at the bottom than at the top, else
the ideal square or circle drawn in its bounding box that overlaps it best (intersection over union,
so rounded corners and soft edges do not turn a square into a circle), and the position is the
nearest of the five anchor points to its centroid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from zimage_serve.nano.scenes import COLOURS, POSITIONS, Scene

ATTRIBUTES = ("background", "colour", "shape", "position")
_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)
_NAMES = list(COLOURS)
_OBJECT_DISTANCE = 60.0  # RGB distance from the background beyond which a pixel belongs to the object
_MIN_OBJECT_FRACTION = 0.01


@dataclass(frozen=True)
class Reading:
    background: str
    colour: str | None
    shape: str | None
    position: str | None
    fill: float = 0.0


def nearest_colour(rgb: np.ndarray) -> str:
    return _NAMES[int(np.argmin(((_PALETTE - rgb) ** 2).sum(axis=1)))]


def read(image: Image.Image) -> Reading:
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    height, width, _ = pixels.shape
    border = np.concatenate(
        [
            pixels[:2].reshape(-1, 3),
            pixels[-2:].reshape(-1, 3),
            pixels[:, :2].reshape(-1, 3),
            pixels[:, -2:].reshape(-1, 3),
        ]
    )
    background_rgb = np.median(border, axis=0)
    background = nearest_colour(background_rgb)
    mask = np.sqrt(((pixels - background_rgb) ** 2).sum(axis=2)) > _OBJECT_DISTANCE
    if mask.sum() < _MIN_OBJECT_FRACTION * height * width:
        return Reading(background, None, None, None)
    object_rgb = np.median(pixels[mask], axis=0)
    colour = nearest_colour(object_rgb)
    # Soft edges blend the two colours; the outline is where pixels are closer to the object's colour.
    mask &= ((pixels - object_rgb) ** 2).sum(axis=2) < ((pixels - background_rgb) ** 2).sum(axis=2)
    ys, xs = np.nonzero(mask)
    top, bottom = (int(v) for v in np.percentile(ys, [1, 99]))
    left, right = (int(v) for v in np.percentile(xs, [1, 99]))
    crop = mask[top : bottom + 1, left : right + 1]
    fill = float(crop.mean())
    if _taper(crop) > 0.25:  # an upright triangle is half as wide a quarter down as a quarter up
        shape = "triangle"
    else:
        shape = max(_TEMPLATES, key=lambda name: _iou(crop, _TEMPLATES[name](*crop.shape)))
    centre = np.array([xs.mean() / width, ys.mean() / height])
    position = min(POSITIONS, key=lambda p: float(((np.array(POSITIONS[p]) - centre) ** 2).sum()))
    return Reading(background, colour, shape, position, fill)


def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    v, u = np.mgrid[0:height, 0:width].astype(np.float32)
    return (u + 0.5) / width, (v + 0.5) / height


def _square(height: int, width: int) -> np.ndarray:
    return np.ones((height, width), dtype=bool)


def _circle(height: int, width: int) -> np.ndarray:
    u, v = _grid(height, width)
    return np.asarray((u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25)


def _triangle(height: int, width: int) -> np.ndarray:
    u, v = _grid(height, width)  # apex at the top centre, base along the bottom, as scenes draws it
    return np.asarray(np.abs(u - 0.5) <= v / 2)


_TEMPLATES = {"square": _square, "circle": _circle, "triangle": _triangle}


def _taper(crop: np.ndarray) -> float:
    """How much wider the lower quarter band is than the upper one, as a fraction of the box width."""
    height, width = crop.shape
    band = max(1, height // 10)
    upper = crop[max(0, height // 4 - band) : height // 4 + band].sum(axis=1).mean()
    lower = crop[3 * height // 4 - band : 3 * height // 4 + band].sum(axis=1).mean()
    return float((lower - upper) / max(1, width))


def _iou(mask: np.ndarray, template: np.ndarray) -> float:
    union = np.logical_or(mask, template).sum()
    return float(np.logical_and(mask, template).sum() / max(1, union))


def check(scene: Scene, image: Image.Image) -> dict[str, bool]:
    """Which attributes of a single-object scene the image shows correctly."""
    (target,) = scene.objects
    reading = read(image)
    return {
        "background": reading.background == scene.background,
        "colour": reading.colour == target.colour,
        "shape": reading.shape == target.kind,
        "position": reading.position == target.position,
    }
