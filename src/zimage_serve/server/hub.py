"""WebSocket sessions and who gets which message, as ComfyUI routes them.

Execution events go to the client that queued the prompt (and nowhere when it gave no client_id);
`progress` and `execution_interrupted` fall back to everyone; `status` goes to everyone. A session is
its user's: sockets are keyed by (user, clientId), so another user who connects with the same clientId
gets a session of their own and never the first one's events, and the fallbacks reach only the job
owner's sockets. Messages come from the worker thread and are handed to the event loop thread-safely.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import struct
from collections import Counter
from collections.abc import Callable
from typing import Any, NamedTuple

from starlette.websockets import WebSocket

from zimage_serve.identity import LOCAL, Identity

log = logging.getLogger(__name__)

Session = tuple[str, str]  # (user, clientId)
PREVIEW_IMAGE, PREVIEW_IMAGE_WITH_METADATA, JPEG = 1, 4, 1  # ComfyUI's binary message types, image format


class Frames(NamedTuple):
    """One preview as ComfyUI's two binary messages: type 1 (format and image), type 4 (with its node)."""

    plain: bytes
    with_metadata: bytes


def preview_frames(data: dict[str, Any]) -> Frames:
    image = base64.b64decode(data["data_base64"])
    node = data.get("node")
    metadata = {
        "node_id": node,
        "display_node_id": data.get("display_node", node),
        "parent_node_id": None,
        "real_node_id": node,
        "prompt_id": data.get("prompt_id"),
        "image_type": data.get("image_type", "image/jpeg"),
    }
    encoded = json.dumps(metadata).encode()
    plain = struct.pack(">II", PREVIEW_IMAGE, JPEG) + image
    return Frames(plain, struct.pack(">II", PREVIEW_IMAGE_WITH_METADATA, len(encoded)) + encoded + image)


TO_CLIENT_ONLY = frozenset(
    {"execution_start", "execution_cached", "executing", "executed", "execution_success", "execution_error"}
)


class Hub:
    """Sockets by session id, and one pump task that sends every message in the order it was published."""

    def __init__(self) -> None:
        self.sockets: dict[Session, WebSocket] = {}
        self._viewers: dict[Session, Identity] = {}  # who each socket is (its view of the queue, its cap)
        self._held: Counter[str] = Counter()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._outbox: asyncio.Queue[tuple[str | Frames, list[Session] | str | None]] | None = None
        self._with_metadata: set[Session] = set()  # sockets that asked for previews with their node (type 4)
        self._pump_task: asyncio.Task[None] | None = None
        # Told the number of sockets and event streams whenever it changes (the worker process skips, while
        # nobody is connected, the events that only they would receive).
        self.on_audience: Callable[[int], None] | None = None
        self._streams = 0  # Comfy API v2's event streams (server/v2/feeds.py)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._outbox = asyncio.Queue()
        self._pump_task = loop.create_task(self._pump())

    async def close(self) -> None:
        if self._pump_task is not None:
            self._pump_task.cancel()
        for socket in list(self.sockets.values()):
            with contextlib.suppress(Exception):  # already closed
                await socket.close(code=1001)
        self.sockets.clear()
        self._viewers.clear()
        self._held.clear()

    def held_by(self, viewer: Identity) -> int:
        """How many sockets count against `viewer`'s cap (server/connections.py)."""
        return self._held[_holder(viewer)]

    async def add(self, session: Session, socket: WebSocket, viewer: Identity = LOCAL) -> None:
        old = self.sockets.get(session)
        self.sockets[session] = socket
        if old is None:  # a session taken over keeps its first socket's viewer: the same user, counted once
            self._viewers[session] = viewer
            self._held[_holder(viewer)] += 1
        self._audience_changed()
        if old is not None and old is not socket:
            with contextlib.suppress(Exception):  # the old connection may already be gone
                await old.close()

    def remove(self, session: Session, socket: WebSocket) -> None:
        if self.sockets.get(session) is socket:
            del self.sockets[session]
            self._with_metadata.discard(session)
            holder = _holder(self._viewers.pop(session, LOCAL))
            self._held[holder] -= 1
            if self._held[holder] <= 0:
                del self._held[holder]
            self._audience_changed()

    async def close_user(self, owner: str, code: int = 1008) -> None:
        """Close every socket of a user (their token was revoked)."""
        for session, socket in list(self.sockets.items()):
            if session[0] == owner:
                self.remove(session, socket)
                with contextlib.suppress(Exception):
                    await socket.close(code=code)

    def audience(self) -> int:
        """Sockets and event streams: while there are none, workers send only each job's end."""
        return len(self.sockets) + self._streams

    def streams_changed(self, streams: int) -> None:
        self._streams = streams
        self._audience_changed()

    def _audience_changed(self) -> None:
        if self.on_audience is not None:
            self.on_audience(self.audience())

    # -- from any thread ---------------------------------------------------------------------------
    def publish(self, event: str, data: dict[str, Any], client_id: str | None, owner: str = "") -> None:
        """Route one execution message of a job `owner` queued; safe to call from the worker thread."""
        if client_id is None and event in TO_CLIENT_ONLY:
            return
        # Nobody to tell: skip the encoding and the hop to the loop (a client that connects later gets
        # `status` on connect, as in ComfyUI, and no replay of what it missed).
        session = (owner, client_id) if client_id is not None else None
        if not self.sockets or (event in TO_CLIENT_ONLY and session not in self.sockets):
            return
        targets = [session] if session is not None else owner
        if event == "preview":  # binary, as ComfyUI sends it; to the prompt's client, else its owner's sockets
            self._post(preview_frames(data), targets)
            return
        self._post(json.dumps({"type": event, "data": data}), targets)

    def broadcast(self, event: str, data: dict[str, Any] | Callable[[], dict[str, Any]]) -> None:
        """`data` may be a function, called only when someone is connected."""
        if not self.sockets:
            return
        self._post(json.dumps({"type": event, "data": data() if callable(data) else data}), None)

    def broadcast_by_view(self, event: str, data: Callable[[Identity], dict[str, Any]]) -> None:
        """To every session, `data` as its caller sees it: computed once per view (everyone's for the
        admins, one user's own for each user), only for the views someone connected has."""
        groups: dict[str | None, list[Session]] = {}
        viewers: dict[str | None, Identity] = {}
        for session in list(self.sockets):
            viewer = self._viewers.get(session, LOCAL)
            view = viewer.owner_filter()
            groups.setdefault(view, []).append(session)
            viewers.setdefault(view, viewer)
        for view, sessions in groups.items():
            self._post(json.dumps({"type": event, "data": data(viewers[view])}), sessions)

    def wants_metadata(self, session: Session, wanted: bool) -> None:
        """The socket's feature flags: previews as type 4 (with their node) rather than type 1."""
        if wanted:
            self._with_metadata.add(session)
        else:
            self._with_metadata.discard(session)

    def _post(self, text: str | Frames, targets: list[Session] | str | None) -> None:
        """To the sessions listed, to every session of one owner (a string), or to everyone (None)."""
        loop, outbox = self.loop, self._outbox
        if loop is None or outbox is None or loop.is_closed():
            return
        # The loop may close between the check and the call while the server shuts down; a message
        # that cannot be delivered then must not fail the job that produced it.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(outbox.put_nowait, (text, targets))

    async def _pump(self) -> None:
        assert self._outbox is not None
        while True:
            text, targets = await self._outbox.get()
            if targets is None:
                sessions = list(self.sockets)
            elif isinstance(targets, str):
                sessions = [s for s in self.sockets if s[0] == targets]
            else:
                sessions = [t for t in targets if t in self.sockets]
            for sid in sessions:
                socket = self.sockets.get(sid)
                if socket is None:
                    continue
                try:
                    if isinstance(text, Frames):
                        await socket.send_bytes(text.with_metadata if sid in self._with_metadata else text.plain)
                    else:
                        await socket.send_text(text)
                except Exception:  # a client that went away; its handler removes it
                    log.debug("could not send to %s", sid)


def _holder(viewer: Identity) -> str:
    """Whose WebSocket cap a socket counts against: its user's; with authentication off, where everyone is
    one user, its address's."""
    return viewer.user or viewer.address
