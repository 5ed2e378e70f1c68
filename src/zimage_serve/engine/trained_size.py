"""Models trained at one size only (zimage-nano: 128²), and the warning for asking them for another.

A diffusers folder declares it in model_index.json as `_zimage_serve.native_size` (diffusers ignores keys
that start with '_'); the 6B models declare nothing, since they draw any size from 512² to 2048². At a
size it never saw, such a model draws a pattern, not a picture (zimage-nano at 1024²: a checkerboard
after 36 s), so the CLI, `zimage batch` and the server's log say so before the time is spent.
"""

from __future__ import annotations

import json
from pathlib import Path


def declared_size(folder: Path) -> int | None:
    """The one size a diffusers folder's model was trained at, if it declares one."""
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    extra = index.get("_zimage_serve") if isinstance(index, dict) else None
    size = extra.get("native_size") if isinstance(extra, dict) else None
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def size_warning(model: str, trained: int | None, width: int, height: int) -> str | None:
    if trained is None or (width, height) == (trained, trained):
        return None
    return (
        f"{model} was trained at {trained}×{trained} only; at {width}×{height} it draws a pattern, not a "
        f"picture (ask for {trained}×{trained})"
    )
