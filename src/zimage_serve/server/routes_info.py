"""Read-only routes: node definitions, model lists, system stats, feature flags."""

from __future__ import annotations

import asyncio
import functools
import importlib.metadata
import os
import platform
import sys
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from zimage_serve import __version__
from zimage_serve.redact import redacted
from zimage_serve.server.gate import caller
from zimage_serve.server.routes_frontend import frontend_version
from zimage_serve.server.routes_queue import runtime

router = APIRouter()


@router.get("/object_info")
async def get_object_info(request: Request) -> JSONResponse:
    # A dict would be walked by FastAPI; the file lists are the caller's own (their uploads)
    return JSONResponse(runtime(request).service.object_info(caller(request)))


@router.get("/object_info/{node_class}")
async def get_node_info(request: Request, node_class: str) -> dict[str, Any]:
    info = runtime(request).service.node_info(node_class, caller(request))
    return {} if info is None else {node_class: info}


@router.get("/models")
async def get_model_folders(request: Request) -> list[str]:
    return runtime(request).service.model_folders()


@router.get("/models/{folder}")
async def get_models(request: Request, folder: str) -> JSONResponse:
    names = runtime(request).service.models(folder)
    if names is None:
        return JSONResponse({"error": f"unknown model folder {folder!r}"}, status_code=404)
    return JSONResponse(names)


@router.get("/embeddings")
async def get_embeddings() -> list[str]:
    return []  # Z-Image has no textual-inversion embeddings


@router.get("/extensions")
async def get_extensions() -> list[str]:
    return []


@router.get("/features")
async def get_features(request: Request) -> dict[str, Any]:
    return {"supports_preview_metadata": False, "max_upload_size": float(runtime(request).settings.max_upload_bytes)}


@router.get("/health")
async def get_health(request: Request) -> JSONResponse:
    """Whether this server takes and runs prompts now: 200 once its worker has loaded the default model,
    503 while it starts (or restarts after a crash); the body says which, and how many prompts wait."""
    rt = runtime(request)
    state = rt.service.worker_state()
    body: dict[str, Any] = {"status": state, "worker": state}
    if not rt.security.auth:  # with authentication on, anyone may ask: it says only whether the server is up
        body.update(queue_remaining=rt.service.remaining(), version=__version__)
    return JSONResponse(body, status_code=200 if state == "ready" else 503)


@router.get("/system_stats")
async def get_system_stats(request: Request) -> dict[str, Any]:
    """ComfyUI's answer, its shape kept (the official frontend checks it). `devices` has one entry per
    worker of the cluster, each with our own keys beside ComfyUI's: the worker, its state, the prompts
    it runs and the age of its last heartbeat (its host too, for admins). GET /api/zimage/workers lists
    the workers alone."""
    rt = runtime(request)
    workers = await asyncio.to_thread(rt.workers)
    admin = caller(request).admin
    devices = [_device_of(worker, admin) for worker in workers] or [rt.service.device_stats()]
    return {
        "system": {
            "os": platform.system().lower(),
            "python_version": sys.version,
            "pytorch_version": _torch_version(),
            "comfyui_version": f"zimage-serve {__version__}",
            "required_frontend_version": frontend_version(),
            "embedded_python": False,
            # This server has none of ComfyUI's API (cloud) nodes: the flag that says so also keeps the
            # frontend from calling api.comfy.org (release notes, pricing), which an offline server cannot reach.
            # The command line is the operator's (paths, addresses): admins see it, with passwords hidden.
            "argv": [*([redacted(arg) for arg in sys.argv] if admin else ["zimage"]), "--disable-api-nodes"],
            "ram_total": _memory("SC_PHYS_PAGES"),
            "ram_free": _memory("SC_AVPHYS_PAGES"),
        },
        "devices": devices,
    }


def _device_of(worker: dict[str, Any], admin: bool) -> dict[str, Any]:
    device = dict(worker["device"]) if isinstance(worker.get("device"), dict) else {}
    worker_name = str(worker.get("id", ""))
    device.update(
        zimage_worker=worker_name if admin else shown_worker(worker_name),
        zimage_state=worker.get("state", ""),
        zimage_heartbeat_age_s=worker.get("heartbeat_age_s", 0.0),
    )
    if admin:  # other users' prompts and the machines: admins only
        device["zimage_host"] = worker.get("host", "")
        device["zimage_running"] = [r.get("prompt_id") for r in worker.get("running", [])]
    return device


@router.get("/zimage/workers")
async def get_workers(request: Request) -> dict[str, Any]:
    """The workers serving this node's queue (the cluster's, with Redis): id, state, device, the prompts
    each runs (and on which node), the age of its last heartbeat; hosts and processes for admins only."""
    rt = runtime(request)
    workers = await asyncio.to_thread(rt.workers)
    if not caller(request).admin:
        workers = [
            {
                "id": shown_worker(str(w.get("id", ""))),
                "state": w.get("state"),
                "heartbeat_age_s": w.get("heartbeat_age_s"),
            }
            for w in workers
        ]
    return {"queue": rt.backend.kind, "node": rt.node_name, "workers": workers}


def shown_worker(worker: str) -> str:
    """A worker's id as users see it: its ids are host:process:random, and the hosts are the operator's."""
    return "worker-" + worker.rsplit(":", 1)[-1] if worker else ""


@functools.cache
def _torch_version() -> str:
    """torch's version from its installed metadata: the server process never imports torch itself."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _memory(pages: str) -> int:
    """Bytes of physical memory (total or available) as the OS reports them; 0 where it cannot say."""
    try:
        return int(os.sysconf(pages)) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0
