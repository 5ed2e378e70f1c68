"""WebSocket /ws?clientId=: ComfyUI's session, status on connect, feature flags."""

from __future__ import annotations

import asyncio
import json
import uuid

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from zimage_serve.server.connections import WEBSOCKETS_PER_USER
from zimage_serve.server.gate import caller
from zimage_serve.server.runtime import Runtime

router = APIRouter()


@router.websocket("/ws")
async def websocket(socket: WebSocket) -> None:
    rt: Runtime = socket.app.state.runtime
    sid = socket.query_params.get("clientId") or uuid.uuid4().hex
    identity = caller(socket)
    owner = identity.user
    session = (owner, sid)  # the clientId is the caller's: another user with the same one has their own
    if session not in rt.hub.sockets and rt.hub.held_by(identity) >= WEBSOCKETS_PER_USER:
        # Refused before the handshake: the browser sees a 403, and the server keeps its descriptors.
        await socket.close(code=1008, reason=f"more than {WEBSOCKETS_PER_USER} WebSockets at once")
        return
    # Counted before the handshake completes: a client may post a prompt the moment it is connected, and
    # the worker process must know by then that someone listens (it sends no events to nobody).
    await rt.hub.add(session, socket, identity)
    try:
        await socket.accept()
        status = rt.status(identity)
        status["sid"] = sid
        await socket.send_text(json.dumps({"type": "status", "data": status}))
        # The worker process may take a moment to answer (a thread, not the loop, waits for it).
        for running in await asyncio.to_thread(rt.service.executing):
            if running.client_id == sid and running.owner == owner and running.node is not None:
                await socket.send_text(json.dumps({"type": "executing", "data": {"node": running.node}}))
        first = True
        while True:
            text = await socket.receive_text()
            if not first:
                continue
            first = False
            try:
                message = json.loads(text)
            except json.JSONDecodeError:
                continue
            if isinstance(message, dict) and message.get("type") == "feature_flags":
                asked = message.get("data")
                rt.hub.wants_metadata(
                    session, isinstance(asked, dict) and asked.get("supports_preview_metadata") is True
                )
                flags = {"supports_preview_metadata": True, "max_upload_size": rt.settings.max_upload_bytes}
                await socket.send_text(json.dumps({"type": "feature_flags", "data": flags}))
    except WebSocketDisconnect:
        pass
    finally:
        rt.hub.remove(session, socket)
