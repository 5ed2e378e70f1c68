"""POST /upload/image and /upload/mask: checked images into the input (or temp/output) folder.

Checks ComfyUI does not make: the bytes must decode as an image of an allowed format, within a pixel
budget (a small file can decompress to gigapixels), and names are plain file names inside the folder.
Without `overwrite`, an existing different file is never replaced: the new one gets `name (1).png`.

A user's uploads count against what they may store (security/storage.py); their output folder holds the
images their jobs make, bounded by their images a day, so users upload to input or temp only.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.datastructures import UploadFile

from zimage_serve import strict_json
from zimage_serve.image_safety import ImageRefused, facts, refusing
from zimage_serve.limits import flag
from zimage_serve.security.storage import StorageFull
from zimage_serve.server.gate import audit_note, caller, caller_token
from zimage_serve.server.routes_queue import runtime
from zimage_serve.server.schemas import MaskForm, UploadForm, form_request
from zimage_serve.workflow.folders import FILE_TYPES, UnknownFileError, contained

router = APIRouter()


class UploadError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Stored:
    name: str
    subfolder: str
    type: str

    def body(self) -> dict[str, str]:
        return {"name": self.name, "subfolder": self.subfolder, "type": self.type}


def check_image(data: bytes, field: str, max_pixels: int) -> Image.Image:
    """The uploaded bytes as a decoded image, if they are one of the accepted formats within the pixel
    budget over every frame (checked from the headers, before decoding)."""
    if not data:
        raise UploadError(400, f"{field}: the file is empty")
    try:
        with refusing(field), Image.open(io.BytesIO(data)) as probe:
            facts(probe, field, max_pixels)
            probe.verify()
        with refusing(field):
            image = Image.open(io.BytesIO(data))
            image.load()
        return image
    except ImageRefused as exc:
        named = f"{exc} ({flag('upload_pixels')})" if exc.status == 413 else str(exc)
        raise UploadError(exc.status, named) from exc


def target_folder(request: Request, kind: str, subfolder: str) -> Path:
    space = runtime(request).folders.space(caller(request).space)  # uploads go to the caller's own folders
    folder = space.of_type(kind)
    if folder is None:
        raise UploadError(400, f"type must be one of {', '.join(FILE_TYPES)}, not {kind!r}")
    try:
        return Path(contained(folder, subfolder, "subfolder", empty_ok=True))
    except UnknownFileError as exc:
        raise UploadError(400, str(exc)) from exc


def plain_name(filename: str | None) -> str:
    name = (filename or "").replace("\\", "/").split("/")[-1]
    if not name or name in (".", "..") or "\x00" in name or any(ord(c) < 32 for c in name):
        raise UploadError(400, "image: the file needs a plain name")
    return name


def store(data: bytes, folder: Path, name: str, overwrite: bool) -> str:
    """Write `data` as `name` (or `stem (i).ext`); the same bytes already there are reused as they are."""
    folder.mkdir(parents=True, exist_ok=True)
    stem, ext = os.path.splitext(name)
    digest = hashlib.sha256(data).digest()
    candidate, index = name, 1
    while True:
        path = folder / candidate
        if overwrite:
            temp = folder / f".{candidate}.{os.getpid()}.upload"
            temp.write_bytes(data)
            temp.replace(path)
            return candidate
        try:
            with open(path, "xb") as file:
                file.write(data)
            return candidate
        except FileExistsError:
            if path.is_file() and hashlib.sha256(path.read_bytes()).digest() == digest:
                return candidate
            candidate, index = f"{stem} ({index}){ext}", index + 1


async def read_form(request: Request) -> tuple[bytes, str, dict[str, str]]:
    try:
        form = await request.form()
    except Exception as exc:  # malformed multipart bodies raise several types
        raise UploadError(400, f"expected a multipart form with an 'image' file: {exc}") from exc
    upload = form.get("image")
    if not isinstance(upload, UploadFile):
        raise UploadError(400, "image: no file in the form's 'image' field")
    data = await upload.read()
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    return data, plain_name(upload.filename), fields


def _answer(call: Stored | UploadError) -> Response:
    if isinstance(call, UploadError):
        return JSONResponse({"error": str(call)}, status_code=call.status)
    return JSONResponse(call.body())


@router.post("/upload/image", openapi_extra=form_request(UploadForm))
async def upload_image(request: Request) -> Response:
    try:
        data, name, fields = await read_form(request)
        await asyncio.to_thread(check_image, data, "image", max_upload_pixels(request))
        return _answer(await _kept(request, data, name, fields))
    except UploadError as exc:
        return _answer(exc)


async def _kept(request: Request, data: bytes, name: str, fields: dict[str, str]) -> Stored:
    """`data` stored as the form asks (type, subfolder, overwrite), within the caller's storage."""
    subfolder = fields.get("subfolder", "")
    kind = fields.get("type") or "input"
    identity = caller(request)
    if kind == "output" and identity.space is not None:
        raise UploadError(403, "type: users upload to input or temp; output holds the images your jobs make")
    folder = target_folder(request, kind, subfolder)
    overwrite = fields.get("overwrite", "").lower() in ("true", "1")
    rt = runtime(request)
    limits = rt.storage_limits(identity, caller_token(request))
    # What it replaces: the file of that name when overwriting, or when it holds these very bytes (reused).
    replaced = folder / name if overwrite or await asyncio.to_thread(_holds, folder / name, data) else None
    try:
        async with rt.storage.room(identity, limits, len(data), replaced):
            stored = await asyncio.to_thread(store, data, folder, name, overwrite)
    except StorageFull as exc:
        raise UploadError(exc.status, str(exc)) from exc
    audit_note(request, files=["/".join(p for p in (kind, subfolder, stored) if p)])
    return Stored(stored, subfolder, kind)


def _holds(path: Path, data: bytes) -> bool:
    try:
        return path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data
    except OSError:
        return False


def _masked(data: bytes, original_path: str, max_pixels: int) -> bytes:
    """The original image with the uploaded mask's alpha, as PNG bytes."""
    mask = check_image(data, "image", max_pixels)
    with open(original_path, "rb") as file:
        original = check_image(file.read(), "original_ref", max_pixels).convert("RGBA")
    alpha = mask.convert("RGBA").getchannel("A").resize(original.size, Image.Resampling.LANCZOS)
    original.putalpha(alpha)
    buffer = io.BytesIO()
    original.save(buffer, format="PNG", compress_level=4)
    return buffer.getvalue()


def max_upload_pixels(request: Request) -> int:
    pixels: int = runtime(request).settings.run.limits.upload_pixels
    return pixels


@router.post("/upload/mask", openapi_extra=form_request(MaskForm))
async def upload_mask(request: Request) -> Response:
    try:
        data, name, fields = await read_form(request)
        try:
            reference = strict_json.loads(fields.get("original_ref", ""))
            if not isinstance(reference, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            raise UploadError(400, f"original_ref: expected JSON with a filename ({exc})") from exc
        original_folder = target_folder(
            request, str(reference.get("type") or "input"), str(reference.get("subfolder") or "")
        )
        try:
            original_path = contained(original_folder, plain_name(str(reference.get("filename", ""))), "original_ref")
        except UnknownFileError as exc:
            raise UploadError(exc.status, str(exc)) from exc
        if not os.path.isfile(original_path):
            raise UploadError(404, f"original_ref: {os.path.basename(original_path)} not found")
        masked = await asyncio.to_thread(_masked, data, original_path, max_upload_pixels(request))
        return _answer(await _kept(request, masked, name, fields))
    except UploadError as exc:
        return _answer(exc)
