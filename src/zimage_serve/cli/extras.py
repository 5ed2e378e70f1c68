"""Files `zimage generate` uses beside the model: LoRAs (`--lora`, the distill recipe's) and ControlNets,
found where a ComfyUI user keeps them (the models folder the model is in, and $ZIMAGE_MODELS)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import typer

from zimage_serve.errors import ZImageError


def model_roots(model_path: Path) -> list[Path]:
    """The models folders to look in: the one the model sits in (or is), then those of $ZIMAGE_MODELS."""
    from zimage_serve.engine.layouts import models_root_of
    from zimage_serve.settings import MODELS_ENV

    roots = [model_path] if model_path.is_dir() else [r for r in [models_root_of(model_path)] if r]
    return roots + [Path(p) for p in os.environ.get(MODELS_ENV, "").split(os.pathsep) if p]


def parsed_lora(text: str) -> tuple[Path, float]:
    """`PATH` or `PATH:STRENGTH` (strength 1 when left out)."""
    path, _, tail = text.rpartition(":")
    try:
        strength = float(tail) if path else 1.0
    except ValueError:
        path, strength = "", 1.0
    if not path:
        path = text
    if not (math.isfinite(strength) and -10 <= strength <= 10):
        raise typer.BadParameter(f"{text}: the strength {strength} is outside -10..10", param_hint="--lora")
    if not Path(path).is_file():
        raise typer.BadParameter(f"{path} is not a file", param_hint="--lora")
    return Path(path), strength


def distill_lora(model_path: Path) -> Path:
    """alibaba-pai's 8-step distill LoRA in a models folder's loras/, by its published names (the newest
    release first), or a clear error saying where to put it."""
    from zimage_serve.engine.variants import DISTILL_LORAS

    roots = model_roots(model_path)
    for name in DISTILL_LORAS:
        for root in roots:
            if (root / "loras" / name).is_file():
                return root / "loras" / name
    where = ", ".join(str(r / "loras") for r in roots) or "no models folder (pass --lora)"
    raise typer.BadParameter(
        f"the distill recipe needs {DISTILL_LORAS[0]} (alibaba-pai/Z-Image-Fun-Lora-Distill) in {where}, "
        "or give it with --lora PATH[:STRENGTH] (a file whose name says distill)",
        param_hint="--variant",
    )


def find_controlnet(model_path: Path) -> Path:
    """The one ControlNet in model_patches/ beside the model (its ComfyUI models folder), or a clear error."""
    roots = model_roots(model_path)
    found: list[Path] = []
    for root in roots:
        folder = root / "model_patches"
        if folder.is_dir():
            found += [p for p in sorted(folder.iterdir()) if _is_controlnet(p)]
    if len(found) == 1:
        return found[0]
    where = ", ".join(str(r / "model_patches") for r in roots) or "no models folder"
    why = "none found in" if not found else f"{len(found)} found in"
    raise typer.BadParameter(f"name the Fun ControlNet file or folder ({why} {where})", param_hint="--controlnet")


def _is_controlnet(path: Path) -> bool:
    from zimage_serve.engine.layouts import classify

    if path.is_dir():
        return (path / "config.json").is_file()
    try:
        return path.suffix == ".safetensors" and classify(path) == "model_patch"
    except ZImageError:
        return False
