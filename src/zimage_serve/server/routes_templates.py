"""Templates behind the API: list, read (any version), add (a new version), and queue one by name.

    GET  /api/zimage/templates                       the caller's templates, latest versions
    GET  /api/zimage/templates/{name}?version=N      a template document
    POST /api/zimage/templates                       {"name", "workflow", "parameters"?, "title"?, ...}
    POST /api/zimage/templates/{name}/prompt         {"params", "version"?, "client_id"?, "front"?, ...}

The last renders the template with the values and queues the graph exactly as POST /prompt would, and
answers as it does; a value that does not fit is a 400 naming each parameter and why.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from zimage_serve import strict_json
from zimage_serve.security.storage import StorageFull
from zimage_serve.server.gate import caller, caller_token
from zimage_serve.server.routes_queue import json_body, optional_int, plain_error, queue_prompt, runtime
from zimage_serve.templates import TemplateError, TemplateNotFound, TemplateParameterError
from zimage_serve.templates.source import template_from
from zimage_serve.workflow.nodes import NODES
from zimage_serve.workflow.ui_format import to_api
from zimage_serve.workflow.validate import error_body

router = APIRouter()
QUEUE_FIELDS = ("client_id", "front", "number", "prompt_id", "extra_data")


def template_error(exc: TemplateError, status: int = 400) -> JSONResponse:
    problems = exc.problems if isinstance(exc, TemplateParameterError) else {}
    kind = "invalid_template_parameters" if problems else "invalid_template"
    message = "Invalid template values" if problems else "Invalid template"
    return JSONResponse(error_body(kind, message, str(exc), {"parameters": problems}), status_code=status)


@router.get("/zimage/templates")
async def list_templates(request: Request) -> dict[str, Any]:
    library, user = runtime(request).templates, caller(request).space
    return {"templates": await asyncio.to_thread(library.catalogue, user)}


@router.get("/zimage/templates/{name}")
async def get_template(request: Request, name: str) -> Response:
    library, user = runtime(request).templates, caller(request).space
    try:
        version = optional_int(request.query_params.get("version"), "version")
        if version == 0:
            raise ValueError("version must be a whole number from 1")
        template = library.get(name, version, user)
    except ValueError as exc:
        return plain_error(400, str(exc))
    except TemplateNotFound as exc:
        return plain_error(404, str(exc))
    except TemplateError as exc:
        return plain_error(400, str(exc))
    return JSONResponse({**template.to_json(), "versions": library.versions(name, user)})


@router.post("/zimage/templates", status_code=201)
async def add_template(request: Request) -> Response:
    try:
        body = await json_body(request)
    except ValueError as exc:
        return plain_error(400, str(exc))
    if not isinstance(body, dict):
        return plain_error(400, 'the body must be a JSON object: {"name": ..., "workflow": ...}')
    document = dict(body)
    name = document.pop("name", None)
    if not isinstance(name, str):
        return plain_error(400, "name: give the template a name")
    rt, who = runtime(request), caller(request)
    library, user, limits = rt.templates, who.space, who.limits or rt.settings.run.limits
    try:
        # Off the loop: a UI-format workflow is counted, then flattened, and a large one takes a while.
        template = await asyncio.to_thread(
            template_from, document, name, to_api=lambda data: to_api(data, NODES, limits)
        )
        unknown = sorted({node["class_type"] for node in template.workflow.values()} - set(NODES))
        if unknown:
            raise TemplateError(f"workflow: this server has no node {', '.join(unknown)}")
        size = len(strict_json.dumps(template.to_json()))  # about what a version takes on disk
        async with rt.storage.room(who, rt.storage_limits(who, caller_token(request)), size):
            added = await asyncio.to_thread(library.add, template, user)
    except TemplateError as exc:
        return template_error(exc)
    except StorageFull as exc:
        return plain_error(exc.status, str(exc))
    made = added.template
    answer = {"name": made.name, "version": made.version, "created": added.created, "parameters": list(made.parameters)}
    return JSONResponse(answer, status_code=201 if added.created else 200)


@router.post("/zimage/templates/{name}/prompt")
async def queue_template(request: Request, name: str) -> Response:
    try:
        body = await json_body(request, empty_ok=True)
    except ValueError as exc:
        return plain_error(400, str(exc))
    body = {} if body is None else body
    if not isinstance(body, dict):
        return plain_error(400, 'the body must be a JSON object: {"params": {...}}')
    params = body.get("params", {})
    version = body.get("version")
    if not isinstance(params, dict):
        return plain_error(400, "params: must be an object of parameter name → value")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 1):
        return plain_error(400, "version: must be a whole number from 1")
    try:
        template = runtime(request).templates.get(name, version, caller(request).space)
        graph = template.render(params)
    except TemplateNotFound as exc:
        return plain_error(404, str(exc))
    except TemplateError as exc:
        return template_error(exc)
    extra = body.get("extra_data", {})
    queued: dict[str, Any] = {key: body[key] for key in QUEUE_FIELDS if key in body}
    if isinstance(extra, dict):
        queued["extra_data"] = {**extra, "template": {"name": template.name, "version": template.version}}
    response = await queue_prompt(request, {**queued, "prompt": graph})
    return response
