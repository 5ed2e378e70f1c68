"""A run's live previews: after a sampling step, the newest prediction of the clean image as a small JPEG, sent
as a `preview` event (the server turns it into ComfyUI's binary WebSocket frame and v2's `preview` event).

Previews cost nothing while nobody watches (no socket, no event stream), and are made at most
`EVERY_S` apart; ComfyUI's per-prompt `extra_data.preview_method` overrides the server's
`--preview-method` (`none` turns them off; `auto`, `latent2rgb` and `taesd` all give the latent-to-RGB
preview here).
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)
EVERY_S = 0.2
METHODS = ("none", "auto", "latent2rgb", "taesd")


@dataclass(frozen=True)
class PreviewSettings:
    method: str = "auto"  # the server's --preview-method
    max_side: int = 512  # --preview-size

    def method_for(self, extra_data: dict[str, Any]) -> str:
        asked = extra_data.get("preview_method")
        return asked if isinstance(asked, str) and asked in METHODS else self.method


class RunPreviews:
    """One run's previews: `for_node(node_id)` is the NodeContext's `on_preview` (None when they are off)."""

    def __init__(
        self,
        settings: PreviewSettings,
        extra_data: dict[str, Any],
        prompt_id: str,
        emit: Callable[[str, dict[str, Any]], None],
        watched: Callable[[], bool] | None,
    ) -> None:
        self.on = settings.method_for(extra_data) != "none"
        self.max_side, self.prompt_id, self.emit, self.watched = settings.max_side, prompt_id, emit, watched
        self._last = 0.0

    def for_node(self, node_id: str) -> Callable[[Any, Any], None] | None:
        if not self.on:
            return None
        return lambda latent, latent_format: self._preview(node_id, latent, latent_format)

    def _preview(self, node_id: str, latent: Any, latent_format: Any) -> None:
        now = time.monotonic()
        if now - self._last < EVERY_S or (self.watched is not None and not self.watched()):
            return
        from zimage_serve.engine.latent_preview import PREVIEWS, jpeg

        table = PREVIEWS.table(latent_format)
        if table is None or latent.shape[1] != table.channels:
            return
        try:
            image = jpeg(table.project(latent), self.max_side)
        except Exception:  # a preview is never worth a failed run
            log.warning("could not make a preview for node %s", node_id, exc_info=True)
            return
        self._last = time.monotonic()
        data = {
            "node": node_id,
            "display_node": node_id,
            "prompt_id": self.prompt_id,
            "image_type": "image/jpeg",
            "data_base64": base64.b64encode(image).decode("ascii"),
        }
        self.emit("preview", data)
