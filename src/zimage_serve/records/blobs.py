"""Assets' bytes: one file per content and owner, named by its blake3 hash, in the owner's input folder
(`assets/<hex><ext>`), where LoadImage and the other loaders find it by that name, and where the owner's
storage limits count it.

Bytes are hashed as they are copied to a temporary file beside the target, which is then renamed into
place: a reader never sees half a file, and two uploads of the same bytes end with one file.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from pathlib import Path
from typing import BinaryIO

from blake3 import blake3

SUBFOLDER = "assets"
CHUNK = 1024 * 1024
HASH = re.compile(r"^blake3:[0-9a-f]{64}$")
EXTENSION = re.compile(r"^\.[A-Za-z0-9]{1,10}$")


def valid_hash(text: str) -> bool:
    return bool(HASH.match(text))


def extension(file_path: str | None) -> str:
    """The extension a blob's file keeps (loaders and viewers go by it), from the name its uploader gave."""
    suffix = os.path.splitext(os.path.basename(file_path or ""))[1].lower()
    return suffix if EXTENSION.match(suffix) else ""


def hash_file(path: str | Path) -> str:
    digest = blake3()
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
    return "blake3:" + digest.hexdigest()


def store(source: BinaryIO, input_folder: Path, suffix: str) -> tuple[str, str, int, bool]:
    """Copy `source` into `input_folder`'s blobs: (hash, file name in the folder, size, whether the file is
    new). The name is `assets/<hex><suffix>`."""
    folder = input_folder / SUBFOLDER
    folder.mkdir(parents=True, exist_ok=True)
    temp = folder / f".upload-{uuid.uuid4().hex}"
    digest, size = blake3(), 0
    try:
        with open(temp, "xb") as out:
            while chunk := source.read(CHUNK):
                digest.update(chunk)
                out.write(chunk)
                size += len(chunk)
        name = f"{digest.hexdigest()}{suffix}"
        target = folder / name
        new = not target.exists()
        if new:
            os.replace(temp, target)
        return "blake3:" + digest.hexdigest(), f"{SUBFOLDER}/{name}", size, new
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
