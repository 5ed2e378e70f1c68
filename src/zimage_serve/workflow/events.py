"""ComfyUI's execution messages that more than the executor writes (the queue records a crash with one);
no imports beyond the standard library, so the server process can use them without the engine."""

from __future__ import annotations

import time
from typing import Any

# How a run ends: the last of its events. The executor returns it (`RunResult.closing`) rather than emit
# it, so that whoever records the run says it only once the run is recorded.
CLOSING = frozenset({"execution_success", "execution_error", "execution_interrupted"})


def now_ms() -> int:
    return int(time.time() * 1000)


def execution_error(
    prompt_id: str,
    message: str,
    exception_type: str,
    *,
    node_id: str | None = None,
    node_type: str | None = None,
    executed: list[str] | None = None,
    current_inputs: dict[str, Any] | None = None,
    current_outputs: list[str] | None = None,
) -> dict[str, Any]:
    """ComfyUI's `execution_error` data. The traceback stays in the server log, never shown to clients."""
    return {
        "prompt_id": prompt_id,
        "node_id": node_id,
        "node_type": node_type,
        "executed": executed or [],
        "exception_message": message,
        "exception_type": exception_type,
        "traceback": [],
        "current_inputs": current_inputs or {},
        "current_outputs": current_outputs or [],
        "timestamp": now_ms(),
    }
