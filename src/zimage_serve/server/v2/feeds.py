"""What v2's event streams follow: for each job someone watches, its progress, newest preview and the outputs
its nodes made, kept from the job's events as the server receives them (from threads, a worker process or
a cluster's bus), and handed to each watching stream on the event loop.

Only watched jobs are kept: an event for any other job costs one dict lookup. While anything is watched
the workers send every event (not only each job's end): the count goes to the hub's audience.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from zimage_serve.workflow.events import CLOSING

PROGRESS_EVERY_S = 0.5  # progress snapshots at most twice a second per job, the newest always sent
BACKLOG = 32  # items a stream may have unread before its progress and previews are skipped
SKIPPABLE = ("progress", "preview")
Item = tuple[str, dict[str, Any]]  # (event name, payload); ("end", {}) when the job has ended


@dataclass
class Feed:
    """One watched job's live state (on the event loop)."""

    job_id: str
    classes: dict[str, str]  # node id -> class type, for the progress message
    subscribers: set[asyncio.Queue[Item]] = field(default_factory=set)
    started: list[str] = field(default_factory=list)  # nodes begun, in order
    cached: set[str] = field(default_factory=set)
    step: int | None = None
    steps: int | None = None
    progress: dict[str, Any] | None = None
    preview: dict[str, Any] | None = None
    executed: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (node, its ui output)
    ended: bool = False
    # The job as its streams last read it from the queue, per view of the queue (an owner, or everyone):
    # (when, (job, status, position) or None when it is gone); shared by the job's streams.
    checked: dict[str | None, tuple[float, tuple[Any, str, int | None] | None]] = field(default_factory=dict)
    final: dict[tuple[str | None, str], bytes] = field(default_factory=dict)  # its terminal frame, per view
    output_frames: dict[tuple[str, str], list[bytes]] = field(default_factory=dict)  # per (node, origin)
    _sent_at: float = 0.0
    _trailing: asyncio.TimerHandle | None = None

    def snapshot(self) -> dict[str, Any]:
        total = max(len(self.classes), 1)
        current = self.started[-1] if self.started and not self.ended else None
        done = len(self.cached) + len(self.started) - (1 if current is not None else 0)
        fraction = self.step / self.steps if current is not None and self.step is not None and self.steps else 0.0
        value = min(1.0, (done + fraction) / total) if not self.ended else 1.0
        name = self.classes.get(current or "")
        message = None
        if current is not None:
            message = f"{name} {self.step}/{self.steps}" if self.steps else name
        return {
            "value": round(value, 4),
            "nodes_done": min(done, total),
            "nodes_total": total,
            "current_node": current,
            "current_node_class": name,
            "step": self.step if current is not None else None,
            "steps": self.steps if current is not None else None,
            "message": message,
        }

    def apply(self, event: str, data: dict[str, Any]) -> list[Item]:
        """The stream items an event makes (status, progress, output), and the feed brought up to date."""
        items: list[Item] = []
        if event == "execution_start":
            items.append(("status", {"status": "running", "queue_position": None}))
        elif event == "execution_cached":
            self.cached.update(str(n) for n in data.get("nodes") or ())
        elif event == "executing" and data.get("node") is not None:
            node = str(data["node"])
            if node not in self.started:
                self.started.append(node)
            self.step = self.steps = None
        elif event == "progress":
            self.step, self.steps = _int(data.get("value")), _int(data.get("max"))
        elif event == "executed" and isinstance(data.get("output"), dict):
            self.executed.append((str(data.get("node")), data["output"]))
            items.append(("executed", {"node": str(data.get("node")), "output": data["output"]}))
        elif event == "preview" and isinstance(data.get("data_base64"), str):
            self.preview = {
                "node_id": str(data.get("node")),
                "content_type": data.get("image_type", "image/jpeg"),
                "data_base64": data["data_base64"],
            }
            items.append(("preview", self.preview))
        elif event in CLOSING:
            self.ended = True
            items.append(("end", {}))
        if event in ("execution_cached", "executing", "progress", "executed") or event in CLOSING:
            self.progress = self.snapshot()
        return items


class JobFeeds:
    """The watched jobs; `publish` from any thread, everything else on the event loop."""

    def __init__(self, on_watched: Callable[[int], None] | None = None) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.on_watched = on_watched  # told how many streams watch, whenever that changes
        self._feeds: dict[str, Feed] = {}
        self._lock = threading.Lock()
        self._streams: Counter[str] = Counter()  # open streams per holder (a user, or an address)
        self._holders: dict[asyncio.Queue[Item], str] = {}  # whose each open stream is
        # Running jobs this node was asked to cancel, until they end: v2 shows them as `canceling`.
        self.canceling: set[str] = set()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def streams_of(self, holder: str) -> int:
        return self._streams[holder]

    def watched(self) -> int:
        return sum(self._streams.values())

    def feed(self, job_id: str) -> Feed | None:
        """The live state of a watched job (None when nobody watches it)."""
        with self._lock:
            return self._feeds.get(job_id)

    def watch(self, job_id: str, classes: dict[str, str], holder: str) -> tuple[Feed, asyncio.Queue[Item]]:
        inbox: asyncio.Queue[Item] = asyncio.Queue()
        with self._lock:
            feed = self._feeds.get(job_id)
            if feed is None:
                feed = self._feeds[job_id] = Feed(job_id, classes)
            feed.subscribers.add(inbox)
            self._holders[inbox] = holder
        self._streams[holder] += 1
        self._changed()
        return feed, inbox

    def leave(self, feed: Feed, inbox: asyncio.Queue[Item], holder: str) -> None:
        with self._lock:
            feed.subscribers.discard(inbox)
            self._holders.pop(inbox, None)
            if not feed.subscribers and self._feeds.get(feed.job_id) is feed:
                del self._feeds[feed.job_id]
                if feed._trailing is not None:
                    feed._trailing.cancel()
        self._streams[holder] -= 1
        if self._streams[holder] <= 0:
            del self._streams[holder]
        self._changed()

    def close_holder(self, holder: str) -> int:
        """End every stream of `holder` (a user whose token was revoked): each gets a `closed` item."""
        with self._lock:
            inboxes = [inbox for inbox, whose in self._holders.items() if whose == holder]
        for inbox in inboxes:
            inbox.put_nowait(("closed", {}))
        return len(inboxes)

    def _changed(self) -> None:
        if self.on_watched is not None:
            self.on_watched(self.watched())

    # -- from any thread ---------------------------------------------------------------------------
    def publish(self, job_id: str, event: str, data: dict[str, Any]) -> None:
        if event in CLOSING:
            self.canceling.discard(job_id)
        if job_id not in self._feeds:  # nobody watches it: the common case, one lookup
            return
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closing as the server stops
            loop.call_soon_threadsafe(self._apply, job_id, event, data)

    def _apply(self, job_id: str, event: str, data: dict[str, Any]) -> None:
        feed = self.feed(job_id)
        if feed is None:
            return
        items = feed.apply(event, data)
        if event in ("execution_cached", "executing", "progress"):
            self._progress(feed)
        elif event in CLOSING and feed.progress is not None:
            items.insert(0, ("progress", feed.progress))
        for inbox in list(feed.subscribers):
            for item in items:
                _put(inbox, item)

    def _progress(self, feed: Feed) -> None:
        """The newest snapshot to the streams: at once if the last went out long enough ago, else a little
        later (only the newest then)."""
        now = time.monotonic()
        wait = feed._sent_at + PROGRESS_EVERY_S - now
        if wait <= 0:
            self._send_progress(feed)
        elif feed._trailing is None and self.loop is not None:
            feed._trailing = self.loop.call_later(wait, self._send_progress, feed)

    def _send_progress(self, feed: Feed) -> None:
        feed._trailing = None
        if feed.ended or feed.progress is None:
            return
        feed._sent_at = time.monotonic()
        for inbox in list(feed.subscribers):
            _put(inbox, ("progress", feed.progress))


def _put(inbox: asyncio.Queue[Item], item: Item) -> None:
    """An item for one stream. A stream whose client reads too slowly skips progress and previews (each is
    a whole snapshot: the next one says it all) rather than holding ever more of them."""
    if item[0] in SKIPPABLE and inbox.qsize() >= BACKLOG:
        return
    inbox.put_nowait(item)


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
