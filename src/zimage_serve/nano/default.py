"""The model used when none is configured.

zimage-nano (trained, shipped in the package) once it exists; until then a random-weight model of the
real architecture, written once under the data dir and always labelled as such.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

SHIPPED = Path(__file__).parent / "weights"
PLACEHOLDER_NAME = "zimage-random-placeholder"


@dataclass(frozen=True)
class DefaultModel:
    path: Path
    label: str
    trained: bool


def default_model(data_dir: Path) -> DefaultModel:
    if (SHIPPED / "model_index.json").is_file():
        return DefaultModel(SHIPPED, "zimage-nano", trained=True)
    folder = data_dir / "models" / PLACEHOLDER_NAME
    if not (folder / "model_index.json").is_file():
        _write_placeholder(folder)
    return DefaultModel(
        folder,
        "random-weight placeholder of the Z-Image architecture (untrained: its images are noise; "
        "the trained zimage-nano replaces it)",
        trained=False,
    )


def _write_placeholder(folder: Path) -> None:
    from zimage_serve.nano.random_model import TinyConfig, write_random_model

    folder.parent.mkdir(parents=True, exist_ok=True)
    # Built aside and renamed into place, so an interrupted first run never leaves half a model.
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        write_random_model(staging, TinyConfig(native_size=256), seed=0)
        staging.rename(folder)
    except OSError:
        if not (folder / "model_index.json").is_file():
            raise
        # another process finished first; its copy is as good as ours
    finally:
        shutil.rmtree(staging, ignore_errors=True)
