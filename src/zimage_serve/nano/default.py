"""The model used when none is configured: zimage-nano, shipped inside the package."""

from __future__ import annotations

from pathlib import Path

from zimage_serve.errors import ModelLoadError

SHIPPED = Path(__file__).parent / "weights"
LABEL = "zimage-nano (built-in; trained on simple coloured shapes, English and Chinese)"


def default_model() -> Path:
    if not (SHIPPED / "model_index.json").is_file():
        raise ModelLoadError(
            SHIPPED,
            "the built-in zimage-nano weights are missing from this installation; reinstall zimage-serve, "
            "train them with `zimage nano train`, or pass --model",
        )
    return SHIPPED
