"""OpenAI's Images API on the same queue: POST /v1/images/generations and GET /v1/models.

A request renders the chosen model's built-in template (`templates/builtin.py`) with the prompt, size,
batch and seed, is queued like any ComfyUI prompt, and is answered when the worker has run it. `seed`
is our extension; `quality`, `style` and `user` are accepted and ignored.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import secrets
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from zimage_serve.engine.trained_size import size_warning
from zimage_serve.identity import Identity
from zimage_serve.limits import MAX_SIDE, MIN_SIDE, SIDE_STEP, describe, size_refusal
from zimage_serve.queue.jobs import QueueFull, Quota, QuotaExceeded
from zimage_serve.security.audit import prompt_fields
from zimage_serve.server.gate import audit_note, caller, caller_token
from zimage_serve.server.routes_queue import json_body, note_job, runtime
from zimage_serve.server.runtime import Runtime
from zimage_serve.server.schemas import ImagesRequest, json_request
from zimage_serve.server.service import PromptBlocked, PromptRejected
from zimage_serve.server.stored_outputs import StoreUnavailable
from zimage_serve.server.waits import LIVE
from zimage_serve.templates import Template, TemplateParameterError
from zimage_serve.templates.builtin import builtin, builtin_names
from zimage_serve.workflow.folders import Folders
from zimage_serve.workflow.spec import MAX_SEED

router = APIRouter()
log = logging.getLogger(__name__)

MAX_IMAGES = 10
SIZE = re.compile(r"^(\d{2,5})x(\d{2,5})$")
LOADERS = {
    "UNETLoader": "unet_name",
    "CLIPLoader": "clip_name",
    "VAELoader": "vae_name",
    "LoraLoaderModelOnly": "lora_name",
}
RESOURCES = {
    "UNETLoader": "diffusion_models",
    "CLIPLoader": "text_encoders",
    "VAELoader": "vae",
    "LoraLoaderModelOnly": "loras",
}
DEFAULT_SIZE = 1024  # the 6B models' native size; a template that knows better says so


def models(folders: Folders) -> dict[str, Template]:
    """Model id → its built-in template, for the models whose files are installed now."""
    found: dict[str, Template] = {}
    for name in builtin_names():
        template = builtin(name)
        if template is not None and _installed(template, folders):
            found[name] = template
    return found


def _installed(template: Template, folders: Folders) -> bool:
    for node in template.workflow.values():
        kind = node["class_type"]
        if kind in LOADERS:
            file = node["inputs"][LOADERS[kind]]
            if file == "":  # an optional LoRA left unset
                continue
            if file not in folders.builtin and file not in folders.names(RESOURCES[kind]):
                return False
    return True


def openai_error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    ids = models(runtime(request).folders)
    return {
        "object": "list",
        "data": [{"id": i, "object": "model", "created": 0, "owned_by": "zimage-serve"} for i in ids],
    }


@router.post("/v1/images/generations", openapi_extra=json_request(ImagesRequest))
async def generate(request: Request) -> Response:
    rt = runtime(request)
    identity, token = caller(request), caller_token(request)
    try:
        body = await json_body(request)
    except ValueError as exc:
        return openai_error(400, str(exc))
    if not isinstance(body, dict):
        return openai_error(400, "the body must be a JSON object")
    available = models(rt.folders)
    model = body.get("model") or "zimage-nano"
    if not isinstance(model, str):
        return openai_error(400, "model must be a model id (text)", "model")
    if model not in available:
        return openai_error(
            404, f"model {model!r} does not exist; available: {', '.join(available)}", "model", "model_not_found"
        )
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        return openai_error(400, "prompt must be a non-empty string", "prompt")
    limits = rt.settings.run.limits
    most = min(MAX_IMAGES, limits.batch)
    n = body.get("n", 1)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= most:
        return openai_error(400, f"n must be a whole number from 1 to {most}", "n")
    response_format = body.get("response_format") or "url"
    if response_format not in ("url", "b64_json"):
        return openai_error(400, "response_format must be url or b64_json", "response_format")
    template = available[model]
    native = template.native_size or DEFAULT_SIZE
    size = body.get("size") or f"{native}x{native}"
    match = SIZE.match(size) if isinstance(size, str) else None
    if not match:
        return openai_error(
            400, f"size must be WIDTHxHEIGHT, multiples of {SIDE_STEP} from {MIN_SIDE} to {MAX_SIDE}", "size"
        )
    width, height = int(match.group(1)), int(match.group(2))
    refused = size_refusal(width, height, identity.limits or limits)  # the bounds every route shares
    if refused is not None:
        field, why = refused
        return openai_error(400, f"size: {why}" if field == "size" else f"size: {field} {why}", "size")
    if n * width * height > limits.request_pixels:
        return openai_error(
            400, f"n × size: {describe('request_pixels', n * width * height, limits.request_pixels)}", "n"
        )
    seed = body.get("seed", secrets.randbelow(2**32))
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        return openai_error(400, f"seed must be a whole number from 0 to {MAX_SEED}", "seed")

    warning = size_warning(model, template.native_size, width, height)  # told in the answer too (`answer`)
    try:
        workflow = template.render(
            prompt=prompt, width=width, height=height, batch_size=n, seed=seed, prefix=f"openai/{model}"
        )
    except TemplateParameterError as exc:
        name, why = next(iter(exc.problems.items()))
        return openai_error(400, f"{name}: {why}", name)
    try:
        submitted = await rt.submissions.submit(  # the way every route queues a prompt
            workflow,
            off_loop=True,
            extra_data={"source": "openai"},
            identity=identity,
            quota=Quota(token.max_queued, token.images_per_day) if token is not None else None,
        )
    except PromptBlocked as exc:
        audit_note(
            request,
            outcome="blocked",
            rule=exc.rule,
            node=exc.node_id,
            **prompt_fields([exc.text], rt.settings.security.audit_prompts),
        )
        return openai_error(400, exc.body["error"]["details"], "prompt", "prompt_blocked")
    except PromptRejected as exc:
        return openai_error(400, exc.body["error"]["details"] or exc.body["error"]["message"])
    except (QueueFull, QuotaExceeded) as exc:
        response = openai_error(429, str(exc), code="rate_limit_exceeded")
        wait = exc.retry_after if isinstance(exc, QuotaExceeded) else rt.settings.retry_after_s
        response.headers["Retry-After"] = str(wait)
        return response
    rt.queue_changed()
    job_id = submitted.job.id
    note_job(request, rt, submitted)  # written by the gate once the images are answered (no record given)
    job = await rt.waits.wait(job_id, client_left(request))
    if job is None:
        return openai_error(409, "the request was removed from the queue before it ran", code="cancelled")
    if job.state in LIVE:  # nobody waits for these images: free the worker for others
        await asyncio.to_thread(rt.service.cancel, job_id, identity)
        rt.queue_changed()
        log.info("OpenAI images request %s: the client left; its prompt was cancelled", job_id)
        return Response(status_code=499)
    if job.state != "success":
        errors = [d.get("exception_message") for e, d in job.result.get("messages", []) if e == "execution_error"]
        return openai_error(500, errors[0] if errors and errors[0] else "the generation did not finish", code=job.state)
    images = [i for ui in job.result.get("outputs", {}).values() for i in ui.get("images", [])]
    data = []
    space = rt.folders.space(identity.space)
    base = rt.security.public_base()
    for image in images:
        if response_format == "b64_json":
            path = space.output / image["subfolder"] / image["filename"]
            try:
                found = await _read(rt, identity, image, path)
            except StoreUnavailable as exc:
                return openai_error(503, str(exc), code="store_unavailable")
            data.append({"b64_json": base64.b64encode(found).decode(), "revised_prompt": prompt})
        else:
            query = urlencode({"filename": image["filename"], "subfolder": image["subfolder"], "type": image["type"]})
            data.append({"url": f"{base}/view?{query}", "revised_prompt": prompt})
    return answer({"created": int(time.time()), "data": data}, warning)


async def client_left(request: Request) -> None:
    """Returns once the client has gone (its body was read: what comes next is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def answer(body: dict[str, Any], warning: str | None) -> JSONResponse:
    """The images, with the trained-size warning where there is one, told twice without breaking OpenAI's shape.

    A size the model was never trained at gives a pattern, not a picture, and the sampler's log line reaches
    only the operator. The caller is told in a top-level `warnings` list, which the openai package keeps
    (its response models allow extra keys: `result.warnings`, or `result.model_extra`), and in a `Warning`
    header (RFC 7234's 299, "miscellaneous persistent warning"; ASCII, as header values should be) for
    clients that read only headers. Neither changes `created` or `data`, all that OpenAI clients parse."""
    if warning is None:
        return JSONResponse(body)
    text = warning.replace("×", "x").replace('"', "'").encode("ascii", "replace").decode()
    return JSONResponse({**body, "warnings": [warning]}, headers={"Warning": f'299 zimage-serve "{text}"'})


async def _read(rt: Runtime, identity: Identity, image: dict[str, Any], path: Path) -> bytes:
    """An image's bytes: from the disk, or from the output store once its upload emptied the file."""
    if rt.outputs.enabled:
        stored = await asyncio.to_thread(
            rt.outputs.emptied_bytes, "output", identity.space or "", image["subfolder"], image["filename"], str(path)
        )
        if stored is not None:
            return stored
    return await asyncio.to_thread(path.read_bytes)
