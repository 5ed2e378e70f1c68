"""Our own routes for tokens and usage, under /api/zimage/: the admin API for what `zimage tokens` does,
and each user's view of their quotas."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from zimage_serve.identity import Identity
from zimage_serve.security.tokens import LIMITS, Token, TokenError
from zimage_serve.server.gate import audit_note, caller, caller_token
from zimage_serve.server.routes_queue import comfy_error, json_body, runtime
from zimage_serve.server.schemas import BodyError, TokenRequest, json_request, validated

router = APIRouter()


def admin_only(identity: Identity) -> Response | None:
    if identity.admin:
        return None
    return comfy_error("forbidden", "Admins only", "this route needs a token with the admin role", 403)


def _limits(token: Token | None) -> dict[str, int | None]:
    return {name: getattr(token, name) if token is not None else None for name in LIMITS}


@router.get("/zimage/tokens")
async def list_tokens(request: Request) -> Response:
    refused = admin_only(caller(request))
    if refused is not None:
        return refused
    tokens = await asyncio.to_thread(runtime(request).security.tokens.tokens)
    return JSONResponse({"tokens": [token.public() for token in tokens]})


@router.post("/zimage/tokens", openapi_extra=json_request(TokenRequest))
async def create_token(request: Request) -> Response:
    refused = admin_only(caller(request))
    if refused is not None:
        return refused
    try:
        body = await json_body(request)
    except ValueError as exc:
        return comfy_error("invalid_request", "Invalid request body", str(exc))
    try:
        asked = validated(TokenRequest, body)
    except BodyError as exc:
        return comfy_error("invalid_request", "Invalid token", str(exc))
    name, role = asked.name, asked.role
    limits: dict[str, Any] = {key: getattr(asked, key) for key in LIMITS}
    try:
        token, record = await asyncio.to_thread(
            runtime(request).security.tokens.create, name, role, asked.inherit, **limits
        )
    except TokenError as exc:
        status = 409 if exc.conflict else 400
        return comfy_error("invalid_token_request", "Cannot create the token", str(exc).removeprefix("NAME: "), status)
    audit_note(request, token_name=name, role=role, token_user=record.owner)
    return JSONResponse({"token": token, **record.public()}, status_code=201)


@router.delete("/zimage/tokens/{name}")
async def revoke_token(request: Request, name: str) -> Response:
    refused = admin_only(caller(request))
    if refused is not None:
        return refused
    rt = runtime(request)
    try:
        record = await asyncio.to_thread(rt.security.tokens.revoke, name)
    except TokenError as exc:
        return comfy_error("not_found", "No such token", str(exc).removeprefix("NAME: "), 404)
    await rt.revoked(record.owner)
    audit_note(request, token_name=name, token_user=record.owner)
    return JSONResponse(record.public())


@router.get("/zimage/usage")
async def usage(request: Request) -> Response:
    """The caller's own usage today (UTC) and limits; an admin's answer lists every user (by id: a user of
    a revoked token keeps their row, apart from a later user of the same name)."""
    rt = runtime(request)
    identity = caller(request)
    rows = {row["user"]: row for row in await asyncio.to_thread(rt.service.usage, identity)}

    def entry(user: str, token: Token | None) -> dict[str, Any]:
        row = rows.get(user) or {"user": user, "jobs_today": 0, "images_today": 0, "queued": 0}
        return {
            **row,
            "name": token.name if token is not None else None,
            "requests_last_minute": rt.security.rate.recent(user),
            "role": token.role if token is not None else identity.role,
            "limits": _limits(token),
        }

    if not identity.admin:
        return JSONResponse(entry(identity.user, caller_token(request)))
    tokens = {t.owner: t for t in await asyncio.to_thread(rt.security.tokens.tokens)}
    names = sorted(set(rows) | set(tokens))
    users = [{**entry(n, tokens.get(n)), "revoked": tokens[n].revoked if n in tokens else None} for n in names]
    return JSONResponse({"user": identity.user, "role": identity.role, "users": users})
