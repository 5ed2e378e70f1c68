"""Where zimage-serve keeps its data, and the environment variables that configure it."""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "ZIMAGE_DATA_DIR"
MODEL_ENV = "ZIMAGE_MODEL"


def default_data_dir() -> Path:
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV]).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "zimage"
