"""Errors whose message is written for the person who caused them.

Every layer raises these for bad input; the CLI and (later) the server turn them into a clear message
and a non-zero exit or a 4xx. Anything else reaching the top is a bug.
"""

from __future__ import annotations

from pathlib import Path


class ZImageError(Exception):
    """Base class: the message alone must tell the user what is wrong and where."""


class InvalidParameterError(ZImageError):
    """A generation parameter is out of range or malformed; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class ModelLoadError(ZImageError):
    """Weights or configs cannot be used; `path` names the file or folder at fault."""

    def __init__(self, path: Path | str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = Path(path)


class DeviceError(ZImageError):
    """The requested device, dtype or memory mode is not available here."""


class GenerationCancelled(ZImageError):
    """A running generation was stopped between steps at the caller's request."""
