"""ComfyUI's jobs API (/api/jobs), which frontend 1.58 reads for its queue and history panels: the
caller's own jobs (everyone's for an admin), waiting, running and finished, in one list.

The frontend checks the shapes strictly (zod): `status` one of pending, in_progress, completed, failed,
cancelled; times in milliseconds as numbers; nulls left out.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from zimage_serve.identity import Identity
from zimage_serve.queue.jobs import Job
from zimage_serve.server.gate import caller
from zimage_serve.server.routes_queue import history_entry, json_body, optional_int, plain_error, runtime
from zimage_serve.server.runtime import Runtime
from zimage_serve.server.stored_outputs import FileLinks

router = APIRouter()
# Each status is one state of the queue's: the store selects and counts by it.
STATES = {
    "pending": "pending",
    "in_progress": "running",
    "completed": "success",
    "failed": "error",
    "cancelled": "interrupted",
}
STATUSES = tuple(STATES)
STATUS_OF = {state: status for status, state in STATES.items()}
MEDIA = {"images": "images", "gifs": "video", "audio": "audio"}


def job_status(job: Job) -> str:
    return STATUS_OF[job.state]


def job_summary(job: Job, identity: Identity, links: FileLinks | None = None) -> dict[str, Any]:
    status = job_status(job)
    found: dict[str, Any] = {
        "id": job.id,
        "status": status,
        "priority": int(job.number) if float(job.number).is_integer() else job.number,
        "create_time": int(job.created * 1000),
        "outputs_count": 0,
    }
    workflow = (job.extra_data.get("extra_pnginfo") or {}).get("workflow") if job.extra_data else None
    if isinstance(workflow, dict) and isinstance(workflow.get("id"), str):
        found["workflow_id"] = workflow["id"]
    if status in ("pending", "in_progress"):
        return found
    messages = job.result.get("messages", [])
    for event, data in messages:
        if event == "execution_start" and isinstance(data, dict) and "timestamp" in data:
            found["execution_start_time"] = data["timestamp"]
        if event in ("execution_success", "execution_error", "execution_interrupted") and isinstance(data, dict):
            if "timestamp" in data:
                found["execution_end_time"] = data["timestamp"]
            if event == "execution_error":
                found["execution_error"] = data
    entry = history_entry(job, identity, links)
    items = [
        {**item, "nodeId": node_id, "mediaType": MEDIA[kind]}
        for node_id, ui in entry["outputs"].items()
        if isinstance(ui, dict)
        for kind, values in ui.items()
        if kind in MEDIA and isinstance(values, list)
        for item in values
        if isinstance(item, dict)
    ]
    found["outputs_count"] = len(items)
    previewable = [item for item in items if item.get("type") in ("output", "temp")]
    found["previewable_outputs_count"] = len(previewable)
    if previewable:
        found["preview_output"] = previewable[0]
    return found


def _listed(rt: Runtime, identity: Identity, wanted: set[str]) -> list[Job]:
    store, owner = rt.store, identity.owner_filter()
    jobs: list[Job] = []
    if "in_progress" in wanted:
        jobs += [j for j in store.running() if owner is None or j.owner == owner]
    if "pending" in wanted:
        jobs += [j for j in store.pending() if owner is None or j.owner == owner]
    if wanted & {"completed", "failed", "cancelled"}:
        jobs += store.history(owner=owner)
    return jobs


@router.get("/jobs")
async def list_jobs(request: Request) -> Response:
    query = request.query_params
    wanted = set(STATUSES)
    if query.get("status"):
        wanted = {s.strip() for s in query["status"].split(",") if s.strip()}
        unknown = sorted(wanted - set(STATUSES))
        if unknown:
            return plain_error(400, f"status: {unknown[0]!r} is not one of {', '.join(STATUSES)}")
    sort_by = query.get("sort_by") or "created_at"
    if sort_by not in ("created_at", "execution_duration"):
        return plain_error(400, "sort_by must be created_at or execution_duration")
    order = query.get("sort_order") or "desc"
    if order not in ("asc", "desc"):
        return plain_error(400, "sort_order must be asc or desc")
    try:
        limit = optional_int(query.get("limit"), "limit")
        offset = optional_int(query.get("offset"), "offset") or 0
        if limit == 0:
            raise ValueError("limit must be at least 1")
    except ValueError as exc:
        return plain_error(400, str(exc))
    rt, identity = runtime(request), caller(request)
    # Read, summarised, sorted and paged in a thread: with 10,000 entries that is most of a second, which
    # the event loop (every other user's requests) must not wait for.
    page = await asyncio.to_thread(_page, rt, identity, wanted, query.get("workflow_id"), sort_by, order, offset, limit)
    return JSONResponse(page)


def _page(
    rt: Runtime,
    identity: Identity,
    wanted: set[str],
    workflow_id: str | None,
    sort_by: str,
    order: str,
    offset: int,
    limit: int | None,
) -> dict[str, Any]:
    if sort_by == "created_at" and not workflow_id:  # the frontend's question: the store reads one page
        states = {STATES[status] for status in wanted}
        jobs, total = rt.store.jobs_page(states, identity.owner_filter(), offset, limit, order == "desc")
        links = rt.outputs.links(job.id for job in jobs)
        page = [job_summary(job, identity, links.get(job.id)) for job in jobs]
        return {"jobs": page, "pagination": _pagination(offset, limit, len(page), total)}
    # Sorted by how long each ran, or narrowed to a workflow: from every job's summary.
    listed = {job.id: job for job in _listed(rt, identity, wanted)}
    summaries = [job_summary(job, identity) for job in listed.values()]
    summaries = [s for s in summaries if s["status"] in wanted]
    if workflow_id:
        summaries = [s for s in summaries if s.get("workflow_id") == workflow_id]

    def duration(summary: dict[str, Any]) -> float:
        return float(summary.get("execution_end_time", 0) - summary.get("execution_start_time", 0))

    key = duration if sort_by == "execution_duration" else (lambda s: float(s["create_time"]))
    summaries.sort(key=key, reverse=order == "desc")
    total = len(summaries)
    page = summaries[offset : offset + limit] if limit is not None else summaries[offset:]
    if rt.outputs.enabled:  # the page's files with their objects' URLs
        links = rt.outputs.links(summary["id"] for summary in page)
        page = [job_summary(listed[s["id"]], identity, links.get(s["id"])) for s in page]
    return {"jobs": page, "pagination": _pagination(offset, limit, len(page), total)}


def _pagination(offset: int, limit: int | None, shown: int, total: int) -> dict[str, Any]:
    return {
        "offset": offset,
        "limit": limit if limit is not None else total,
        "total": total,
        "has_more": offset + shown < total,
    }


@router.get("/jobs/{job_id}")
async def get_job(request: Request, job_id: str) -> Response:
    identity, rt = caller(request), runtime(request)
    job = rt.service.get(job_id, identity)
    if job is None:
        return plain_error(404, "Job not found")
    links = await asyncio.to_thread(rt.outputs.job_links, job.id) if rt.outputs.enabled else None
    found = job_summary(job, identity, links)
    if job.state not in ("pending", "running"):
        entry = history_entry(job, identity, links)
        found["outputs"] = entry["outputs"]
        found["execution_status"] = entry["status"]
    found["workflow"] = {"prompt": job.prompt, "extra_data": job.extra_data}
    return JSONResponse(found)


@router.post("/jobs/{job_id}/cancel")
async def cancel_job(request: Request, job_id: str) -> Response:
    rt = runtime(request)
    cancelled = rt.service.cancel(job_id, caller(request))
    if cancelled:
        rt.queue_changed()
    return JSONResponse({"cancelled": cancelled})


@router.post("/jobs/cancel")
async def cancel_jobs(request: Request) -> Response:
    try:
        body = await json_body(request)
    except ValueError as exc:
        return plain_error(400, str(exc))
    ids = body.get("job_ids") if isinstance(body, dict) else None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        return plain_error(400, "job_ids must be a list of job ids")
    rt, identity = runtime(request), caller(request)
    cancelled = [rt.service.cancel(job_id, identity) for job_id in ids]
    if any(cancelled):
        rt.queue_changed()
    return JSONResponse({"cancelled": any(cancelled)})
