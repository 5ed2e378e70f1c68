"""The official ComfyUI web frontend (the `comfyui-frontend-package` wheel) at `/`, the simple page, and
the small routes the frontend calls that have no other home: i18n, templates, /internal (signing in and
out is routes_sign_in.py).

Caching as ComfyUI's frontend expects, and so that opening the page does not load the API: the hashed
files under `assets/` are kept by the browser for a year; `index.html` and the unhashed scripts are
checked again every time (`no-cache`).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.resources
import os
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from zimage_serve import workflows
from zimage_serve.server import openai_images
from zimage_serve.server.gate import caller
from zimage_serve.server.routes_queue import runtime
from zimage_serve.workflow.folders import MODEL_FOLDERS, UnknownFileError, contained
from zimage_serve.workflow.nodes import NODES
from zimage_serve.workflow.ui_export import to_ui
from zimage_serve.workflows import templates

router = APIRouter()
FRONTEND_PACKAGE = "comfyui-frontend-package"
IMMUTABLE = "public, max-age=31536000, immutable"


def frontend_root() -> Path:
    """The frontend's files, from the installed wheel (nothing is downloaded at run time)."""
    return Path(str(importlib.resources.files("comfyui_frontend_package") / "static"))


@functools.cache
def frontend_version() -> str:
    """The installed frontend's version (read once: a metadata lookup walks the installed packages)."""
    try:
        return importlib.metadata.version(FRONTEND_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class FrontendFiles(StaticFiles):
    """The frontend's static files with the cache lifetimes above."""

    def file_response(
        self, full_path: Any, stat_result: os.stat_result, scope: Scope, status_code: int = 200
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        path = str(scope.get("path", ""))
        hashed = "/assets/" in path and not path.endswith((".json", ".map"))
        response.headers["Cache-Control"] = IMMUTABLE if hashed else "no-cache"
        if str(full_path).endswith(".js"):
            response.headers["Content-Type"] = "application/javascript; charset=utf-8"
        return response


def index_response() -> Response:
    response = Response((frontend_root() / "index.html").read_bytes(), media_type="text/html; charset=utf-8")
    response.headers["Cache-Control"] = "no-cache, no-store, must-revalidate"
    return response


@router.get("/", include_in_schema=False)
async def index(request: Request) -> Response:
    return index_response()


@router.get("/user.css", include_in_schema=False)
async def user_css() -> Response:
    """index.html links a server-wide stylesheet beside the user's own; this server adds no style."""
    return Response(b"", media_type="text/css", headers={"Cache-Control": "no-cache"})


@router.get("/templates/{name}", include_in_schema=False)
async def template_file(name: str) -> Response:
    """The frontend's template browser: `index.json` (`index.<locale>.json` for other languages: ours are
    the same), `index_logo.json`, then each template's UI-format workflow and thumbnail."""
    if name == "index_logo.json":
        return JSONResponse({})
    if name == "index.json" or (name.startswith("index.") and name.endswith(".json")):
        return JSONResponse(templates.index())
    stem, _, suffix = name.rpartition(".")
    template = templates.find(stem.removesuffix("-1") if suffix == "webp" else stem)
    if template is None or suffix not in ("json", "webp"):
        return JSONResponse({"error": f"no template {name!r}"}, status_code=404)
    if suffix == "webp":
        return FileResponse(template.thumbnail, media_type="image/webp", headers={"Cache-Control": "no-cache"})
    document = workflows.load(template.workflow)
    shown = document if template.ui_format else to_ui(document, NODES)
    return JSONResponse(shown, headers={"Cache-Control": "no-cache"})


# -- the simple page ------------------------------------------------------------------------------
PAGES = Path(__file__).parent / "pages"
SIZES = {
    128: [(128, 128), (64, 64), (192, 192)],
    1024: [(1024, 1024), (1152, 896), (896, 1152), (1344, 768), (768, 1344), (512, 512)],
}


@router.get("/simple", include_in_schema=False)
async def simple_page() -> Response:
    """A form for people who will never open a node graph, on the same queue and API as everything."""
    return FileResponse(
        PAGES / "simple.html", media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"}
    )


@router.get("/zimage/workflows")
async def runnable_workflows(request: Request) -> dict[str, Any]:
    """The API workflows of the models installed now, with their sizes and steps (the simple page's), and
    the one size a model was trained at if it has one (`trained_size`; null for the 6B models): the page
    says so beside any other size, since the server's log is where the sampler's warning goes."""
    found = {}
    for model, template in openai_images.models(runtime(request).folders).items():
        workflow, native = template.render(), template.native_size or openai_images.DEFAULT_SIZE
        sampler = next(n for n in workflow.values() if n["class_type"] == "KSampler")
        found[model] = {
            "workflow": workflow,
            "sizes": SIZES.get(native, [(native, native)]),
            "steps": sampler["inputs"]["steps"],
            "trained_size": template.native_size,
        }
    return found


# -- what the frontend asks of the server --------------------------------------------------------------
@router.get("/i18n")
async def get_i18n() -> dict[str, Any]:
    return {}  # no custom nodes with locales


@router.get("/workflow_templates")
async def get_workflow_templates() -> dict[str, Any]:
    return {}  # custom nodes' templates: none (ours are served as /templates/index.json)


@router.get("/global_subgraphs")
async def get_global_subgraphs() -> dict[str, Any]:
    return {}


def folder_paths(request: Request) -> dict[str, list[str]]:
    """Each model folder's directories, as ComfyUI's folder_paths lists them."""
    folders = runtime(request).folders
    return {name: [str(root / sub) for root in folders.models for sub in subs] for name, subs in MODEL_FOLDERS.items()}


@router.get("/experiment/models")
async def get_model_folders(request: Request) -> list[dict[str, Any]]:
    return [{"name": name, "folders": paths} for name, paths in folder_paths(request).items()]


@router.get("/experiment/models/{folder}")
async def get_models_in(request: Request, folder: str) -> Response:
    rt = runtime(request)
    if folder not in MODEL_FOLDERS:
        return JSONResponse({"error": f"unknown model folder {folder!r}"}, status_code=404)
    return JSONResponse(
        [{"name": name, "pathIndex": 0, "modified": 0, "created": 0, "size": 0} for name in rt.folders.names(folder)]
    )


@router.get("/view_metadata/{folder}")
async def view_metadata(request: Request, folder: str) -> Response:
    """A model file's safetensors metadata, as ComfyUI answers (only .safetensors files)."""
    rt = runtime(request)
    filename = request.query_params.get("filename", "")
    if folder not in MODEL_FOLDERS or not filename.endswith(".safetensors"):
        return JSONResponse({}, status_code=404)
    try:
        path = rt.folders.resolve(folder, filename)
    except UnknownFileError:
        return JSONResponse({}, status_code=404)
    from safetensors import safe_open  # light: no torch when reading only the header

    try:
        with safe_open(str(path), framework="numpy") as handle:
            return JSONResponse(handle.metadata() or {})
    except Exception:  # not a readable safetensors file: as ComfyUI, nothing to show
        return JSONResponse({}, status_code=404)


# -- /internal (served bare, as ComfyUI does) -----------------------------------------------------------
@router.get("/internal/folder_paths")
async def internal_folder_paths(request: Request) -> dict[str, list[str]]:
    return folder_paths(request)


@router.get("/internal/logs")
async def internal_logs() -> str:
    return ""  # the server's log goes to its own stream; the terminal panel shows nothing


@router.get("/internal/logs/raw")
async def internal_logs_raw() -> dict[str, Any]:
    return {"entries": [], "size": {"cols": 80, "rows": 24}}


@router.patch("/internal/logs/subscribe")
async def internal_logs_subscribe() -> Response:
    return Response(status_code=200)


@router.get("/internal/files/{kind}")
async def internal_files(request: Request, kind: str) -> Response:
    """The caller's own files of a folder, newest first (not recursive), as ComfyUI lists them."""
    space = runtime(request).folders.space(caller(request).space)
    root = space.of_type(kind)
    if root is None:
        return JSONResponse({"error": "Invalid directory type"}, status_code=400)
    try:
        entries = [e for e in os.scandir(contained(root, "", kind, empty_ok=True)) if e.is_file()]
    except (OSError, UnknownFileError):
        return JSONResponse([])
    entries.sort(key=lambda e: e.stat().st_mtime, reverse=True)
    return JSONResponse([e.name for e in entries if not e.name.startswith(".")])


def frontend_files() -> FrontendFiles:
    return FrontendFiles(directory=str(frontend_root()), html=False, check_dir=True)
