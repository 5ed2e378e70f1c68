"""POST /upload/image and /upload/mask: checked images into the input (or temp/output) folder.

Checks ComfyUI does not make: the bytes must decode as an image of an allowed format, within a pixel
budget (a small file can decompress to gigapixels), and names are plain file names inside the folder.
Without `overwrite`, an existing different file is never replaced: the new one gets `name (1).png`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError
from starlette.datastructures import UploadFile

from zimage_serve.server.routes_queue import runtime

router = APIRouter()

ALLOWED_FORMATS = {"PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"}
MAX_PIXELS = 64 * 1024 * 1024
TYPES = ("input", "temp", "output")


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


def check_image(data: bytes, field: str) -> Image.Image:
    if not data:
        raise UploadError(400, f"{field}: the file is empty")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            if probe.format not in ALLOWED_FORMATS:
                raise UploadError(415, f"{field}: {probe.format} images are not accepted")
            width, height = probe.size
            if width * height > MAX_PIXELS:
                raise UploadError(413, f"{field}: {width}×{height} pixels is more than the {MAX_PIXELS} allowed")
            probe.verify()
        image = Image.open(io.BytesIO(data))
        image.load()
        return image
    except UploadError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UploadError(400, f"{field}: not a readable image ({exc})") from exc


def target_folder(request: Request, kind: str, subfolder: str) -> tuple[Path, Path]:
    rt = runtime(request)
    folders = {"input": rt.folders.input, "temp": rt.folders.temp, "output": rt.folders.output}
    if kind not in folders:
        raise UploadError(400, f"type must be one of {', '.join(TYPES)}, not {kind!r}")
    base = folders[kind].resolve()
    folder = (base / subfolder).resolve()
    if "\x00" in subfolder or os.path.isabs(subfolder) or not folder.is_relative_to(base):
        raise UploadError(400, "subfolder must stay inside the folder")
    return base, folder


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


@router.post("/upload/image")
async def upload_image(request: Request) -> Response:
    try:
        data, name, fields = await read_form(request)
        check_image(data, "image")
        subfolder = fields.get("subfolder", "")
        kind = fields.get("type") or "input"
        _, folder = target_folder(request, kind, subfolder)
        overwrite = fields.get("overwrite", "").lower() in ("true", "1")
        return _answer(Stored(store(data, folder, name, overwrite), subfolder, kind))
    except UploadError as exc:
        return _answer(exc)


@router.post("/upload/mask")
async def upload_mask(request: Request) -> Response:
    try:
        data, name, fields = await read_form(request)
        mask = check_image(data, "image")
        try:
            reference = json.loads(fields.get("original_ref", ""))
            if not isinstance(reference, dict):
                raise ValueError("not an object")
        except (ValueError, RecursionError) as exc:
            raise UploadError(400, f"original_ref: expected JSON with a filename ({exc})") from exc
        _, original_folder = target_folder(
            request, str(reference.get("type") or "input"), str(reference.get("subfolder") or "")
        )
        original_path = original_folder / plain_name(str(reference.get("filename", "")))
        if not original_path.is_file():
            raise UploadError(404, f"original_ref: {original_path.name} not found")
        original = check_image(original_path.read_bytes(), "original_ref").convert("RGBA")
        alpha = mask.convert("RGBA").getchannel("A").resize(original.size, Image.Resampling.LANCZOS)
        original.putalpha(alpha)
        buffer = io.BytesIO()
        original.save(buffer, format="PNG", compress_level=4)
        subfolder = fields.get("subfolder", "")
        kind = fields.get("type") or "input"
        _, folder = target_folder(request, kind, subfolder)
        overwrite = fields.get("overwrite", "").lower() in ("true", "1")
        return _answer(Stored(store(buffer.getvalue(), folder, name, overwrite), subfolder, kind))
    except UploadError as exc:
        return _answer(exc)
