"""Comfy API v2's asset routes, and the `core/ASSET` references a submitted workflow may hold.

An asset is a record (`records.contract.Asset`) over a file of its owner's: an upload's bytes are stored
once per content and owner (`records.blobs`), a job's outputs are its files in the output folder. Another
user's asset is a 404, and so is a blob another user uploaded: `HEAD by-hash` and `from-hash` answer only
for the caller's own bytes, so content addressing tells no one what someone else has.
"""

from __future__ import annotations

import asyncio
import contextlib
import mimetypes
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from starlette.datastructures import UploadFile

from zimage_serve.identity import Identity
from zimage_serve.limits import StorageLimits
from zimage_serve.records import blobs
from zimage_serve.records.contract import Asset, Place
from zimage_serve.security.storage import StorageFull
from zimage_serve.server.gate import audit_note, caller, caller_token
from zimage_serve.server.routes_files import INLINE_TYPES, content_disposition
from zimage_serve.server.routes_queue import runtime
from zimage_serve.server.runtime import Runtime
from zimage_serve.server.stored_outputs import StoreUnavailable
from zimage_serve.server.v2.envelope import V2Error
from zimage_serve.server.v2.job_view import URL_LIFETIME_S, content_url, iso, origin_of
from zimage_serve.server.v2.requests import FromHash, idempotency_key, parsed
from zimage_serve.workflow.folders import USERS

router = APIRouter(tags=["Comfy API v2"])
ASSET_UPLOADS = "/api/v2/assets"
ASSET = "core/ASSET"
MIN_EXPIRES_S, MAX_EXPIRES_S = 60, 604800
MAX_TAGS, MAX_TAG = 32, 64
MAX_FILE_PATH = 1024
WHOLE = re.compile(r"[0-9]{1,9}")  # ASCII digits only ("²".isdigit() is true), and few of them


def asset_json(asset: Asset, origin: str, created_new: bool | None = None) -> dict[str, Any]:
    found: dict[str, Any] = {
        "id": asset.id,
        "hash": asset.hash,
        "size_bytes": asset.size,
        "content_type": asset.content_type,
        "file_path": asset.file_path if asset.file_path is not None else asset.place.filename,
        "created_at": iso(asset.created),
        "url": content_url(origin, asset.id),
        "url_expires_at": iso(time.time() + URL_LIFETIME_S),
        "expires_at": iso(asset.expires),
        "job_id": asset.job_id,
        "tags": list(asset.tags),
    }
    if created_new is not None:
        found["created_new"] = created_new
    return found


def _missing(asset_id: str) -> V2Error:
    return V2Error(404, "not_found", f"No asset {asset_id[:100]!r}: it does not exist, or is not yours")


async def _own(rt: Runtime, asset_id: str, identity: Identity) -> Asset:
    """The caller's asset; an output whose job is gone (past its retention, deleted) is gone with it."""
    asset = await asyncio.to_thread(rt.records.asset, asset_id)
    if asset is None or not identity.may_see(asset.owner):
        raise _missing(asset_id)
    if asset.job_id is not None and await asyncio.to_thread(rt.store.get, asset.job_id) is None:
        await asyncio.to_thread(rt.records.delete_asset, asset_id)
        raise _missing(asset_id)
    return asset


def _space(identity: Identity) -> str:
    return identity.space or ""


def _expires(expires_in: int | None) -> float | None:
    return time.time() + expires_in if expires_in is not None else None


# -- upload ------------------------------------------------------------------------------------------
@router.post("/assets", status_code=201)
async def upload(request: Request) -> Response:
    """Multipart: `file`, `content_type`, `file_path`, optional `expected_hash` (blake3:<hex>), `tags`,
    `expires_in`. 201 when the bytes are new to the caller, 200 when they were stored already."""
    rt, identity = runtime(request), caller(request)
    key = idempotency_key(request.headers)
    try:
        form = await request.form(max_files=1, max_fields=64)
    except Exception as exc:  # malformed multipart bodies raise several types
        raise V2Error(422, "invalid_request", f"expected a multipart form with a 'file': {exc}") from exc
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise V2Error(422, "invalid_request", "file: no file in the form's 'file' field")
    content_type = _text(form.get("content_type"), "content_type", 255, required=True) or ""
    file_path = _text(form.get("file_path"), "file_path", MAX_FILE_PATH, required=True) or ""
    expected = _text(form.get("expected_hash"), "expected_hash", 80)
    if expected is not None and not blobs.valid_hash(expected):
        raise V2Error(422, "invalid_request", "expected_hash: write it blake3:<64 hex digits>")
    tags = _tags([t for t in form.getlist("tags") + form.getlist("tags[]") if isinstance(t, str)])
    expires_in = _expires_in(form.get("expires_in"))
    if key is not None and not await asyncio.to_thread(rt.records.claim_key, identity.user, f"assets/{key}"):
        raise V2Error(422, "idempotency_key_reuse", "This Idempotency-Key was used already: a key is good once")
    folder = rt.folders.space(identity.space).input
    async with rt.asset_files:
        asset, new = await _stored(
            request, rt, identity, upload, folder, key, expected, file_path, content_type, tags, expires_in
        )
    origin = origin_of(str(request.base_url))
    return JSONResponse(asset_json(asset, origin, created_new=new), status_code=201 if new else 200)


async def _stored(
    request: Request,
    rt: Runtime,
    identity: Identity,
    upload: UploadFile,
    folder: Path,
    key: str | None,
    expected: str | None,
    file_path: str,
    content_type: str,
    tags: list[str],
    expires_in: int | None,
) -> tuple[Asset, bool]:
    """The upload's bytes in the caller's blobs, and its record: the asset, and whether the bytes are new."""
    limits = rt.storage_limits(identity, caller_token(request))
    size = upload.size if upload.size is not None else 0
    try:
        async with rt.storage.room(identity, limits, size):
            digest, name, size, new = await asyncio.to_thread(
                blobs.store, upload.file, folder, blobs.extension(file_path)
            )
    except StorageFull as exc:
        if key is not None:
            await asyncio.to_thread(rt.records.release_key, identity.user, f"assets/{key}")
        raise V2Error(exc.status, "storage_full", str(exc)) from exc
    if expected is not None and expected != digest:
        if new:
            await asyncio.to_thread(_remove, folder / name)
        if key is not None:
            await asyncio.to_thread(rt.records.release_key, identity.user, f"assets/{key}")
        raise V2Error(409, "hash_mismatch", f"the bytes received hash to {digest}, not {expected}")
    subfolder, filename = name.split("/", 1)
    asset = Asset(
        id=str(uuid.uuid4()),
        owner=identity.user,
        place=Place("input", subfolder, filename, _space(identity)),
        size=size,
        content_type=content_type,
        created=time.time(),
        hash=digest,
        file_path=file_path,
        expires=_expires(expires_in),
        tags=tuple(tags),
    )
    asset = await asyncio.to_thread(rt.records.add_asset, asset)
    audit_note(request, asset_id=asset.id, files=[f"input/{name}"], hash=digest)
    return asset, new


def _text(value: Any, field: str, limit: int, required: bool = False) -> str | None:
    if value is None:
        if required:
            raise V2Error(422, "invalid_request", f"{field}: required", {"errors": [{"field": field}]})
        return None
    if not isinstance(value, str) or len(value) > limit or any(c in value for c in "\0\r\n"):
        raise V2Error(422, "invalid_request", f"{field}: text of at most {limit} characters, on one line")
    return value


def _tags(tags: list[str]) -> list[str]:
    if len(tags) > MAX_TAGS or any(not tag or len(tag) > MAX_TAG or not tag.isprintable() for tag in tags):
        raise V2Error(422, "invalid_request", f"tags: at most {MAX_TAGS}, each 1 to {MAX_TAG} printable characters")
    return tags


def _expires_in(value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, str | int) or not WHOLE.fullmatch(str(value)):
        raise V2Error(422, "invalid_request", "expires_in: a whole number of seconds")
    seconds = int(value)
    if not MIN_EXPIRES_S <= seconds <= MAX_EXPIRES_S:
        raise V2Error(422, "invalid_request", f"expires_in: from {MIN_EXPIRES_S} to {MAX_EXPIRES_S} seconds")
    return seconds


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


# -- dedup fast path ---------------------------------------------------------------------------------
async def _own_blob(rt: Runtime, identity: Identity, digest: str) -> Asset | None:
    """One of the caller's uploads over `digest`'s bytes, whose file is still there."""
    if not blobs.valid_hash(digest):
        return None
    found = await asyncio.to_thread(rt.records.with_hash, identity.user, digest)
    if found is None or not identity.may_see(found.owner):
        return None
    path = rt.v2_jobs.file_of(found.place)
    return found if path is not None and await asyncio.to_thread(os.path.isfile, path) else None


@router.head("/assets/by-hash/{digest}")
async def by_hash(request: Request, digest: str) -> Response:
    """200 if the caller uploaded these bytes (and may mint from them), 404 otherwise."""
    rt, identity = runtime(request), caller(request)
    found = await _own_blob(rt, identity, digest)
    return Response(status_code=200 if found is not None else 404)


@router.post("/assets/from-hash", status_code=201)
async def from_hash(request: Request) -> Response:
    """A new asset over bytes the caller uploaded before, found by their hash: no bytes sent again."""
    rt, identity = runtime(request), caller(request)
    body: FromHash = parsed(await request.body(), FromHash, strict=False)
    found = await _own_blob(rt, identity, body.hash)
    if found is None:
        raise V2Error(404, "blob_not_found", "No bytes of yours have this hash: upload them")
    tags = _tags(body.tags or [])
    if body.file_path is not None and len(body.file_path) > MAX_FILE_PATH:
        raise V2Error(422, "invalid_request", f"file_path: at most {MAX_FILE_PATH} characters")
    if (body.file_path in (None, found.file_path)) and tuple(tags) == found.tags and body.expires_in is None:
        return JSONResponse(asset_json(found, origin_of(str(request.base_url)), created_new=False), status_code=200)
    asset = Asset(
        id=str(uuid.uuid4()),
        owner=identity.user,
        place=found.place,
        size=found.size,
        content_type=found.content_type,
        created=time.time(),
        hash=found.hash,
        file_path=body.file_path if body.file_path is not None else found.file_path,
        expires=_expires(body.expires_in),
        tags=tuple(tags),
    )
    asset = await asyncio.to_thread(rt.records.add_asset, asset)
    audit_note(request, asset_id=asset.id, hash=found.hash)
    return JSONResponse(asset_json(asset, origin_of(str(request.base_url)), created_new=False), status_code=201)


# -- read, delete ------------------------------------------------------------------------------------
@router.get("/assets/{asset_id}")
async def get_asset(request: Request, asset_id: str) -> Response:
    rt = runtime(request)
    asset = await _own(rt, asset_id, caller(request))
    return JSONResponse(asset_json(await asyncio.to_thread(_hashed, rt, asset), origin_of(str(request.base_url))))


def _hashed(rt: Runtime, asset: Asset) -> Asset:
    """An output asset with its hash, computed (and recorded) the first time it is asked for."""
    if asset.hash is not None:
        return asset
    path = rt.v2_jobs.file_of(asset.place)
    if path is None or not os.path.isfile(path):
        return asset
    if rt.outputs.enabled and os.path.getsize(path) == 0:  # emptied once stored: its bytes are the object's
        return asset
    digest = blobs.hash_file(path)
    rt.records.set_hash(asset.id, digest)
    rt.v2_jobs.hashed(asset.id, digest)
    return Asset(**{**asset.__dict__, "hash": digest})


@router.get("/assets/{asset_id}/content")
async def asset_content(request: Request, asset_id: str) -> Response:
    """The bytes (with Range); raster images inline, anything else as an attachment."""
    rt = runtime(request)
    asset = await _own(rt, asset_id, caller(request))
    path = rt.v2_jobs.file_of(asset.place)
    if path is None or not await asyncio.to_thread(os.path.isfile, path):
        raise V2Error(404, "output_unavailable" if asset.job_id else "not_found", "The asset's bytes are gone")
    place = asset.place
    audit_note(
        request, asset_id=asset.id, files=["/".join(p for p in (place.kind, place.subfolder, place.filename) if p)]
    )
    media_type = asset.content_type or mimetypes.guess_type(place.filename)[0] or "application/octet-stream"
    inline = media_type in INLINE_TYPES
    name = os.path.basename(asset.file_path or place.filename) or place.filename
    headers = {
        "Content-Disposition": content_disposition("inline" if inline else "attachment", name),
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "private, max-age=3600",
    }
    media_type = media_type if inline else "application/octet-stream"
    if rt.outputs.enabled:
        try:
            stored = await asyncio.to_thread(
                rt.outputs.emptied_bytes, place.kind, place.space, place.subfolder, place.filename, path
            )
        except StoreUnavailable as exc:
            raise V2Error(503, "store_unavailable", str(exc)) from exc
        if stored is not None:
            return Response(stored, media_type=media_type, headers=headers)
    return FileResponse(path, media_type=media_type, headers=headers)


@router.delete("/assets/{asset_id}", status_code=204)
async def delete_asset(request: Request, asset_id: str) -> Response:
    """Forget the asset; its bytes go once no other asset of the owner's holds them. A job's output stays
    while its job does (409 `asset_in_use`)."""
    rt, identity = runtime(request), caller(request)
    asset = await _own(rt, asset_id, identity)
    if asset.job_id is not None and await asyncio.to_thread(rt.store.get, asset.job_id) is not None:
        raise V2Error(409, "asset_in_use", "This asset is held, and cannot be deleted now")
    async with rt.asset_files:
        deleted = await asyncio.to_thread(rt.records.delete_asset, asset_id)
        if deleted is None:
            raise _missing(asset_id)
        _, last = deleted
        if last and asset.job_id is None:
            path = rt.v2_jobs.file_of(asset.place)
            if path is not None:
                await asyncio.to_thread(_remove, Path(path))
    audit_note(request, asset_id=asset_id)
    return Response(status_code=204)


# -- references in a workflow ------------------------------------------------------------------------
async def resolve_assets(
    rt: Runtime, identity: Identity, limits: StorageLimits | None, workflow: dict[str, Any]
) -> dict[str, Any]:
    """The workflow with each `core/ASSET` input replaced by the name a loader reads (a file in the
    caller's input folder); 422 `missing_asset` for a reference that is malformed, unknown or not theirs."""
    found = [
        (node_id, name, value)
        for node_id, node in workflow.items()
        if isinstance(node, dict) and isinstance(node.get("inputs"), dict)
        for name, value in node["inputs"].items()
        if isinstance(value, dict) and value.get("__type") == ASSET
    ]
    if not found:
        return workflow
    resolved = {node_id: dict(node) if isinstance(node, dict) else node for node_id, node in workflow.items()}
    for node_id, name, value in found:
        info = value.get("info")
        asset_id = info.get("id") if isinstance(info, dict) else None
        where = {"node_id": str(node_id), "input": name}
        asset = await asyncio.to_thread(rt.records.asset, asset_id) if isinstance(asset_id, str) else None
        if asset is None or (asset.owner != identity.user and not identity.admin):
            raise V2Error(422, "missing_asset", f"node {node_id}, input {name}: no such asset of yours", where)
        loader_name = await _input_name(rt, identity, limits, asset)
        if loader_name is None:
            raise V2Error(422, "missing_asset", f"node {node_id}, input {name}: the asset's bytes are gone", where)
        inputs = dict(resolved[node_id]["inputs"])
        inputs[name] = loader_name
        resolved[node_id]["inputs"] = inputs
    return resolved


async def _input_name(rt: Runtime, identity: Identity, limits: StorageLimits | None, asset: Asset) -> str | None:
    """The name the caller's loaders read `asset` by: its file in their input folder (a job's output is
    copied there first, once per content, within the caller's storage)."""
    place = asset.place
    path = rt.v2_jobs.file_of(place)
    size = await asyncio.to_thread(_size_of, path)
    if path is None or size is None:
        return None
    if place.kind != "input" or (identity.space is not None and place.space != identity.space):
        folder = rt.folders.space(identity.space).input
        async with rt.asset_files, rt.storage.room(identity, limits, size):
            return await asyncio.to_thread(_copied, path, folder, blobs.extension(place.filename))
    name = f"{place.subfolder}/{place.filename}" if place.subfolder else place.filename
    if place.space and identity.space is None:  # an admin's loaders read from the shared folders
        name = f"{USERS}/{place.space}/{name}"
    return name


def _size_of(path: str | None) -> int | None:
    try:
        return os.path.getsize(path) if path is not None and os.path.isfile(path) else None
    except OSError:
        return None


def _copied(path: str, folder: Path, suffix: str) -> str:
    with open(path, "rb") as source:
        return blobs.store(source, folder, suffix)[1]
