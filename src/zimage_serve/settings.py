"""Environment variables that configure zimage-serve."""

from __future__ import annotations

import os
from pathlib import Path

MODEL_ENV = "ZIMAGE_MODEL"  # the model used when --model is not given
MODELS_ENV = "ZIMAGE_MODELS"  # ComfyUI models folders for workflows, separated like PATH
DATA_DIR_ENV = "ZIMAGE_DATA_DIR"  # queue, history, inputs and outputs of `zimage serve`


def default_data_dir() -> Path:
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV])
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "zimage"


def default_models_dir(data_dir: Path | None = None) -> Path:
    """The one models folder that `zimage models pull` fills and every command reads when given no --models and
    no $ZIMAGE_MODELS: `models/` in the data dir, so a server started with --data-dir finds its own."""
    return (data_dir or default_data_dir()) / "models"
