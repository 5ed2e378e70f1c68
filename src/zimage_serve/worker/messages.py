"""The messages between the server and its worker process, one type each (no tuples tagged by a string).

Worker → server: what happens to jobs and to the worker itself (events a socket may want, that the queue
changed, device statistics, ready, the answer to "what runs now"; that it is idle is a flag in shared
memory, `worker/process.py`). Server → worker: wake, interrupt, free, report, stop. Small frozen
dataclasses: they pickle to a few dozen bytes and are matched by type.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from zimage_serve.metrics import JobEnd

# -- worker → server ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JobEvent:
    """A ComfyUI WebSocket event of one job (`executing`, `progress`, ...), for its owner's sockets."""

    prompt_id: str
    client_id: str | None
    event: str
    data: dict[str, Any]
    owner: str = ""


@dataclass(frozen=True, slots=True)
class QueueChanged:
    """The queue's counts changed (a status broadcast to every socket)."""


@dataclass(frozen=True, slots=True)
class DeviceStats:
    stats: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Ready:
    """The worker loaded its default model (or has none to preload)."""


@dataclass(frozen=True, slots=True)
class JobEnded:
    """A job's end as the metrics count it (sent whether or not a socket listens)."""

    end: JobEnd


@dataclass(frozen=True, slots=True)
class Executing:
    """A running prompt as the API sees it: who queued it and which node it is on. The one record of
    what runs now, whether the worker is in this process, a child process or (by the register) a cluster."""

    prompt_id: str
    client_id: str | None
    node: str | None
    owner: str = ""


@dataclass(frozen=True, slots=True)
class RunningNow:
    """The answer to `Report`: each running job."""

    token: int
    running: list[Executing]


# -- server → worker ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Wake:
    """A job was queued while the worker was idle."""


@dataclass(frozen=True, slots=True)
class Interrupt:
    prompt_id: str | None  # None: whatever runs


@dataclass(frozen=True, slots=True)
class Free:
    """Unload models (POST /free): with `caches`, drop them with every cached output; without, under smart
    memory, only move them out of the card (they stay loaded in host memory)."""

    caches: bool = True


@dataclass(frozen=True, slots=True)
class Report:
    """Say what runs now, answering with `RunningNow` and this token."""

    token: int


@dataclass(frozen=True, slots=True)
class Stop:
    """Take no new job; let the running ones finish within `timeout` seconds, then exit."""

    timeout: float | None


ToServer = JobEvent | JobEnded | QueueChanged | DeviceStats | Ready | RunningNow
ToWorker = Wake | Interrupt | Free | Report | Stop


# -- across machines -------------------------------------------------------------------------------------
# In a cluster the same messages travel as JSON over Redis channels (worker/bus.py): job events and
# queue changes from workers to every API node, wake, interrupt and free from API nodes to every worker.
Cluster = JobEvent | QueueChanged | Wake | Interrupt | Free
_BY_NAME: dict[str, type[Cluster]] = {kind.__name__: kind for kind in (JobEvent, QueueChanged, Wake, Interrupt, Free)}


def to_json(message: Cluster) -> str:
    fields = {name: getattr(message, name) for name in message.__slots__}
    return json.dumps({"type": type(message).__name__, **fields}, separators=(",", ":"))


def from_json(text: str | bytes) -> Cluster | None:
    """The message, or None for one this version does not know (a newer node's): skipped, never fatal."""
    try:
        found = json.loads(text)
        kind = _BY_NAME[found.pop("type")]
        return kind(**found)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
