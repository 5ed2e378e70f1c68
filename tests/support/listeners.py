"""A worker's listener for tests that need none: it hears every event and tells nobody."""

from __future__ import annotations

from typing import Any


class Quiet:
    def job_event(
        self, prompt_id: str, client_id: str | None, event: str, data: dict[str, Any], owner: str = ""
    ) -> None:
        pass

    def queue_changed(self) -> None:
        pass

    def listening(self) -> bool:
        return False
