"""ComfyUI's prompt, queue, history, interrupt and free routes."""

from __future__ import annotations

import asyncio
import gc
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from zimage_serve import strict_json
from zimage_serve.identity import USER, Identity
from zimage_serve.queue.jobs import NUMBER_LIMIT, DuplicateJob, Job, QueueFull, Quota, QuotaExceeded
from zimage_serve.security.audit import prompt_fields
from zimage_serve.server.gate import audit_note, caller, caller_token, job_record, on_unrecorded, stored_with_job
from zimage_serve.server.runtime import Runtime
from zimage_serve.server.schemas import (
    COUNT,
    MAX_CLIENT_ID,
    FreeRequest,
    InterruptRequest,
    PromptRequest,
    QueueChange,
    json_request,
    query,
)
from zimage_serve.server.service import PromptBlocked, PromptRejected, Submitted
from zimage_serve.server.stored_outputs import FileLinks, with_links
from zimage_serve.storage.uploads import listed_items
from zimage_serve.workflow.folders import USERS
from zimage_serve.workflow.validate import error_body

router = APIRouter()
OFF_LOOP_BYTES = 64 * 1024  # bodies larger than this are parsed and validated in a thread, not on the event loop
LONG_TEXT = 256  # characters of one input beyond which its tokens may be counted (see tokens.PromptTokens)
OFF_LOOP_QUEUE = 500  # a queue listing longer than this is put together in a thread
MAX_QUERY_INT = 2**31 - 1  # counts and offsets in queries (SQLite's integers end at 2**63)


def runtime(request: Request) -> Runtime:
    value: Runtime = request.app.state.runtime
    return value


def plain_error(status: int, message: str) -> JSONResponse:
    """The `{"error": message}` answer ComfyUI's file and user-data routes give."""
    return JSONResponse({"error": message}, status_code=status)


def comfy_error(kind: str, message: str, details: str = "", status: int = 400, **headers: str) -> JSONResponse:
    return JSONResponse(error_body(kind, message, details), status_code=status, headers=headers or None)


async def json_body(request: Request, *, empty_ok: bool = False) -> Any:
    """The request's JSON (strict: see `strict_json`); None for an empty body when allowed. Raises
    ValueError, naming the bad part of the body, for anything else."""
    raw = await request.body()
    return parse_body(raw, empty_ok=empty_ok)


def parse_body(raw: bytes, *, empty_ok: bool = False) -> Any:
    if not raw.strip():
        if empty_ok:
            return None
        raise ValueError("the request body is empty; send a JSON object")
    try:
        return strict_json.loads(raw)
    except strict_json.JsonRejected as exc:
        raise ValueError(str(exc) if exc.where else f"the request body is {exc}") from exc


@router.get("/prompt")
async def get_prompt(request: Request) -> dict[str, Any]:
    return {"exec_info": {"queue_remaining": runtime(request).service.remaining(caller(request))}}


async def post_prompt(request: Request) -> Response:
    """POST /prompt, reached through `app.PromptLane` (not this router): the busiest route reads its own
    body and builds its own answers, so it needs none of FastAPI's machinery. It is left out of the
    schema through the route added below."""
    raw = await request.body()
    if len(raw) <= OFF_LOOP_BYTES:
        return await _queue_body(request, raw, large=False)
    # Large bodies are parsed and validated in a thread, and one at a time: each thread that builds a
    # few million objects competes with the event loop for the GIL, so four at once would slow every
    # other request, not only the large ones.
    async with runtime(request).large_bodies:
        return await _queue_body(request, raw, large=True)


def _parse_large(raw: bytes) -> Any:
    """A large body parsed with the cyclic collector paused: parsed JSON holds no cycles, and each full
    pass over the millions of objects a large body makes (0.05–0.14 s here) holds the GIL, stalling the
    event loop, to free nothing. Large bodies are parsed one at a time (`post_prompt`)."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        return parse_body(raw)
    finally:
        if collecting:
            gc.enable()


async def _queue_body(request: Request, raw: bytes, *, large: bool) -> Response:
    try:
        body = await asyncio.to_thread(_parse_large, raw) if large else parse_body(raw)
    except ValueError as exc:
        return comfy_error("invalid_prompt", "Invalid request body", str(exc))
    if not isinstance(body, dict):
        return comfy_error("invalid_prompt", "Invalid request body", "the body must be a JSON object")
    return await queue_prompt(request, body, large=large)


async def queue_prompt(request: Request, body: dict[str, Any], *, large: bool = False) -> Response:
    """Queue a /prompt body (a dict); the answer is ComfyUI's, whichever route it came through."""
    rt = runtime(request)
    identity, token = caller(request), caller_token(request)
    if "prompt" not in body:
        return comfy_error("no_prompt", "No prompt provided", "No prompt provided")
    prompt_id = body.get("prompt_id")
    if prompt_id is not None and not _canonical_uuid(prompt_id):
        return comfy_error("invalid_prompt_id", "Invalid prompt_id", "prompt_id must be a lowercase hyphenated UUID")
    number = body.get("number")
    if number is not None and (isinstance(number, bool) or not isinstance(number, int | float)):
        return comfy_error("invalid_prompt", "Invalid number", "number must be a number")
    if number is not None and not -NUMBER_LIMIT < number < NUMBER_LIMIT:
        return comfy_error("invalid_prompt", "Invalid number", "number must be within ±2**63")
    extra = body.get("extra_data", {})
    if not isinstance(extra, dict):
        return comfy_error("invalid_prompt", "Invalid extra_data", "extra_data must be an object")
    client_id = body.get("client_id")
    if isinstance(client_id, int) and not isinstance(client_id, bool):
        client_id = str(client_id)  # ComfyUI keys sessions by whatever it is given; a number is its text
    if client_id is not None and (not isinstance(client_id, str) or len(client_id) > MAX_CLIENT_ID):
        return comfy_error(
            "invalid_prompt", "Invalid client_id", f"client_id must be text of at most {MAX_CLIENT_ID} characters"
        )
    targets = body.get("partial_execution_targets")
    if targets is not None and (not isinstance(targets, list) or not all(isinstance(t, str) for t in targets)):
        return comfy_error("invalid_prompt", "Invalid partial_execution_targets", "expected a list of node ids")
    try:
        submitted = await rt.submissions.submit(
            body["prompt"],
            client_id=client_id,
            extra_data=extra,
            number=float(number) if number is not None else None,
            front=bool(body.get("front")),
            prompt_id=prompt_id,
            partial_targets=targets,
            off_loop=large or has_long_text(body["prompt"]),
            identity=identity,
            quota=Quota(token.max_queued, token.images_per_day) if token is not None else None,
            record=recorder(request, rt, 200),
        )
    except PromptBlocked as exc:
        audit_note(
            request,
            outcome="blocked",
            rule=exc.rule,
            node=exc.node_id,
            **prompt_fields([exc.text], rt.settings.security.audit_prompts),
        )
        return JSONResponse(exc.body, status_code=400)
    except PromptRejected as exc:
        return JSONResponse(exc.body, status_code=400)
    except QueueFull as exc:
        return comfy_error(
            "queue_full", "Queue is full", str(exc), 429, **{"Retry-After": str(rt.settings.retry_after_s)}
        )
    except QuotaExceeded as exc:
        audit_note(request, quota=exc.quota)
        return comfy_error("quota_exceeded", "Quota exceeded", str(exc), 429, **{"Retry-After": str(exc.retry_after)})
    except DuplicateJob:
        return JSONResponse({"error": "prompt_id already exists"}, status_code=409)
    note_job(request, rt, submitted)  # first: whatever happens next, the record says the job was queued
    rt.queue_changed()
    job = submitted.job
    shown = int(job.number) if number is None else job.number
    return JSONResponse({"prompt_id": job.id, "number": shown, "node_errors": submitted.node_errors})


def job_fields(rt: Runtime, job: Job) -> dict[str, Any]:
    """What the audit record of a request that queued `job` says of it: its id, prompt texts and parameters."""
    texts, parameters = rt.service.summary(job.prompt)
    return {
        "job_id": job.id,
        "parameters": parameters,
        "images": job.context.images,
        **prompt_fields(texts, rt.settings.security.audit_prompts),
    }


def recorder(request: Request, rt: Runtime, status: int) -> Callable[[Job], str | None] | None:
    """Where the queue keeps the audit outbox in its own file: what makes this request's record (answered
    `status`) to be stored with its job, in the transaction that stores it. The answer then waits for no
    writer, and the job and its record are kept together or not at all."""
    if not rt.service.store.keeps_records:
        return None
    return lambda job: job_record(request, status, **job_fields(rt, job))


def note_job(request: Request, rt: Runtime, submitted: Submitted) -> None:
    """The audit record of a request that queued a job: stored with it already (the log's writer is told),
    or given to the gate to write before the answer."""
    job = submitted.job
    if submitted.new.record is not None:
        stored_with_job(request)
        rt.security.audit.wake()
        return
    on_unrecorded(request, lambda: rt.service.cancel(job.id))  # a 503 must leave no job behind
    audit_note(request, **job_fields(rt, job))


# Served by `app.PromptLane` ahead of FastAPI; the route is here so the schema describes its body.
router.add_api_route("/prompt", post_prompt, methods=["POST"], openapi_extra=json_request(PromptRequest))


def has_long_text(prompt: Any) -> bool:
    """Whether an input holds text long enough that validation may count its tokens (which can load a
    tokenizer, once per model): such a prompt is validated off the event loop too."""
    if not isinstance(prompt, dict):
        return False
    for node in prompt.values():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        if isinstance(inputs, dict) and any(isinstance(v, str) and len(v) > LONG_TEXT for v in inputs.values()):
            return True
    return False


def _canonical_uuid(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


@router.get(
    "/queue",
    openapi_extra=query(
        ("limit", COUNT, "Waiting jobs on this page (all when absent)"), ("offset", COUNT, "Waiting jobs skipped")
    ),
)
async def get_queue(request: Request) -> Response:
    """ComfyUI's queue; with `limit` (and `offset`), one page of the waiting jobs and a `pagination` entry
    as ComfyUI's jobs API gives (running jobs are always all listed)."""
    service = runtime(request).service
    identity = caller(request)
    try:
        limit = optional_int(request.query_params.get("limit"), "limit")
        offset = optional_int(request.query_params.get("offset"), "offset") or 0
    except ValueError as exc:
        return comfy_error("invalid_query", "Invalid query parameter", str(exc))
    if limit is None and service.remaining() > OFF_LOOP_QUEUE:  # megabytes: built off the loop
        text = await asyncio.to_thread(service.queue_json, None, 0, identity)
    else:
        text = service.queue_json(limit, offset, identity)
    return Response(text, media_type="application/json")


@router.post("/queue", openapi_extra=json_request(QueueChange, required=False))
async def post_queue(request: Request) -> Response:
    rt = runtime(request)
    identity = caller(request)
    answer = await _clear_or_delete(request, lambda ids: rt.service.delete_pending(ids, identity))
    if answer.status_code == 200:
        rt.queue_changed()
    return answer


@router.get(
    "/history",
    openapi_extra=query(("max_items", COUNT, "The newest N, or N from offset"), ("offset", COUNT, "Entries skipped")),
)
async def get_history(request: Request) -> Response:
    rt = runtime(request)
    try:
        max_items = optional_int(request.query_params.get("max_items"), "max_items")
        offset = optional_int(request.query_params.get("offset"), "offset")
    except ValueError as exc:
        return comfy_error("invalid_query", "Invalid query parameter", str(exc))
    identity = caller(request)
    many = (max_items is None or max_items > OFF_LOOP_QUEUE) and rt.service.finished_count(identity) > OFF_LOOP_QUEUE
    if many or rt.outputs.enabled:  # signing the objects' URLs costs CPU per file: never on the event loop
        return await asyncio.to_thread(_history_answer, rt, max_items, offset, identity)
    return _history_answer(rt, max_items, offset, identity)


def _history_answer(rt: Runtime, max_items: int | None, offset: int | None, identity: Identity) -> Response:
    jobs = rt.service.history(max_items=max_items, offset=offset, identity=identity)
    links = rt.outputs.links(job.id for job in jobs)
    return JSONResponse({job.id: history_entry(job, identity, links.get(job.id)) for job in jobs})


def history_entry(job: Job, identity: Identity, links: FileLinks | None = None) -> dict[str, Any]:
    """ComfyUI's history entry. Its files are named as the caller reaches them: a user's own, within
    their space; another user's, for an admin (whose space holds every user's), with that user's folder
    in front of the subfolder. Files in the output store carry their object's URL (`links`)."""
    entry = job.history_entry()
    if links:
        with_links(entry["outputs"], links)
    in_a_users_space = bool(job.owner) and job.context.role == USER  # an admin's files are the shared ones
    if in_a_users_space and job.owner != identity.user and identity.admin:
        for item in listed_items(entry["outputs"]):
            if "filename" in item:
                item["subfolder"] = "/".join(p for p in (USERS, job.owner, item.get("subfolder", "")) if p)
    return entry


@router.get("/history/{prompt_id}")
async def get_history_entry(request: Request, prompt_id: str) -> Response:
    identity, rt = caller(request), runtime(request)
    job = rt.service.get(prompt_id, identity)
    if job is None or job.state in ("pending", "running"):
        return JSONResponse({})
    links = await asyncio.to_thread(rt.outputs.job_links, job.id) if rt.outputs.enabled else None
    return JSONResponse({job.id: history_entry(job, identity, links)})


@router.post("/history", openapi_extra=json_request(QueueChange, required=False))
async def post_history(request: Request) -> Response:
    service, identity = runtime(request).service, caller(request)
    return await _clear_or_delete(request, lambda ids: service.delete_history(ids, identity))


@router.post("/interrupt", openapi_extra=json_request(InterruptRequest, required=False))
async def post_interrupt(request: Request) -> Response:
    rt = runtime(request)
    try:
        body = await json_body(request, empty_ok=True)
    except ValueError:
        body = None  # ComfyUI treats an empty or invalid body as {}
    prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
    rt.service.interrupt(str(prompt_id) if prompt_id is not None else None, caller(request))
    return Response(status_code=200)


@router.post("/free", openapi_extra=json_request(FreeRequest, required=False))
async def post_free(request: Request) -> Response:
    rt = runtime(request)
    if not caller(request).admin:  # models are everyone's: one user may not unload them under the others
        return comfy_error("forbidden", "Admins only", "unloading models needs a token with the admin role", 403)
    body = await _object_body(request)
    if isinstance(body, Response):
        return body
    if body.get("free_memory") or body.get("unload_models"):  # as ComfyUI: free_memory resets the caches too
        rt.service.free(caches=bool(body.get("free_memory")))
    return Response(status_code=200)


async def _clear_or_delete(request: Request, delete: Callable[[list[str] | None], int]) -> Response:
    """POST /queue and /history: `{"clear": true}` removes all, `{"delete": [ids]}` those; 200, empty body."""
    body = await _object_body(request)
    if isinstance(body, Response):
        return body
    if body.get("clear"):
        delete(None)
    ids = body.get("delete")
    if isinstance(ids, list):
        delete([str(i) for i in ids])
    return Response(status_code=200)


async def _object_body(request: Request) -> dict[str, Any] | Response:
    try:
        body = await json_body(request, empty_ok=True)
    except ValueError as exc:
        return comfy_error("invalid_request", "Invalid request body", str(exc))
    if body is None:
        return {}
    if not isinstance(body, dict):
        return comfy_error("invalid_request", "Invalid request body", "the body must be a JSON object")
    return body


def optional_int(value: str | None, name: str) -> int | None:
    """A count or offset from a query: None when absent; ValueError naming it when not a whole number
    from 0 to MAX_QUERY_INT."""
    if value is None or value == "":
        return None
    try:
        number = int(value) if len(value) <= 20 else None
    except ValueError:
        number = None
    if number is None:
        raise ValueError(f"{name} must be a whole number, got {value[:40]!r}")
    if number < 0:
        raise ValueError(f"{name} must not be negative")
    if number > MAX_QUERY_INT:
        raise ValueError(f"{name} must be at most {MAX_QUERY_INT}")
    return number
