"""Signing a browser in and out (authentication on): the sign-in page, its form, sign-out, and who is
signed in (for the pages' sign-out button).

A token entered on the sign-in page opens a session kept in an HttpOnly, SameSite=Strict cookie, so scripts
cannot read it and other sites' pages cannot send it. Signing out is a POST (a link or an image could not
sign anyone out), refused like every state-changing request when it comes from another site's page (the
gate's Origin and Sec-Fetch-Site checks); it closes the session on the server, not only in this browser.
"""

from __future__ import annotations

import asyncio
import html
from pathlib import Path
from string import Template
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse

from zimage_serve.security.tokens import SESSION_S, Token
from zimage_serve.server.gate import SESSION_COOKIE, audit_note, caller, caller_token
from zimage_serve.server.routes_queue import comfy_error, runtime

router = APIRouter()
PAGE = Template((Path(__file__).parent / "pages" / "sign_in.html").read_text(encoding="utf-8"))
SIGNED_IN = """<form id="signed-in" method="post" action="logout"><p>Signed in as <b>{user}</b> / 已登录</p>
<input type="hidden" name="next" value="{next}"><button type="submit">Sign out / 退出登录</button></form>
"""


def _next(value: str | None) -> str:
    """Where to go after signing in: a path of this server only (never another site)."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    parts = urlsplit(value)
    return value if not parts.scheme and not parts.netloc else "/"


def _page(next_path: str, error: str = "", status: int = 200, signed_in: Token | None = None) -> HTMLResponse:
    shown = f'<p class="error" role="alert">{html.escape(error)}</p>' if error else ""
    next_value = html.escape(next_path, quote=True)
    who = SIGNED_IN.format(user=html.escape(signed_in.name), next=next_value) if signed_in is not None else ""
    body = PAGE.substitute(next=next_value, error=shown, signed_in=who)
    return HTMLResponse(body, status_code=status, headers={"Cache-Control": "no-store"})


def _session(request: Request) -> Token | None:
    """The active token this browser's session cookie stands for, if authentication is on and it has one.

    The gate lets /login through without a credential, so the page looks the cookie up itself."""
    security = runtime(request).security
    secret = request.cookies.get(SESSION_COOKIE)
    token = security.tokens.session(secret) if secret and security.needs_credential(request.headers) else None
    return token if token is not None and token.active else None


@router.get("/login", include_in_schema=False)
async def sign_in_page(request: Request) -> Response:
    return _page(_next(request.query_params.get("next")), signed_in=_session(request))


@router.post("/login", include_in_schema=False)
async def sign_in(request: Request) -> Response:
    rt = runtime(request)
    raw = (await request.body())[:4096].decode("utf-8", "replace")
    form = {k: v[0] for k, v in parse_qs(raw).items()}
    next_path = _next(form.get("next"))
    token = form.get("token", "").strip()
    opened = rt.security.tokens.open_session(token) if token else None
    if opened is None:
        audit_note(request, outcome="refused", reason="bad token on the sign-in page")
        return _page(next_path, "That token is not valid. / 令牌无效。", 401, _session(request))
    secret, record = opened
    audit_note(request, user=record.name)
    response = RedirectResponse(next_path, status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        secret,
        max_age=SESSION_S,
        httponly=True,
        samesite="strict",
        secure=(rt.settings.security.public_url or "").startswith("https://"),
        path="/",
    )
    return response


@router.post("/logout", include_in_schema=False)
async def sign_out(request: Request) -> Response:
    """Close the session and clear the cookie; then the sign-in page, which comes back to `next` (a form
    field or query parameter: a path of this server) after signing in again."""
    secret = request.cookies.get(SESSION_COOKIE)
    signed_out = _session(request)
    if secret:
        runtime(request).security.tokens.close_session(secret)
    if signed_out is not None:
        audit_note(request, user=signed_out.name)
    raw = (await request.body())[:4096].decode("utf-8", "replace")
    given = parse_qs(raw).get("next", [None])[0] or request.query_params.get("next")
    next_path = _next(given)
    response = RedirectResponse("/login" + (f"?{urlencode({'next': next_path})}" if given else ""), status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return response


@router.get("/zimage/session")
async def session(request: Request) -> dict[str, Any]:
    """Who is calling and whether through a browser's sign-in session: the pages show a sign-out button
    only then (the cookie is HttpOnly, so their scripts cannot see it themselves)."""
    identity = caller(request)
    signed_in = bool(
        runtime(request).security.needs_credential(request.headers)
        and request.cookies.get(SESSION_COOKIE)
        and caller_token(request) is not None
    )
    return {"user": identity.token_name, "role": identity.role, "signed_in": signed_in}


@router.get("/zimage/sessions")
async def list_sessions(request: Request) -> dict[str, Any]:
    """The caller's open sign-in sessions, newest first (an admin's: everyone's, or `?user=NAME`'s), each
    marked `current` if it is the one this request came with."""
    identity = caller(request)
    tokens = runtime(request).security.tokens
    name = request.query_params.get("user") if identity.admin else identity.token_name
    found = await asyncio.to_thread(tokens.sessions, name)
    secret = request.cookies.get(SESSION_COOKIE)
    current = tokens.session_id(secret) if secret else None
    return {"sessions": [{**entry, "current": entry["id"] == current} for entry in found]}


@router.delete("/zimage/sessions/{session_id}")
async def end_session(request: Request, session_id: str) -> Response:
    """End one sign-in session of the caller's (an admin: anyone's)."""
    identity = caller(request)
    name = None if identity.admin else identity.token_name
    ended = await asyncio.to_thread(runtime(request).security.tokens.end_sessions, name, session_id)
    audit_note(request, session=session_id)
    if not ended:
        return comfy_error("not_found", "No such session", f"no open session {session_id!r} of yours", 404)
    return JSONResponse({"ended": ended})


@router.delete("/zimage/sessions")
async def end_sessions(request: Request) -> Response:
    """End every sign-in session of the caller's token (an admin may name another user: `?user=NAME`),
    this one included: signing out everywhere."""
    identity = caller(request)
    name = (
        request.query_params.get("user") if identity.admin and "user" in request.query_params else identity.token_name
    )
    ended = await asyncio.to_thread(runtime(request).security.tokens.end_sessions, name)
    audit_note(request, token_name=name)
    return JSONResponse({"ended": ended})
