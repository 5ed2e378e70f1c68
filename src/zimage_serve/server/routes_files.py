"""GET /view: files from the output, input and temp folders, never from anywhere else.

Only raster images are shown inline; anything else (SVG and PDF can carry scripts) is sent as an
attachment, with sniffing off, so a file a client put in a folder never runs as a page of this origin.
"""

from __future__ import annotations

import asyncio
import mimetypes
import os
from urllib.parse import quote

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse

from zimage_serve.server.gate import audit_note, caller
from zimage_serve.server.routes_queue import plain_error, runtime
from zimage_serve.server.schemas import query
from zimage_serve.server.stored_outputs import StoreUnavailable
from zimage_serve.workflow.folders import FILE_TYPES, UnknownFileError, contained

router = APIRouter()

INLINE_TYPES = {"image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp", "image/avif"}
ANNOTATIONS = {" [output]": "output", " [input]": "input", " [temp]": "temp"}


def content_disposition(disposition: str, filename: str) -> str:
    """RFC 6266: a plain ASCII fallback and the exact name percent-encoded, so no byte of a name can break
    the header."""
    fallback = "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in filename)
    return f"{disposition}; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


@router.get(
    "/view",
    openapi_extra=query(
        ("filename", {"type": "string"}, "A file name (may end in ' [output]', ' [input]' or ' [temp]')"),
        ("type", {"type": "string", "enum": list(FILE_TYPES)}, "The folder; output when absent"),
        ("subfolder", {"type": "string"}, "A folder inside it"),
    ),
)
async def view(request: Request) -> Response:
    rt = runtime(request)
    folders = rt.folders.space(caller(request).space)  # a user reads their own files; an admin everyone's
    query = request.query_params
    filename = query.get("filename", "")
    if not filename:
        return plain_error(404, "filename is required")
    kind = query.get("type") or "output"
    for suffix, annotated in ANNOTATIONS.items():
        if filename.endswith(suffix):
            filename, kind = filename.removesuffix(suffix), annotated
    root = folders.of_type(kind)
    if root is None:
        return plain_error(400, f"type must be {' or '.join(FILE_TYPES)}, not {kind!r}")
    if "/" in filename or "\\" in filename:
        return plain_error(400, "filename must be a plain file name")
    subfolder = query.get("subfolder", "")
    try:
        path = contained(root, f"{subfolder}/{filename}" if subfolder else filename, "filename")
    except UnknownFileError as exc:
        return plain_error(exc.status, str(exc))
    if not os.path.isfile(path):  # another user's file too: it is not in this caller's space
        return plain_error(404, "file not found")
    audit_note(request, files=["/".join(p for p in (kind, subfolder, filename) if p)])
    media_type = mimetypes.guess_type(path)[0] or "application/octet-stream"
    inline = media_type in INLINE_TYPES
    headers = {
        "Content-Disposition": content_disposition("inline" if inline else "attachment", filename),
        "X-Content-Type-Options": "nosniff",
    }
    if not inline:
        media_type = "application/octet-stream"
    if rt.outputs.enabled:
        space = caller(request).space or ""
        try:
            stored = await asyncio.to_thread(rt.outputs.emptied_bytes, kind, space, subfolder, filename, path)
        except StoreUnavailable as exc:
            return plain_error(503, str(exc))
        if stored is not None:
            return Response(stored, media_type=media_type, headers=headers)
    return FileResponse(path, media_type=media_type, headers=headers)
