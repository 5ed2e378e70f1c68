"""What a running node may use: who runs it, their folders, the device, its hidden inputs, progress and
interrupt."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from zimage_serve.identity import LOCAL, Identity
from zimage_serve.limits import Limits
from zimage_serve.workflow.folders import Folders
from zimage_serve.workflow.naming import RunOutputs

if TYPE_CHECKING:
    from zimage_serve.engine.placement import Placement


class ResourceLists(Protocol):
    def names(self, resource: str) -> list[str]: ...


class Interrupted(Exception):
    """Raised inside a node when the run was interrupted; the executor reports it, never as an error."""


class Stop:
    """A run's stop request: set from any thread, read by the run between nodes and steps (an Event without
    the waiting, cheaper to make once per prompt). `timeout`: why a time limit stopped the run. A caller
    may make it before the run starts and pass it to `Executor.run`: a stop asked for in between is kept."""

    __slots__ = ("_value", "timeout")

    def __init__(self) -> None:
        self._value = False
        self.timeout: str | None = None

    def set(self, timeout: str | None = None) -> None:
        self.timeout = self.timeout or timeout
        self._value = True

    def is_set(self) -> bool:
        return self._value


@dataclass
class NodeContext:
    folders: Folders
    placement: Placement
    node_id: str
    prompt: dict[str, Any] = field(default_factory=dict)  # hidden PROMPT
    extra_pnginfo: dict[str, Any] | None = None  # hidden EXTRA_PNGINFO
    on_progress: Callable[[int, int], None] | None = None
    interrupted: Callable[[], bool] = lambda: False
    limits: Limits = field(default_factory=Limits)
    outputs: RunOutputs | None = None  # where the run's files are journaled (exactly one file per output)
    identity: Identity = LOCAL  # whose job this is; `folders` are that caller's space, `limits` theirs
    # Told the images a sampler is about to make; raises (a quota reached) to stop the run before it does.
    count_images: Callable[[int], None] = lambda images: None

    # Given the sampler's newest prediction of the clean latent (and its format) after each step: the run
    # turns it into a preview when someone watches (workflow/previews.py). None: no previews for this run.
    on_preview: Callable[[Any, Any], None] | None = None

    def progress(self, value: int, total: int) -> None:
        if self.on_progress is not None:
            self.on_progress(value, total)

    def preview(self, latent: Any, latent_format: Any) -> None:
        if self.on_preview is not None:
            self.on_preview(latent, latent_format)

    def check_interrupt(self) -> None:
        if self.interrupted():
            raise Interrupted(f"interrupted in node {self.node_id}")
