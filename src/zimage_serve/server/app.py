"""The FastAPI application: ComfyUI's routes, each also under /api, over one Runtime."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline
from starlette.requests import Request as PlainRequest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from zimage_serve import __version__
from zimage_serve.metrics import observe_request
from zimage_serve.queue.jobs import QueueUnavailable
from zimage_serve.server import (
    openai_images,
    routes_files,
    routes_frontend,
    routes_info,
    routes_jobs,
    routes_metrics,
    routes_queue,
    routes_security,
    routes_sign_in,
    routes_templates,
    routes_userdata,
    routes_webhooks,
    routes_ws,
    schemas,
    uploads,
)
from zimage_serve.server.gate import Gate
from zimage_serve.server.runtime import Runtime, ServerSettings
from zimage_serve.server.v2 import assets as v2_assets
from zimage_serve.server.v2 import jobs as v2_jobs
from zimage_serve.server.v2.assets import ASSET_UPLOADS
from zimage_serve.server.v2.envelope import V2Error, envelope_bytes, error_response, is_v2
from zimage_serve.server.v2.requests import v2_validation_error
from zimage_serve.server.v2.retention import keep_expiring
from zimage_serve.storage.uploader import Uploader
from zimage_serve.webhooks.delivery import Dispatcher, stopped
from zimage_serve.workflow.validate import error_body

log = logging.getLogger(__name__)
ROUTERS = (
    routes_queue.router,
    routes_info.router,
    routes_files.router,
    uploads.router,
    routes_ws.router,
    routes_security.router,
    routes_webhooks.router,
    routes_sign_in.router,
    routes_userdata.router,
    routes_jobs.router,
    routes_templates.router,
    routes_metrics.router,
    routes_frontend.router,
)


class ApiPrefix:
    """ComfyUI answers every route both bare and under /api/ (its web frontend uses /api/). One set of
    routes serves both: the prefix is dropped before routing, which halves the routes a request is
    matched against (FastAPI's matching costs a few microseconds per route, on every request)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] in ("http", "websocket") and path.startswith("/api/") and not is_v2(path):
            inner = {**scope, "path": scope["path"][4:]}
            raw: bytes | None = scope.get("raw_path")
            if raw is not None and raw.startswith(b"/api/"):
                inner["raw_path"] = raw[4:]
            try:
                await self.app(inner, receive, send)
            finally:  # the route that answered, for the metrics outside (app.route_of)
                if "route" in inner:
                    scope["route"] = inner["route"]
            return
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuse bodies over the limit with a 413, whether they declare a Content-Length or are chunked.

    A declared length is refused before anything is read; a chunked body is read up to the limit and
    then replayed to the route. Uploads have their own, larger limit.
    """

    def __init__(self, app: ASGIApp, limit: int, upload_limit: int) -> None:
        self.app, self.limit, self.upload_limit = app, limit, upload_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        uploading = path.endswith(("/upload/image", "/upload/mask")) or path == ASSET_UPLOADS
        limit = self.upload_limit if uploading else self.limit
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None:
            if length.isdigit() and int(length) > limit:
                await self._refuse(send, f"{int(length)} bytes; the limit is {limit}", path)
                return
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                await self._refuse(send, f"more than {limit} bytes", path)
                return
            if not message.get("more_body", False):
                break
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed() -> Message:
            return replay.pop() if replay else await receive()

        await self.app(scope, replayed, send)

    @staticmethod
    async def _refuse(send: Send, details: str, path: str) -> None:
        if is_v2(path):
            body = envelope_bytes("request_too_large", f"Request body too large: {details}")
        else:
            body = json.dumps(error_body("request_too_large", "Request body too large", details)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class PromptLane:
    """The outermost application: POST /prompt (and /api/prompt) goes straight to its handler, everything
    else to FastAPI.

    It is the route every client calls once per job; the framework's layers (error, telemetry and body
    middleware, exception handlers, the exit stack, route matching) cost it ~0.1 ms of CPU per request on
    this machine's cores (the server's CPU time per submission, its worker stopped, side by side with and
    without the lane), which at 1,000 jobs/s is a tenth of a core. The lane keeps what those layers give
    this route: the body limit, and a logged error with ComfyUI's shape instead of a traceback.
    """

    PATHS = ("/prompt", "/api/prompt")
    V2_JOBS = "/api/v2/jobs"  # Comfy API v2's submissions take the lane too

    def __init__(self, app: FastAPI, body_limit: int) -> None:
        self.app = app
        self._limited = BodyLimit(self._post_prompt, limit=body_limit, upload_limit=body_limit)
        self._limited_v2 = BodyLimit(self._post_v2_job, limit=body_limit, upload_limit=body_limit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"]
            if path in self.PATHS or path == self.V2_JOBS:
                scope["app"] = self.app  # what Starlette sets: the route reaches the runtime through it
                await (self._limited if path != self.V2_JOBS else self._limited_v2)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _post_v2_job(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._answer(v2_jobs.submit, scope, receive, send)

    async def _post_prompt(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._answer(routes_queue.post_prompt, scope, receive, send)

    @staticmethod
    async def _answer(
        route: Callable[[Request], Awaitable[Response]], scope: Scope, receive: Receive, send: Send
    ) -> None:
        """The route's answer, or the error it raised in the shape of its API, never a traceback."""
        path = scope["path"]
        try:
            response = await route(PlainRequest(scope, receive))
        except V2Error as exc:
            response = exc.response()
        except QueueUnavailable as exc:
            response = unavailable_response(exc, path)
        except Exception:
            log.exception("unhandled error on POST %s", path)
            response = internal_error_response(path)
        await response(scope, receive, send)


def unavailable_response(exc: QueueUnavailable, path: str) -> JSONResponse:
    """503 while the queue cannot be reached (a cluster's Redis restarting): try again after a few seconds.
    In ComfyUI's error shape, or v2's envelope under /api/v2."""
    log.warning("answered 503: %s", exc)
    headers = {"Retry-After": str(exc.retry_after)}
    if is_v2(path):
        return error_response(503, "queue_unavailable", exc.shown, headers=headers)
    body = error_body("queue_unavailable", "The queue is unavailable", exc.shown)
    return JSONResponse(body, status_code=503, headers=headers)


def internal_error_response(path: str) -> JSONResponse:
    if is_v2(path):
        return error_response(500, "upstream_error", "Internal server error: the error was logged on the server")
    body = error_body("internal_error", "Internal server error", "the error was logged on the server")
    return JSONResponse(body, status_code=500)


class ServerApp:
    """The ASGI application the server runs (`create_app`): each request timed for the metrics, then the gate,
    then the prompt lane, then FastAPI (`.app`)."""

    def __init__(self, gate: Gate, app: FastAPI) -> None:
        self.gate, self.app = gate, app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.gate(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def sent(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.gate(scope, receive, sent)
        finally:
            observe_request(scope["method"], route_of(scope), status, time.perf_counter() - started)


def route_of(scope: Scope) -> str:
    """The route's template (`/history/{prompt_id}`), never the raw path: what a client sends cannot add
    labels. POST /prompt is served ahead of FastAPI (`PromptLane`); anything unmatched is "other"."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str) and path != "/":
        return path
    if scope.get("path") in PromptLane.PATHS:
        return "/prompt"
    if scope.get("path") == PromptLane.V2_JOBS and scope.get("method") == "POST":
        return PromptLane.V2_JOBS
    return "other"


def create_app(settings: ServerSettings, start_now: bool = False) -> ServerApp:
    """The FastAPI application with every route, behind the lane for POST /prompt, behind the gate that
    decides who is calling; `.app` is FastAPI's.

    The runtime (recovery, the worker) starts with the application's lifespan, or at once with
    `start_now`: the worker process then imports the models' code while the server itself starts."""
    runtime = Runtime(settings)
    if start_now:
        runtime.start()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime.hub.bind(asyncio.get_running_loop())
        runtime.feeds.bind(asyncio.get_running_loop())
        runtime.start()
        runtime.security.start(runtime.revoked)
        expiring = asyncio.get_running_loop().create_task(keep_expiring(runtime))
        sending = uploading = None
        if runtime.webhooks is not None:
            dispatcher = Dispatcher(
                runtime.webhooks,
                settings.webhooks,
                runtime.security.public_base(),
                runtime.outputs.job_objects,
                runtime.audit_delivery,
            )
            sending = asyncio.get_running_loop().create_task(dispatcher.run(), name="the webhook dispatcher")
            runtime.webhooks_due = dispatcher.wake
        if runtime.outputs.bucket is not None and runtime.uploads is not None:
            bucket, folders = runtime.outputs.bucket, runtime.folders
            uploader = Uploader(runtime.uploads, bucket, folders, runtime.files_stored, runtime.audit_upload)
            uploading = asyncio.get_running_loop().create_task(uploader.run(), name="the uploader")
            runtime.uploads_due = uploader.wake
        try:
            yield
        finally:
            expiring.cancel()
            for task in (uploading, sending):
                if task is not None:
                    await stopped(task)
            await runtime.security.stop_tasks()
            await asyncio.to_thread(runtime.stop)
            await runtime.hub.close()

    # /docs with its scripts served from the package (FastAPI's own page loads them from a CDN: blank offline)
    app = FastAPIOffline(
        title="zimage-serve",
        version=__version__,
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
        static_url="/zimage/docs-static",
    )
    app.state.runtime = runtime
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, upload_limit=settings.max_upload_bytes)
    app.add_middleware(ApiPrefix)
    # Comfy API v2 first: a request is matched against the routes in order, and a v2 client's submissions
    # come one after another (ComfyUI's POST /prompt has a lane of its own, PromptLane).
    app.include_router(v2_jobs.router, prefix="/api/v2")
    app.include_router(v2_assets.router, prefix="/api/v2")
    for router in ROUTERS:
        app.include_router(router)
    schemas.document(app)
    app.include_router(openai_images.router)  # OpenAI clients use /v1 as their base URL
    app.mount("/", routes_frontend.frontend_files(), name="frontend")  # last: every route above comes first

    @app.exception_handler(QueueUnavailable)
    async def queue_unavailable(request: Request, exc: QueueUnavailable) -> JSONResponse:
        return unavailable_response(exc, request.url.path)

    @app.exception_handler(V2Error)
    async def v2_error(request: Request, exc: V2Error) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        if is_v2(request.url.path):
            return v2_validation_error(exc.errors())
        return await request_validation_exception_handler(request, exc)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return internal_error_response(request.url.path)

    lane = PromptLane(app, settings.max_body_bytes)
    return ServerApp(Gate(lane, runtime.security), app)
