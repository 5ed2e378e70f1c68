"""The frontend's per-user storage, as ComfyUI serves it: /users, /settings, /userdata and /v2/userdata.

Each caller has a folder of their own, `<data-dir>/userdata/<user>` (`default` for the local operator
when authentication is off): saved workflows, subgraphs, `comfy.settings.json`, `user.css`. Paths are
confined to it by the same rule as every other client-named path (`folders.contained`).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, JSONResponse

from zimage_serve import strict_json
from zimage_serve.security.storage import StorageFull, kept
from zimage_serve.server.gate import audit_note, caller, caller_token
from zimage_serve.server.routes_queue import plain_error, runtime
from zimage_serve.workflow.folders import UnknownFileError, contained

router = APIRouter()
SETTINGS_FILE = "comfy.settings.json"
# Each user's share of the server's disk (one file is bounded by the request body limit, 8 MB): a user's
# folder is read whole to list it, and the settings object is read on every page load.
USERDATA_FILES = 2000
USERDATA_BYTES = 256 * 1024 * 1024
SETTINGS_BYTES = 1024 * 1024
FOLDERS = ("workflows", "subgraphs")  # the frontend lists these at start: there from the first visit


def user_root(request: Request) -> Path:
    """The caller's own folder of saved workflows and settings (made on first use)."""
    identity = caller(request)
    root = runtime(request).userdata_folder(identity.user)
    if not root.is_dir():
        for folder in FOLDERS:
            (root / folder).mkdir(parents=True, exist_ok=True)
    return root


def _resolve(root: Path, name: str, resource: str = "file", empty_ok: bool = False) -> str:
    """A client-named path inside the caller's folder `root`; raises UnknownFileError."""
    return contained(root, name.strip("/") if empty_ok else name, resource, empty_ok=empty_ok)


def _refusal(exc: UnknownFileError) -> JSONResponse:
    return plain_error(exc.status, str(exc))


def _relative(root: Path, path: str) -> str:
    return os.path.relpath(path, root).replace(os.sep, "/")


def _info(root: Path, path: str) -> dict[str, Any]:
    stat = os.stat(path)
    return {
        "path": _relative(root, path),
        "size": stat.st_size,
        "modified": stat.st_mtime * 1000,
        "created": stat.st_ctime * 1000,
    }


# -- users and settings ------------------------------------------------------------------------------
@router.get("/users")
async def get_users(request: Request) -> dict[str, Any]:
    """ComfyUI's single-user answer: no `users` key, so the frontend never shows its user picker (the
    user is the one the token or session names)."""
    return {"storage": "server", "migrated": True}


@router.post("/users")
async def post_users(request: Request) -> Response:
    return plain_error(400, "users are made with `zimage tokens create`, not here")


def _read_settings(root: Path) -> dict[str, Any]:
    path = root / SETTINGS_FILE
    try:
        value = strict_json.loads(path.read_bytes())
    except (OSError, strict_json.JsonRejected):
        return {}
    return value if isinstance(value, dict) else {}


def _write_settings(root: Path, settings: dict[str, Any]) -> None:
    path = root / SETTINGS_FILE
    temp = root / f".{SETTINGS_FILE}.{os.getpid()}.tmp"
    temp.write_text(json.dumps(settings, indent=1, ensure_ascii=False), "utf-8")
    temp.replace(path)  # whole or not at all: a crash never leaves half a settings file


_settings_lock = asyncio.Lock()


async def _change_settings(root: Path, change: dict[str, Any]) -> Response:
    """Apply `change` to a user's settings, read and written off the event loop, within SETTINGS_BYTES."""
    async with _settings_lock:
        settings = await asyncio.to_thread(_read_settings, root)
        settings.update(change)
        size = len(json.dumps(settings, ensure_ascii=False).encode())
        if size > SETTINGS_BYTES:
            message = f"the settings would take {size} bytes, past the {SETTINGS_BYTES} each user may keep"
            return plain_error(413, message)
        await asyncio.to_thread(_write_settings, root, settings)
    return Response(status_code=200)


@router.get("/settings")
async def get_settings(request: Request) -> JSONResponse:
    return JSONResponse(await asyncio.to_thread(_read_settings, user_root(request)))


@router.get("/settings/{setting_id}")
async def get_setting(request: Request, setting_id: str) -> JSONResponse:
    return JSONResponse((await asyncio.to_thread(_read_settings, user_root(request))).get(setting_id))


@router.post("/settings")
async def post_settings(request: Request) -> Response:
    try:
        body = strict_json.loads(await request.body())
    except strict_json.JsonRejected as exc:
        return plain_error(400, f"the settings must be a JSON object ({exc})")
    if not isinstance(body, dict):
        return plain_error(400, "the settings must be a JSON object")
    root = user_root(request)
    return await _change_settings(root, body)


@router.post("/settings/{setting_id}")
async def post_setting(request: Request, setting_id: str) -> Response:
    try:
        value = strict_json.loads(await request.body())
    except strict_json.JsonRejected as exc:
        return plain_error(400, f"the value must be JSON ({exc})")
    root = user_root(request)
    return await _change_settings(root, {setting_id: value})


# -- files ---------------------------------------------------------------------------------------------
@router.get("/userdata")
async def list_userdata(request: Request) -> Response:
    query = request.query_params
    directory = query.get("dir")
    if not directory:
        return plain_error(400, "dir is required")
    try:
        folder = _resolve(user_root(request), directory, "dir")
    except UnknownFileError as exc:
        return _refusal(exc)
    if not os.path.isdir(folder):
        return plain_error(404, "no such folder")  # the frontend reads 404 as empty
    recurse = query.get("recurse", "").lower() == "true"
    full_info = query.get("full_info", "").lower() == "true"
    split = query.get("split", "").lower() == "true"
    return JSONResponse(await asyncio.to_thread(_listing, Path(folder), recurse, full_info, split))


def _listing(root: Path, recurse: bool, full_info: bool, split: bool) -> list[Any]:
    """A folder's files as GET /userdata lists them (read off the event loop: a folder may hold thousands)."""
    found: list[Any] = []
    for path in sorted(root.rglob("*") if recurse else root.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        relative = path.relative_to(root).as_posix()
        if full_info:
            found.append({**_info(root, str(path)), "path": relative})
        elif split:
            found.append([relative, *relative.split("/")])
        else:
            found.append(relative)
    return found


@router.get("/v2/userdata")
async def list_userdata_v2(request: Request) -> Response:
    root = user_root(request)
    try:
        folder = _resolve(root, request.query_params.get("path", ""), "path", empty_ok=True)
    except UnknownFileError as exc:
        return _refusal(exc)
    if not os.path.isdir(folder):
        return JSONResponse([])
    return JSONResponse(await asyncio.to_thread(_entries, root, folder))


def _entries(root: Path, folder: str) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    for entry in sorted(os.scandir(folder), key=lambda e: (not e.is_dir(), e.name)):
        if entry.name.startswith("."):
            continue
        relative = _relative(root, entry.path)
        if entry.is_dir():
            entries.append({"name": entry.name, "path": relative, "type": "directory"})
        elif entry.is_file():
            stat = entry.stat()
            entries.append(
                {"name": entry.name, "path": relative, "type": "file", "size": stat.st_size, "modified": stat.st_mtime}
            )
    return entries


def _segments(request: Request) -> list[str]:
    """The path after /userdata/, split where the client put slashes: a file's own slashes come encoded
    (`workflows%2Fa.json`), and uvicorn decodes the path Starlette routes on, so the raw one is read."""
    raw: bytes = request.scope.get("raw_path") or request.scope["path"].encode()
    text = raw.decode("latin-1").split("?", 1)[0]
    tail = text.split("/userdata/", 1)[1] if "/userdata/" in text else ""
    return [unquote(part) for part in tail.split("/")]


def _file(request: Request, root: Path) -> str | JSONResponse:
    """The one file a /userdata/{file} request names, inside `root`, or the refusal to answer with."""
    parts = _segments(request)
    try:
        return _resolve(root, parts[0] if len(parts) == 1 else "")
    except UnknownFileError as exc:
        return _refusal(exc)


def _saved(request: Request, root: Path, path: str) -> JSONResponse:
    """What a write or move answers: the file's path, or with `full_info` its size and times too."""
    if request.query_params.get("full_info", "").lower() == "true":
        return JSONResponse(_info(root, path))
    return JSONResponse(_relative(root, path))


RASTER_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"})


@router.get("/userdata/{file:path}")
async def get_userdata(request: Request, file: str) -> Response:
    path = _file(request, user_root(request))
    if isinstance(path, Response):
        return path
    if not os.path.isfile(path):
        if _segments(request) == ["user.css"]:  # index.html links it for all: none written is an empty one
            return Response(b"", media_type="text/css", headers={"Cache-Control": "no-cache"})
        return plain_error(404, "file not found")
    # Served from the server's own origin: a user's .html or .svg shown inline would run as this site's page
    # for whoever opens the link. Only raster images are shown; everything else is a download.
    inline = Path(path).suffix.lower() in RASTER_SUFFIXES
    return FileResponse(
        path,
        filename=Path(path).name,
        content_disposition_type="inline" if inline else "attachment",
        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
    )


@router.post("/userdata/{file:path}")
async def post_userdata(request: Request, file: str) -> Response:
    parts = _segments(request)
    if len(parts) == 3 and parts[1] == "move":
        return await _move(request, parts[0], parts[2])
    root = user_root(request)
    path = _file(request, root)
    if isinstance(path, Response):
        return path
    overwrite = request.query_params.get("overwrite", "true").lower() != "false"
    body = await request.body()  # within the body limit of every request (8 MB; 413 beyond it)
    if os.path.exists(path) and not overwrite:
        return plain_error(409, "file exists; send overwrite=true to replace it")
    if os.path.isdir(path):
        return plain_error(409, "a folder has that name")
    here = await asyncio.to_thread(kept, [root])
    replaced = os.path.getsize(path) if os.path.isfile(path) else None
    if replaced is None and here.files + 1 > USERDATA_FILES:
        return plain_error(413, f"each user may keep {USERDATA_FILES} files here; delete some first")
    if here.bytes - (replaced or 0) + len(body) > USERDATA_BYTES:
        return plain_error(
            413,
            f"each user may keep {USERDATA_BYTES // (1024 * 1024)} MiB here ({here.bytes} bytes used); "
            "delete some first",
        )
    rt, identity = runtime(request), caller(request)
    try:
        async with rt.storage.room(identity, rt.storage_limits(identity, caller_token(request)), len(body), Path(path)):
            await asyncio.to_thread(_write_file, path, body)
    except StorageFull as exc:
        return plain_error(413, str(exc))
    audit_note(request, files=["userdata/" + _relative(root, path)])
    return _saved(request, root, path)


def _write_file(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temp = f"{path}.{os.getpid()}.part"
    with open(temp, "wb") as out:
        out.write(data)
    os.replace(temp, path)


@router.delete("/userdata/{file:path}")
async def delete_userdata(request: Request, file: str) -> Response:
    path = _file(request, user_root(request))
    if isinstance(path, Response):
        return path
    if not os.path.isfile(path):
        return plain_error(404, "file not found")
    os.remove(path)
    return Response(status_code=204)


async def _move(request: Request, file: str, dest: str) -> Response:
    """POST /userdata/{file}/move/{dest}."""
    root = user_root(request)
    try:
        source = _resolve(root, file)
        target = _resolve(root, dest)
    except UnknownFileError as exc:
        return _refusal(exc)
    if not os.path.isfile(source):
        return plain_error(404, "file not found")
    query = request.query_params
    if os.path.exists(target) and query.get("overwrite", "true").lower() == "false":
        return plain_error(409, "the destination exists; send overwrite=true to replace it")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.move(source, target)
    return _saved(request, root, target)
