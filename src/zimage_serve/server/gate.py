"""The outermost layer: every HTTP request and WebSocket passes here once, before any route (POST
/prompt's fast lane included), and is refused here or sent on with who is calling.

In order: the client's address (X-Forwarded-For only from a trusted proxy) against the allow-list; the
browser checks (another site's Origin, DNS rebinding); the credential; the request rate. What it
resolves travels in the ASGI scope as one `Identity` (`caller(request)` reads it): no route finds
the user by itself. Requests that change something, output reads and refusals are written to the audit
log; a request that changes something is answered only once its record is written (or, for a job queued
where the queue keeps the audit outbox, stored with the job: `job_record`). While the log cannot be
written, such requests are answered 503 before they do anything; one caught by the failure itself is
undone where its route said how (`on_unrecorded`), and answered 503.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Callable
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import parse_qs, urlencode

from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from zimage_serve.identity import LOCAL, Identity
from zimage_serve.security.audit import UNAVAILABLE, AuditUnavailable, iso
from zimage_serve.security.guard import Security
from zimage_serve.security.refusals import cut
from zimage_serve.security.tokens import Token
from zimage_serve.server.v2.envelope import envelope_bytes, is_v2
from zimage_serve.workflow.validate import error_body

IDENTITY = "zimage.identity"
TOKEN = "zimage.token"
AUDIT = "zimage.audit"  # what a route adds to its request's audit record (job id, prompt, files, outcome)
AUDITED = "zimage.audited"  # the request's record in the making (`_Audited`): for a route that stores it itself
UNRECORDED = "zimage.unrecorded"  # what undoes a request whose audit record cannot be written
RETRY_AFTER_S = "5"
READS = ("GET", "HEAD", "OPTIONS")
HEALTH = ("/health", "/api/health", "/api/v2/health")
VIEW = ("/view", "/api/view")
ASSETS = "/api/v2/assets/"
QUERY_TOKEN_PATHS = VIEW  # and every WebSocket: where browsers cannot send an Authorization header
SIGN_IN = ("/login", "/logout")  # open to all: the sign-in page and its form
PAGES = ("/", "/index.html", "/simple")  # a browser without a credential is sent to the sign-in page
SESSION_COOKIE = "zimage_session"


def reads_files(path: str) -> bool:
    """Reads of a user's files, which the audit log records: /view, and v2's asset contents."""
    return path in VIEW or (path.startswith(ASSETS) and path.endswith("/content"))


def caller(connection: HTTPConnection) -> Identity:
    """Who is calling: resolved once by the gate (the local operator when it did not run, as in tests of
    a bare application)."""
    identity: Identity = connection.scope.get(IDENTITY, LOCAL)
    return identity


def caller_token(connection: HTTPConnection) -> Token | None:
    token: Token | None = connection.scope.get(TOKEN)
    return token


def audit_note(connection: HTTPConnection, **fields: Any) -> None:
    """Add to the audit record of this request (a route's own facts: job id, prompt, files, outcome)."""
    note = connection.scope.get(AUDIT)
    if note is not None:
        note.update(fields)


def job_record(connection: HTTPConnection, status: int, **fields: Any) -> str | None:
    """This request's audit record as answered `status`, with `fields`, as JSON: for a route that stores it
    with the job it queues, in the same transaction (the queue's audit outbox), so that the answer waits for
    no writer. Then `stored_with_job` says so. None: the request is not one whose record is awaited."""
    audited: _Audited | None = connection.scope.get(AUDITED)
    if audited is None or not audited.wait:
        return None
    record = _record(audited.base, audited.user, status, "ok", {**audited.note, **fields})
    return json.dumps(record, ensure_ascii=True, separators=(",", ":"))


def stored_with_job(connection: HTTPConnection) -> None:
    """The request's record went into the queue with its job (`job_record`): the gate writes none."""
    audited: _Audited | None = connection.scope.get(AUDITED)
    if audited is not None:
        audited.stored = True


def on_unrecorded(connection: HTTPConnection, undo: Callable[[], object]) -> None:
    """What undoes this request (run in a thread) if its audit record cannot be written: the client is then
    answered 503, and must find nothing done."""
    hooks = connection.scope.get(UNRECORDED)
    if hooks is not None:
        hooks.append(undo)


class Gate:
    def __init__(self, app: ASGIApp, security: Security) -> None:
        self.app, self.security = app, security

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        security = self.security
        headers = _headers(scope)
        peer = scope.get("client")
        address = security.network.client(peer[0] if peer else "", headers.get("x-forwarded-for"))
        method = scope.get("method", "GET") if kind == "http" else "WS"
        path: str = scope["path"]
        base = {"address": address, "method": method, "route": path, "started": started}

        async def refuse(status: int, reason: str, message: str, user: str = "", **extra: str) -> None:
            if user:
                security.audit.add(_record(base, user, status, "refused", {"reason": reason}))
            else:  # nobody identified: counted per address and minute (security/refusals.py)
                security.refusals.note(address, reason, status, method, path)
            await _refuse(scope, receive, send, status, reason, message, extra)

        if not security.network.allowed(address):
            await refuse(403, "address_not_allowed", f"the address {address} may not use this server (--allow-ip)")
            return
        host = headers.get("host")
        navigation = method in ("GET", "HEAD") and headers.get("sec-fetch-mode") == "navigate"
        why = security.network.rebinding(host) or security.network.cross_site(
            host, headers.get("origin"), headers.get("sec-fetch-site"), navigation
        )
        if why is not None:
            await refuse(403, "cross_site_request", why)
            return
        if method == "OPTIONS":  # a preflight: answered empty and without CORS headers, as ComfyUI does
            await _send_empty(send)
            return
        token: Token | None = None
        open_route = (method in ("GET", "HEAD") and path in HEALTH) or path in SIGN_IN
        if not open_route and security.needs_credential(headers):
            credential = _credential(scope, headers, kind == "websocket" or path in QUERY_TOKEN_PATHS)
            session = _cookie(headers, SESSION_COOKIE) if credential is None else None
            if session is not None:
                token = security.tokens.session(session)
            if credential is None and (token is None or not token.active) and method == "GET" and path in PAGES:
                await _see_other(send, "/login?" + urlencode({"next": path}))
                return
            if credential is None and session is None:
                await refuse(
                    401,
                    "unauthorized",
                    "authentication required: send Authorization: Bearer TOKEN",
                    **{"WWW-Authenticate": 'Bearer realm="zimage-serve"'},
                )
                return
            if credential is not None:
                token = security.tokens.lookup(credential)
            if token is None or not token.active:
                await refuse(
                    401,
                    "unauthorized",
                    "the token is not valid" if token is None else "the token was revoked",
                    token.owner if token is not None else "",
                    **{"WWW-Authenticate": 'Bearer realm="zimage-serve", error="invalid_token"'},
                )
                return
            security.tokens.used(token.name)
        identity = security.identity(token, address)
        changing = method not in READS and kind == "http"
        if changing and token is not None and token.rpm is not None:
            wait = security.rate.take(token.owner, token.rpm)
            if wait:
                await refuse(
                    429,
                    "rate_limited",
                    f"more than the {token.rpm} requests a minute token {token.name!r} allows (its rpm)",
                    token.owner,
                    **{"Retry-After": str(wait)},
                )
                return
        if changing and not security.audit.available:
            await refuse(503, "audit_unavailable", UNAVAILABLE, identity.user, **{"Retry-After": RETRY_AFTER_S})
            return
        scope[IDENTITY], scope[TOKEN] = identity, token
        if not changing and not reads_files(path):
            await self.app(scope, receive, send)
            return
        note: dict[str, Any] = {}
        undo: list[Callable[[], object]] = []
        scope[AUDIT], scope[UNRECORDED] = note, undo
        audited = scope[AUDITED] = _Audited(send, security, base, identity.user, note, changing, undo)
        await self.app(scope, receive, audited)


class _Audited:
    """The route's `send`, holding back the response until its audit record is written (for requests
    that change something; output reads are recorded without waiting). If the record cannot be written,
    the request is undone and the response replaced by a 503."""

    def __init__(
        self,
        send: Send,
        security: Security,
        base: dict[str, Any],
        user: str,
        note: dict[str, Any],
        wait: bool,
        undo: list[Callable[[], object]],
    ) -> None:
        self.send, self.security, self.base, self.user, self.note, self.wait = send, security, base, user, note, wait
        self.undo, self.replaced = undo, False
        self.stored = False  # the route stored the record with its job (`stored_with_job`)

    async def __call__(self, message: Message) -> None:
        if self.replaced:
            return  # the rest of the route's answer, which the client never gets
        if message["type"] == "http.response.start" and not self.stored:
            status = int(message["status"])
            outcome = self.note.pop("outcome", None) or (
                "ok" if status < 400 else "refused" if status in (401, 403, 429) else "error"
            )
            record = _record(self.base, self.user, status, outcome, self.note)
            if self.wait:
                try:
                    await self.security.audit.write(record)
                except AuditUnavailable:
                    self.replaced = True
                    for undo in self.undo:
                        await run_in_threadpool(undo)
                    body = _error_body("audit_unavailable", UNAVAILABLE, self.base["route"])
                    headers = [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        (b"retry-after", RETRY_AFTER_S.encode()),
                    ]
                    await self.send({"type": "http.response.start", "status": 503, "headers": headers})
                    await self.send({"type": "http.response.body", "body": body})
                    return
            else:
                self.security.audit.add(record)
        await self.send(message)


def _record(base: dict[str, Any], user: str, status: int, outcome: str, fields: dict[str, Any]) -> dict[str, Any]:
    now = time.time()
    record = {
        "time": iso(now),
        "kind": "request",
        "user": user,
        "address": base["address"],
        "method": base["method"],
        "route": cut(base["route"], 1000),
        "status": status,
        "outcome": outcome,
        "duration_ms": round((time.monotonic() - base["started"]) * 1000, 3),
    }
    record.update(fields)
    return record


def _headers(scope: Scope) -> dict[str, str]:
    found: dict[str, str] = {}
    for name, value in scope.get("headers", ()):
        key = name.decode("latin-1").lower()
        if key not in found:  # the first of repeated headers, as Starlette reads them
            found[key] = value.decode("latin-1")
    return found


def _credential(scope: Scope, headers: dict[str, str], query_allowed: bool) -> str | None:
    """The token the request carries: a Bearer header, HTTP Basic (the token as the password, or as the
    user with no password), or, where browsers cannot send headers, a `token` query parameter."""
    authorization = headers.get("authorization", "")
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    if scheme.lower() == "basic" and value.strip():
        try:
            user, _, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return password or user or None
    if query_allowed:
        raw: bytes = scope.get("query_string", b"")
        if b"token=" in raw:
            values = parse_qs(raw.decode("latin-1")).get("token")
            if values and values[0]:
                return values[0]
    return None


def _cookie(headers: dict[str, str], name: str) -> str | None:
    raw = headers.get("cookie")
    if not raw or name not in raw:
        return None
    try:
        jar = SimpleCookie(raw)
    except CookieError:
        return None
    morsel = jar.get(name)
    return morsel.value if morsel is not None and morsel.value else None


async def _see_other(send: Send, location: str) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 303,
            "headers": [(b"location", location.encode()), (b"content-length", b"0"), (b"cache-control", b"no-store")],
        }
    )
    await send({"type": "http.response.body", "body": b""})


def _error_body(reason: str, message: str, path: str) -> bytes:
    """ComfyUI's error shape, or v2's envelope under /api/v2."""
    if is_v2(path):
        return envelope_bytes(reason, message, {"reason": reason})
    return json.dumps(error_body(reason, message, message)).encode()


async def _refuse(
    scope: Scope, receive: Receive, send: Send, status: int, reason: str, message: str, extra: dict[str, str]
) -> None:
    body = _error_body(reason, message, scope["path"])
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((k.lower().encode(), v.encode()) for k, v in extra.items()),
    ]
    if scope["type"] == "websocket":
        await receive()  # the handshake's websocket.connect, answered with the refusal
        if "websocket.http.response" in scope.get("extensions", {}):
            await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            await send({"type": "websocket.close", "code": 1008})
        return
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _send_empty(send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})
