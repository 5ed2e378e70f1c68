"""The admin API for what `zimage webhooks` does, under /api/zimage/webhooks.

GET    /api/zimage/webhooks            the endpoints (never their secrets)
POST   /api/zimage/webhooks            register one: {"name", "url", "events"?, "user"?, "subscribe"?};
                                       its secret is in this answer only
DELETE /api/zimage/webhooks/{name}     remove one
GET    /api/zimage/webhooks/dead       deliveries given up on
POST   /api/zimage/webhooks/replay     {"ids"?}: send dead deliveries again
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from zimage_serve.server.gate import audit_note, caller
from zimage_serve.server.routes_queue import comfy_error, json_body, runtime
from zimage_serve.server.routes_security import admin_only
from zimage_serve.server.schemas import BodyError, ReplayRequest, WebhookRequest, json_request, validated
from zimage_serve.webhooks.store import WebhookError, Webhooks

router = APIRouter()


def _store(request: Request) -> Webhooks | Response:
    refused = admin_only(caller(request))
    if refused is not None:
        return refused
    store = runtime(request).webhooks
    if store is None:
        why = "this server keeps no webhook endpoints"
        return comfy_error("unsupported", "No webhooks here", why, 409)
    return store


@router.get("/zimage/webhooks")
async def list_webhooks(request: Request) -> Response:
    store = _store(request)
    if isinstance(store, Response):
        return store
    endpoints = await asyncio.to_thread(store.endpoints)
    return JSONResponse({"endpoints": [endpoint.public() for endpoint in endpoints]})


@router.post("/zimage/webhooks", openapi_extra=json_request(WebhookRequest))
async def add_webhook(request: Request) -> Response:
    store = _store(request)
    if isinstance(store, Response):
        return store
    try:
        asked = validated(WebhookRequest, await json_body(request))
    except (ValueError, BodyError) as exc:
        return comfy_error("invalid_request", "Invalid webhook", str(exc))
    owner = ""
    if asked.user is not None:
        found = await asyncio.to_thread(runtime(request).security.tokens.user_named, asked.user)
        if found is None:
            return comfy_error("invalid_request", "Invalid webhook", f"user: no token is named {asked.user!r}")
        owner = found
    try:
        endpoint, secret = await asyncio.to_thread(
            store.add, asked.name, asked.url, list(asked.events or []), owner, asked.subscribe
        )
    except WebhookError as exc:
        status = 409 if "exists already" in str(exc) else 400
        return comfy_error("invalid_webhook", "Cannot register the webhook", str(exc), status)
    # the host only: a path or query may be a secret of the receiver's (chat webhooks put one there)
    parts = urlsplit(endpoint.url)
    audit_note(request, webhook=endpoint.name, webhook_host=f"{parts.scheme}://{parts.netloc}")
    return JSONResponse({"secret": secret, **endpoint.public()}, status_code=201)


@router.delete("/zimage/webhooks/{name}")
async def remove_webhook(request: Request, name: str) -> Response:
    store = _store(request)
    if isinstance(store, Response):
        return store
    if not await asyncio.to_thread(store.remove, name):
        return comfy_error("not_found", "No such webhook", f"no endpoint is named {name!r}", 404)
    audit_note(request, webhook=name)
    return JSONResponse({"removed": name})


@router.get("/zimage/webhooks/dead")
async def dead_webhooks(request: Request) -> Response:
    store = _store(request)
    if isinstance(store, Response):
        return store
    return JSONResponse({"dead": await asyncio.to_thread(store.dead_letters)})


@router.post("/zimage/webhooks/replay", openapi_extra=json_request(ReplayRequest))
async def replay_webhooks(request: Request) -> Response:
    store = _store(request)
    if isinstance(store, Response):
        return store
    try:
        asked = validated(ReplayRequest, await json_body(request))
    except (ValueError, BodyError) as exc:
        return comfy_error("invalid_request", "Invalid replay", str(exc))
    count = await asyncio.to_thread(store.replay, asked.ids)
    audit_note(request, replayed=count)
    return JSONResponse({"replayed": count})
