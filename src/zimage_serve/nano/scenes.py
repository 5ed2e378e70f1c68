"""Procedural scenes for zimage-nano: shapes of named colours on coloured backgrounds, with captions.

A scene is data (`Scene`); it renders to an image and describes itself in English or Chinese in
several phrasings. Some (colour, shape, background) combinations are held out of training so the
evaluation can test generalisation to combinations the model never saw.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 220, 30),
    "purple": (130, 40, 170),
    "orange": (245, 135, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "pink": (250, 150, 195),
    "cyan": (40, 210, 225),
}
COLOUR_ZH = {
    "red": "红色",
    "green": "绿色",
    "blue": "蓝色",
    "yellow": "黄色",
    "purple": "紫色",
    "orange": "橙色",
    "white": "白色",
    "black": "黑色",
    "pink": "粉色",
    "cyan": "青色",
}
SHAPES = ("circle", "square", "triangle")
SHAPE_ZH = {"circle": "圆形", "square": "正方形", "triangle": "三角形"}
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
    "centre": (0.5, 0.5),
}
POSITION_EN = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}
POSITION_ZH = {"left": "左边", "right": "右边", "top": "上面", "bottom": "下面", "centre": "中间"}
SIZES = {"small": 0.24, "large": 0.42}  # side of the shape's box, as a fraction of the image side
SIZE_ZH = {"small": "小", "large": "大"}
LANGUAGES = ("en", "zh")


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    position: str
    size: str


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[Shape, ...]
    jitter: tuple[float, float] = (0.0, 0.0)  # small offset of the whole layout, in image fractions


def held_out_combinations() -> frozenset[tuple[str, str, str]]:
    """(object colour, shape, background) triples never shown in training: a fixed tenth of them."""
    rng = random.Random(20261126)
    triples = [(c, s, b) for c in COLOURS for s in SHAPES for b in COLOURS if b != c]
    return frozenset(rng.sample(triples, len(triples) // 10))


HELD_OUT = held_out_combinations()


def is_held_out(scene: Scene) -> bool:
    return any((o.colour, o.kind, scene.background) in HELD_OUT for o in scene.objects)


def random_scene(rng: random.Random, *, held_out: bool = False, objects: int | None = None) -> Scene:
    """A training scene (never a held-out combination) or, with `held_out`, one single-object test scene."""
    if held_out:
        colour, kind, background = rng.choice(sorted(HELD_OUT))
        shape = Shape(kind, colour, rng.choice(list(POSITIONS)), rng.choice(list(SIZES)))
        return Scene(background, (shape,), _jitter(rng))
    while True:
        count = objects or (1 if rng.random() < 0.7 else 2)
        background = rng.choice(list(COLOURS))
        places = rng.sample(["left", "right"] if count == 2 and rng.random() < 0.7 else list(POSITIONS), count)
        if count == 2 and set(places) in ({"left", "right"}, {"top", "bottom"}):
            sizes = [rng.choice(list(SIZES)) for _ in places]
        else:
            sizes = ["small"] * count if count == 2 else [rng.choice(list(SIZES))]
        colours = rng.sample([c for c in COLOURS if c != background], count)
        shapes = tuple(Shape(rng.choice(SHAPES), c, p, s) for c, p, s in zip(colours, places, sizes, strict=True))
        scene = Scene(background, shapes, _jitter(rng))
        if not is_held_out(scene):
            return scene


def _jitter(rng: random.Random) -> tuple[float, float]:
    return (rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04))


def render(scene: Scene, size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), COLOURS[scene.background])
    draw = ImageDraw.Draw(image)
    for shape in scene.objects:
        cx, cy = POSITIONS[shape.position]
        cx, cy = (cx + scene.jitter[0]) * size, (cy + scene.jitter[1]) * size
        half = SIZES[shape.size] * size / 2
        box = (cx - half, cy - half, cx + half, cy + half)
        fill = COLOURS[shape.colour]
        if shape.kind == "circle":
            draw.ellipse(box, fill=fill)
        elif shape.kind == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    return image


def caption(
    scene: Scene, language: str, rng: random.Random, *, complete: bool = False, unsaid_defaults: bool = True
) -> str:
    """One of several phrasings. Position and size are sometimes left unsaid, as people do, unless
    `complete` asks for every attribute (evaluation prompts).

    With `unsaid_defaults`, only the defaults go unsaid: a lone shape with no position is in the centre
    and one with no size is large, so a short prompt such as "a red circle" names one picture rather than
    ten. A small model trained on ambiguous captions draws the average of the choices: a lumpy blob of
    middling size that is neither circle nor square. (False gives the captions of the session-2 model.)
    """
    said = 1.0 if complete else 0.5 if unsaid_defaults else 0.85
    if language == "en":
        return _caption_en(scene, rng, said, unsaid_defaults)
    return _caption_zh(scene, rng, said, unsaid_defaults)


def _says_size(shape: Shape, rng: random.Random, unsaid_defaults: bool) -> bool:
    return (unsaid_defaults and shape.size != "large") or rng.random() < 0.6


def _says_position(scene: Scene, shape: Shape, rng: random.Random, said: float, unsaid_defaults: bool) -> bool:
    return len(scene.objects) > 1 or (unsaid_defaults and shape.position != "centre") or rng.random() < said


def _caption_en(scene: Scene, rng: random.Random, said: float, unsaid_defaults: bool) -> str:
    parts = []
    for shape in scene.objects:
        size = f"{shape.size} " if _says_size(shape, rng, unsaid_defaults) else ""
        article = "an" if (size or shape.colour)[0] in "aeiou" else "a"
        where = f" {POSITION_EN[shape.position]}" if _says_position(scene, shape, rng, said, unsaid_defaults) else ""
        parts.append(f"{article} {size}{shape.colour} {shape.kind}{where}")
    things = " and ".join(parts)
    back = scene.background
    return rng.choice(
        [
            f"{things} on a {back} background",
            f"{things}, {back} background",
            f"a {back} background with {things}",
            f"{things} against a {back} backdrop",
        ]
    )


def _caption_zh(scene: Scene, rng: random.Random, said: float, unsaid_defaults: bool) -> str:
    back = COLOUR_ZH[scene.background]
    parts = []
    for shape in scene.objects:
        size = SIZE_ZH[shape.size] if _says_size(shape, rng, unsaid_defaults) else ""
        colour, kind = COLOUR_ZH[shape.colour], SHAPE_ZH[shape.kind]
        where = POSITION_ZH[shape.position] if _says_position(scene, shape, rng, said, unsaid_defaults) else ""
        parts.append((where, f"一个{size}{colour}的{kind}" if rng.random() < 0.5 else f"一个{size}{colour}{kind}"))
    if all(where for where, _ in parts) and rng.random() < 0.5:
        things = "，".join(f"{where}有{thing}" for where, thing in parts)
        return rng.choice([f"{back}背景，{things}", f"{things}，背景是{back}"])
    things = "和".join(f"{where}{thing}" if where else thing for where, thing in parts)
    return rng.choice([f"{back}背景上的{things}", f"{things}在{back}背景上", f"{things}，{back}背景"])


def to_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.uint8)
