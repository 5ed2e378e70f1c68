"""Comfy API v2's job routes: submit (with an idempotency key), list, get, workflow, cancel, events (SSE),
and health.

A submission goes the way every other does (`SubmissionBatcher`: validation, the word filter, quotas, the
audit record); v2 adds only what its contract asks: the envelope, single-use idempotency keys, `core/ASSET`
references, labels. A job read here is the queue's job, whichever API queued it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from zimage_serve import __version__
from zimage_serve.identity import Identity
from zimage_serve.queue.jobs import DuplicateJob, Job, QueueFull, Quota, QuotaExceeded
from zimage_serve.security.audit import prompt_fields
from zimage_serve.server.gate import audit_note, caller, caller_token
from zimage_serve.server.routes_queue import OFF_LOOP_BYTES, has_long_text, note_job, recorder, runtime
from zimage_serve.server.runtime import Runtime
from zimage_serve.server.schemas import json_request
from zimage_serve.server.service import PromptBlocked, PromptRejected
from zimage_serve.server.v2.assets import resolve_assets
from zimage_serve.server.v2.envelope import V2Error
from zimage_serve.server.v2.feeds import Feed, Item
from zimage_serve.server.v2.job_view import EXTRA_KEY, STATES_OF, TERMINAL, iso, origin_of
from zimage_serve.server.v2.requests import SubmitJob, idempotency_key, parsed

router = APIRouter(tags=["Comfy API v2"])
LIST_LIMIT, LIST_MAX = 50, 100
LABEL_SCAN = 500  # jobs read at most per page of a list filtered by labels (the page then says so)
HEARTBEAT_S = 15.0
RECHECK_S = 5.0
MAX_OFFSET = 2**31 - 1  # a stream reads its job from the queue this often while no event comes


def _not_found(job_id: str) -> V2Error:
    return V2Error(404, "not_found", f"No job {job_id[:100]!r}: it does not exist, or is not yours")


async def _job(rt: Runtime, job_id: str, identity: Identity) -> Job:
    job = await rt.quick(rt.service.get, job_id, identity)
    if job is None:
        raise _not_found(job_id)
    return job


async def _view(rt: Runtime, job: Job, identity: Identity, origin: str) -> dict[str, Any]:
    if job.state in ("pending", "running"):  # a read or two of the queue
        return await rt.quick(rt.v2_jobs.view, job, identity.owner_filter(), origin)
    # An ended job's outputs are recorded as assets the first time they are shown: in a thread.
    return await asyncio.to_thread(rt.v2_jobs.view, job, identity.owner_filter(), origin)


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    """Open to everyone, as v2's health check is: the server answers, and whether its worker is ready."""
    return {"status": "healthy", "worker": runtime(request).service.worker_state(), "version": __version__}


# -- submit ------------------------------------------------------------------------------------------
def _is_ui_format(workflow: dict[str, Any]) -> bool:
    return isinstance(workflow.get("nodes"), list) and "links" in workflow


def node_errors(body: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """ComfyUI's `node_errors` as v2 lists them: per node, each input that is wrong and why."""
    found: dict[str, list[dict[str, Any]]] = {}
    for node_id, entry in (body.get("node_errors") or {}).items():
        reasons = entry.get("errors", []) if isinstance(entry, dict) else []
        found[str(node_id)] = [
            {
                "field": (reason.get("extra_info") or {}).get("input_name"),
                "reason": reason.get("type"),
                "message": ": ".join(p for p in (reason.get("message"), reason.get("details")) if p),
                "class_type": entry.get("class_type"),
            }
            for reason in reasons
            if isinstance(reason, dict)
        ]
    return found


@router.post("/jobs", status_code=201, openapi_extra=json_request(SubmitJob))
async def submit(request: Request) -> Response:
    """Queue a workflow (API format). 201 with the job once it is durably queued."""
    rt, identity, token = runtime(request), caller(request), caller_token(request)
    key = idempotency_key(request.headers)
    raw = await request.body()
    large = len(raw) > OFF_LOOP_BYTES
    body: SubmitJob = await asyncio.to_thread(parsed, raw, SubmitJob) if large else parsed(raw, SubmitJob)
    if _is_ui_format(body.workflow):
        raise V2Error(
            422,
            "workflow_format_ui",
            "This is a workflow in the editor's format (nodes and links): export it in API format "
            "(Workflow > Export (API)) and send that",
        )
    workflow = await resolve_assets(rt, identity, rt.storage_limits(identity, token), body.workflow)
    extra: dict[str, Any] = {}
    v2_fields = {name: getattr(body, name) for name in ("metadata", "priority") if getattr(body, name) is not None}
    if v2_fields:
        extra[EXTRA_KEY] = v2_fields
    if isinstance(body.metadata, dict) and "webhook" in body.metadata:  # a registered endpoint, by its name
        extra["webhook"] = body.metadata["webhook"]
    owner = identity.user
    if key is not None and not await rt.quick(rt.records.claim_key, owner, f"jobs/{key}"):
        raise V2Error(
            422,
            "idempotency_key_reuse",
            "This Idempotency-Key was used already: a key is good for one submission (list your jobs to find "
            "the job it made)",
        )
    try:
        submitted = await rt.submissions.submit(
            workflow,
            extra_data=extra,
            prompt_id=str(uuid.uuid4()),
            off_loop=large or has_long_text(workflow),  # counting a long text's tokens may load a tokenizer
            identity=identity,
            quota=Quota(token.max_queued, token.images_per_day) if token is not None else None,
            record=recorder(request, rt, 201),
        )
    except (PromptRejected, QueueFull, QuotaExceeded, DuplicateJob) as exc:  # definitely not queued
        if key is not None:
            await asyncio.to_thread(rt.records.release_key, owner, f"jobs/{key}")
        raise _refused(request, rt, exc) from exc
    note_job(request, rt, submitted)  # first: whatever happens next, the record says the job was queued
    rt.queue_changed()
    job = submitted.job
    view = await rt.quick(rt.v2_jobs.view, job, identity.owner_filter(), origin_of(str(request.base_url)))
    return JSONResponse(view, status_code=201, headers={"Location": view["urls"]["self"]})


def _refused(request: Request, rt: Runtime, exc: Exception) -> V2Error:
    retry = {"Retry-After": str(rt.settings.retry_after_s)}
    if isinstance(exc, PromptBlocked):
        audit_note(
            request,
            outcome="blocked",
            rule=exc.rule,
            node=exc.node_id,
            **prompt_fields([exc.text], rt.settings.security.audit_prompts),
        )
        error = exc.body.get("error") or {}
        message = ": ".join(p for p in (error.get("message"), error.get("details")) if p) or str(exc)
        return V2Error(422, "prompt_blocked", message, {"node_errors": node_errors(exc.body), "rule": exc.rule})
    if isinstance(exc, PromptRejected) and (exc.body.get("error") or {}).get("type") == "invalid_webhook":
        return V2Error(422, "invalid_webhook", exc.body["error"]["details"])
    if isinstance(exc, PromptRejected):
        error = exc.body.get("error") or {}
        message = ": ".join(p for p in (error.get("message"), error.get("details")) if p) or "invalid workflow"
        return V2Error(
            422, "invalid_workflow", message, {"node_errors": node_errors(exc.body), "type": error.get("type")}
        )
    if isinstance(exc, QueueFull):
        return V2Error(429, "queue_full", str(exc), headers=retry)
    if isinstance(exc, QuotaExceeded):
        audit_note(request, quota=exc.quota)
        return V2Error(429, "quota_exceeded", str(exc), {"quota": exc.quota}, {"Retry-After": str(exc.retry_after)})
    return V2Error(409, "conflict", str(exc))


# -- list, get, workflow, cancel ----------------------------------------------------------------------
@router.get("/jobs")
async def list_jobs(request: Request) -> Response:
    """The caller's jobs (everyone's for an admin), newest first: `status` (a comma list), `limit` (1 to 100,
    50 by default), `metadata[key]=value` label filters, and `cursor` from the page before."""
    rt, identity = runtime(request), caller(request)
    query = request.query_params
    wanted = [s.strip() for s in (query.get("status") or "").split(",") if s.strip()]
    unknown = [s for s in wanted if s not in STATES_OF]
    if unknown:
        raise V2Error(422, "invalid_request", f"status: {unknown[0][:40]!r} is not one of {', '.join(STATES_OF)}")
    states = {state for status in wanted or list(STATES_OF) for state in STATES_OF[status]}
    limit = _count(query.get("limit"), "limit", LIST_LIMIT, 1, LIST_MAX)
    offset = _cursor(query.get("cursor"))
    labels = {name[9:-1]: value for name, value in query.multi_items() if name.startswith("metadata[")}
    if any(not name.endswith("]") for name in query if name.startswith("metadata[")):
        raise V2Error(422, "invalid_metadata_filter", "metadata filters are written metadata[key]=value")
    page = await asyncio.to_thread(_page, rt, identity, states, wanted, labels, offset, limit)
    return JSONResponse(page)


def _count(text: str | None, name: str, default: int, low: int, high: int) -> int:
    if text is None or text == "":
        return default
    if not re.fullmatch(r"[0-9]{1,9}", text) or not low <= int(text) <= high:
        raise V2Error(422, "invalid_request", f"{name}: a whole number from {low} to {high}")
    return int(text)


def _cursor(text: str | None) -> int:
    if not text:
        return 0
    try:
        found = json.loads(base64.urlsafe_b64decode(text.encode() + b"=" * (-len(text) % 4)))
        offset = found.get("offset") if isinstance(found, dict) else None
        if isinstance(offset, int) and not isinstance(offset, bool) and 0 <= offset <= MAX_OFFSET:
            return offset
    except (ValueError, binascii.Error, RecursionError):
        pass
    raise V2Error(422, "invalid_cursor", "cursor: use the next_cursor a page of this list gave")


def _next(offset: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"offset": offset}).encode()).decode().rstrip("=")


def _page(
    rt: Runtime,
    identity: Identity,
    states: set[str],
    wanted: list[str],
    labels: dict[str, str],
    offset: int,
    limit: int,
) -> dict[str, Any]:
    owner = identity.owner_filter()
    items: list[dict[str, Any]] = []
    scanned, total, truncated = 0, offset + 1, False
    while len(items) < limit and offset < total:
        batch = limit - len(items) if not labels and not wanted else min(100, LABEL_SCAN - scanned)
        if batch <= 0:  # a filter that matches few jobs: this page stops here, and says so
            truncated = True
            break
        jobs, total = rt.store.jobs_page(states, owner, offset, batch, True)
        if not jobs:
            break
        for job in jobs:
            offset, scanned = offset + 1, scanned + 1
            summary = _summary(rt, job)
            if wanted and summary["status"] not in wanted:  # running asked, canceling not (or the reverse)
                continue
            if labels and not _labelled(summary.get("metadata"), labels):
                continue
            items.append(summary)
            if len(items) == limit:
                break
    more = offset < total
    return {"jobs": items, "next_cursor": _next(offset) if more else None, "truncated": truncated}


def _labelled(metadata: Any, labels: dict[str, str]) -> bool:
    return isinstance(metadata, dict) and all(metadata.get(k) == v for k, v in labels.items())


def _summary(rt: Runtime, job: Job) -> dict[str, Any]:
    status = rt.v2_jobs.status(job)
    extra = job.extra_data.get(EXTRA_KEY) if isinstance(job.extra_data, dict) else None
    extra = extra if isinstance(extra, dict) else {}
    changed = job.finished or job.started or job.created
    found: dict[str, Any] = {
        "id": job.id,
        "status": status,
        "created_at": iso(job.created),
        "completed_at": iso(job.finished) if status in TERMINAL else None,
        "create_time": iso(job.created),
        "update_time": iso(changed),
        "urls": {"self": f"/api/v2/jobs/{job.id}"},
    }
    if "metadata" in extra:
        found["metadata"] = extra["metadata"]
    if "priority" in extra:
        found["priority"] = extra["priority"]
    return found


@router.get("/jobs/{job_id}")
async def get_job(request: Request, job_id: str) -> Response:
    """The job: poll this; it is the authoritative view (the event stream is derived from it)."""
    rt, identity = runtime(request), caller(request)
    origin = origin_of(str(request.base_url))
    return JSONResponse(await _view(rt, await _job(rt, job_id, identity), identity, origin))


@router.get("/jobs/{job_id}/workflow")
async def job_workflow(request: Request, job_id: str) -> Response:
    """The API-format graph the job ran (never its extra_data)."""
    rt, identity = runtime(request), caller(request)
    job = await _job(rt, job_id, identity)
    return JSONResponse({"format": "api", "workflow": job.prompt})


@router.post("/jobs/{job_id}/cancel")
async def cancel(request: Request, job_id: str) -> Response:
    """Ask the job to stop: a waiting job ends `canceled` at once, a running one is `canceling` until it
    stops at its next step; an ended job is answered as it is."""
    rt, identity = runtime(request), caller(request)
    job = await _job(rt, job_id, identity)
    ended = await asyncio.to_thread(rt.service.cancel_waiting, job_id, identity) if job.state == "pending" else None
    if ended is not None:  # no worker ran it, so none says it ended: this node does
        rt.job_event(job_id, job.extra_data.get("client_id"), "execution_interrupted", ended, job.owner)
        rt.queue_changed()
    elif job.state in ("pending", "running"):  # running (or it started meanwhile)
        # Asked of its worker: one that has claimed it but not begun it yet stops it as it begins, so the
        # job is `canceling` until it ends whatever the worker answered now.
        rt.feeds.canceling.add(job_id)
        await asyncio.to_thread(rt.service.interrupt, job_id, identity)
    audit_note(request, job_id=job_id)
    origin = origin_of(str(request.base_url))
    return JSONResponse(await _view(rt, await _job(rt, job_id, identity), identity, origin))


# -- events ------------------------------------------------------------------------------------------
def _frame(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


@router.get("/jobs/{job_id}/events")
async def events(request: Request, job_id: str) -> Response:
    """Server-sent events: on connect the job's status, latest progress and preview; then `status`,
    `progress` (about twice a second), `preview` and `output`; a comment every 15 s; the stream ends after
    the terminal `status`, which carries the job's outputs."""
    rt, identity = runtime(request), caller(request)
    job = await _job(rt, job_id, identity)
    holder = identity.user or identity.address
    cap = rt.settings.event_streams
    if rt.feeds.streams_of(holder) >= cap:
        raise V2Error(
            429,
            "too_many_streams",
            f"You have {cap} event streams open, the most this server allows: close one, or poll the job",
            headers={"Retry-After": "5"},
        )
    classes = {
        str(node_id): str(node.get("class_type")) for node_id, node in job.prompt.items() if isinstance(node, dict)
    }
    feed, inbox = rt.feeds.watch(job_id, classes, holder)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

    async def stream() -> AsyncIterator[bytes]:
        try:
            async for frame in _stream(rt, identity, job_id, feed, inbox, origin_of(str(request.base_url))):
                yield frame
        finally:
            rt.feeds.leave(feed, inbox, holder)

    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)


async def _stream(
    rt: Runtime, identity: Identity, job_id: str, feed: Feed, inbox: asyncio.Queue[Item], origin: str
) -> AsyncIterator[bytes]:
    # Read after watching: an event that comes between is in the inbox, never lost.
    job = await rt.quick(rt.service.get, job_id, identity)
    if job is None:
        return
    view = await _view(rt, job, identity, origin)
    status, position = view["status"], view["queue_position"]
    if status in TERMINAL:
        yield _frame("status", _final(view))
        return
    yield _frame("status", {"status": status, "queue_position": position})
    if view["progress"] is not None:
        yield _frame("progress", view["progress"])
    if feed.preview is not None:
        yield _frame("preview", feed.preview)
    written = time.monotonic()
    while True:
        try:
            kind, data = await asyncio.wait_for(inbox.get(), timeout=RECHECK_S)
        except TimeoutError:  # no event: the queue says how the job stands (an event may have been lost)
            checked = await _checked(rt, feed, job_id, identity.owner_filter())
            if checked is None:
                return
            job, now_status, now_position = checked
            if now_status in TERMINAL:
                yield await _final_frame(rt, feed, job, identity, origin)
                return
            if (now_status, now_position) != (status, position):
                status, position = now_status, now_position
                yield _frame("status", {"status": status, "queue_position": position})
                written = time.monotonic()
            elif time.monotonic() - written >= HEARTBEAT_S:
                yield b": heartbeat\n\n"
                written = time.monotonic()
            continue
        if kind == "closed":  # the caller's token was revoked
            return
        if kind == "end":  # recorded in the queue before the event was sent
            job = await rt.quick(rt.service.get, job_id, identity)
            if job is None:
                return
            yield await _final_frame(rt, feed, job, identity, origin)
            return
        if kind == "executed":
            key = (data["node"], origin)
            frames = feed.output_frames.get(key)
            if frames is None:  # made once for all of the job's streams
                outputs = await asyncio.to_thread(rt.v2_jobs.outputs, job, [(data["node"], data["output"])], origin)
                frames = feed.output_frames[key] = [_frame("output", output) for output in outputs]
            for frame in frames:
                yield frame
        elif kind == "status":
            status, position = data["status"], data.get("queue_position")
            yield _frame("status", data)
        else:
            yield _frame(kind, data)
        written = time.monotonic()


async def _checked(rt: Runtime, feed: Feed, job_id: str, owner_view: str | None) -> tuple[Job, str, int | None] | None:
    """The job as the queue holds it, its status and its position: read once per job and recheck period,
    whichever of its streams asks first, so thousands of streams cost their jobs' reads, not theirs."""
    now = time.monotonic()
    cached = feed.checked.get(owner_view)
    if cached is not None and now - cached[0] < RECHECK_S / 2:
        return cached[1]
    job = await rt.quick(rt.store.get, job_id)
    if job is None:
        found = None
    else:
        status = rt.v2_jobs.status(job)
        position = await rt.quick(rt.store.position, job_id, owner_view) if status == "queued" else None
        found = (job, status, position)
    feed.checked[owner_view] = (now, found)
    return found


async def _final_frame(rt: Runtime, feed: Feed, job: Job, identity: Identity, origin: str) -> bytes:
    """The terminal `status` frame, made once per job and view for all of its streams (a job watched by
    thousands makes its outputs' list once, not once each)."""
    key = (identity.owner_filter(), origin)
    frame = feed.final.get(key)
    if frame is None:
        frame = feed.final[key] = _frame("status", _final(await _view(rt, job, identity, origin)))
    return frame


def _final(view: dict[str, Any]) -> dict[str, Any]:
    """The terminal `status` event: the status, and the job's complete outputs (and error)."""
    return {"status": view["status"], "queue_position": None, "outputs": view["outputs"], "error": view["error"]}
