"""GET /view: files from the output, input and temp folders, never from anywhere else."""

from __future__ import annotations

import mimetypes
from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, JSONResponse

from zimage_serve.server.routes_queue import runtime

router = APIRouter()

UNSAFE_TYPES = {"text/html", "text/html-sandboxed", "application/xhtml+xml", "text/javascript", "text/css"}
ANNOTATIONS = {" [output]": "output", " [input]": "input", " [temp]": "temp"}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


@router.get("/view")
async def view(request: Request) -> Response:
    rt = runtime(request)
    query = request.query_params
    filename = query.get("filename", "")
    if not filename:
        return _error(404, "filename is required")
    kind = query.get("type") or "output"
    for suffix, annotated in ANNOTATIONS.items():
        if filename.endswith(suffix):
            filename, kind = filename.removesuffix(suffix), annotated
    folders = {"output": rt.folders.output, "input": rt.folders.input, "temp": rt.folders.temp}
    if kind not in folders:
        return _error(400, f"type must be output, input or temp, not {kind!r}")
    if filename.startswith(("/", "\\")) or ".." in filename or "\x00" in filename:
        return _error(400, "filename must be a plain file name")
    base = folders[kind].resolve()
    subfolder = query.get("subfolder", "")
    folder = (base / subfolder).resolve()
    if "\x00" in subfolder or not folder.is_relative_to(base):
        return _error(403, "subfolder leads outside the folder")
    path = folder / Path(filename).name
    if not path.is_file():
        return _error(404, "file not found")
    if not path.resolve().is_relative_to(base):  # a symlink pointing out of the folder
        return _error(403, "file leads outside the folder")
    media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    if media_type in UNSAFE_TYPES:
        media_type = "application/octet-stream"
    headers = {"Content-Disposition": f'filename="{path.name}"', "X-Content-Type-Options": "nosniff"}
    return FileResponse(path, media_type=media_type, headers=headers)
