"""Where workflows find their files: a ComfyUI-style models root, and input / output / temp folders.

Combo inputs that name files (`unet_name`, `lora_name`, `image`, ...) list what is on disk when asked,
as ComfyUI does. The built-in zimage-nano model is listed in every model list, so a default workflow
runs with nothing downloaded. Names are relative POSIX paths; `resolve` refuses anything that would
leave its folder.

Every prompt is validated against these lists, so a list is kept until one of the directories it was
read from changes (a new or removed entry changes its directory's mtime): checking costs one stat per
directory instead of a walk over every file.
"""

from __future__ import annotations

import functools
import os
import stat
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from zimage_serve.engine.names import ROOT_FOLDERS
from zimage_serve.errors import ZImageError

# ComfyUI's folder names, with the older ones it still reads; the engine's layout finder knows the same.
MODEL_FOLDERS: dict[str, tuple[str, ...]] = {
    "checkpoints": ("checkpoints",),
    "diffusion_models": ROOT_FOLDERS["transformer"],
    "text_encoders": ROOT_FOLDERS["text_encoder"],
    "vae": ROOT_FOLDERS["vae"],
    "loras": ROOT_FOLDERS["lora"],
    "model_patches": ROOT_FOLDERS["model_patch"],
    "upscale_models": ("upscale_models",),
}
MODEL_EXTENSIONS = (".safetensors", ".sft")
# Upscale models are published as pickles too; they are read as plain tensors (engine/upscale.py).
EXTENSIONS_OF = {"upscale_models": (*MODEL_EXTENSIONS, ".pth", ".pt", ".bin", ".ckpt")}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Folder models (diffusers layout) can stand in for any of these.
FOLDER_MODEL_KINDS = ("checkpoints", "diffusion_models", "text_encoders", "vae")
# Single components in diffusers' layout (config.json + weights), such as a ZImageControlNetModel folder.
COMPONENT_FOLDER_KINDS = ("model_patches",)
_SETTLE_NS = 2_000_000_000
USERS = "users"  # below input, output and temp: one folder per user, their own files


def builtin_models() -> dict[str, Path]:
    """The models that ship with the package, by the name loaders list them under."""
    from zimage_serve.nano.default import SHIPPED

    return {"zimage-nano": SHIPPED} if (SHIPPED / "model_index.json").is_file() else {}


class UnknownFileError(ZImageError):
    def __init__(self, resource: str, name: str, why: str) -> None:
        super().__init__(f"{resource}: {name!r} {why}")
        self.resource, self.name, self.why = resource, name, why

    @property
    def status(self) -> int:
        """The HTTP status a refusal gets: 403 for an attempt to leave a folder, 400 for a bad name."""
        return 403 if self.why in ESCAPES else 400


@dataclass
class Folders:
    """The file lists a workflow can name. `models` may be empty: only built-in models are listed then."""

    models: list[Path] = field(default_factory=list)
    input: Path = Path("input")
    output: Path = Path("output")
    temp: Path = Path("temp")
    builtin: dict[str, Path] = field(default_factory=dict)  # name → diffusers folder (zimage-nano)

    @classmethod
    def default(cls, data_dir: Path, models: Iterable[Path] = ()) -> Folders:
        return cls(list(models), data_dir / "input", data_dir / "output", data_dir / "temp", builtin_models())

    def of_type(self, kind: str) -> Path | None:
        """The folder a file's `type` names (ComfyUI's output, input or temp); None for any other."""
        return getattr(self, kind) if kind in FILE_TYPES else None

    _listings: dict[str, tuple[dict[Path, int], list[str]]] = field(default_factory=dict, repr=False, compare=False)
    _listing_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _spaces: dict[str, Folders] = field(default_factory=dict, repr=False, compare=False)

    # -- users' spaces ----------------------------------------------------------------------------
    def space(self, user: str | None) -> Folders:
        """The folders of one user (None: these, the shared ones): their own input, output and temp below
        `<folder>/users/<user>`, the models shared. Every path a client names is resolved inside the
        caller's space (`contained`), so a user reaches only their own files; an admin's space is the
        shared folders, which hold every user's."""
        if user is None:
            return self
        with self._listing_lock:
            found = self._spaces.get(user)
            if found is None:
                if not user or user.startswith(".") or not _PLAIN.isdisjoint(user) or not user.isprintable():
                    raise UnknownFileError("user", user, "is not a plain name")
                found = Folders(
                    self.models,
                    self.input / USERS / user,
                    self.output / USERS / user,
                    self.temp / USERS / user,
                    self.builtin,
                )
                found._listings = self._listings  # model lists are the same for everyone: read them once
                self._spaces[user] = found
        return found

    # -- lists -----------------------------------------------------------------------------------
    def names(self, resource: str) -> list[str]:
        if resource != "input_images" and resource not in MODEL_FOLDERS:
            raise ValueError(f"unknown resource {resource}")
        roots = [self.input] if resource == "input_images" else self._roots(resource)
        key = f"{resource}:{self.input}" if resource == "input_images" else resource  # spaces share the rest
        with self._listing_lock:
            cached = self._listings.get(key)
        if cached is not None and _unchanged(cached[0], roots):
            return list(cached[1])
        directories: dict[Path, int] = {}
        found = self._input_images(directories) if resource == "input_images" else self._models(resource, directories)
        # Timestamps tick coarsely: a directory changed within the last moments may change again without
        # its mtime moving, so such a listing is not kept (git's "racily clean" rule).
        settled = time.time_ns() - _SETTLE_NS
        with self._listing_lock:
            if all(m < settled for m in directories.values()):
                self._listings[key] = (directories, found)
            else:
                self._listings.pop(key, None)
        return list(found)

    def _input_images(self, directories: dict[Path, int]) -> list[str]:
        if not _record(self.input, directories):
            return []
        return sorted(p.name for p in self.input.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)

    def _models(self, resource: str, directories: dict[Path, int]) -> list[str]:
        found: list[str] = list(self.builtin) if resource in FOLDER_MODEL_KINDS else []
        for root in self._roots(resource):
            if not _record(root, directories):
                continue
            for path in sorted(root.rglob("*")):
                relative = path.relative_to(root).as_posix()
                if path.is_dir():
                    _record(path, directories)
                    if (resource in FOLDER_MODEL_KINDS and (path / "model_index.json").is_file()) or (
                        resource in COMPONENT_FOLDER_KINDS and (path / "config.json").is_file()
                    ):
                        found.append(relative)
                elif path.is_file() and path.suffix.lower() in EXTENSIONS_OF.get(resource, MODEL_EXTENSIONS):
                    found.append(relative)
        return list(dict.fromkeys(found))

    def _roots(self, resource: str) -> list[Path]:
        return [root / sub for root in self.models for sub in MODEL_FOLDERS[resource]]

    def _bases(self, resource: str) -> list[Path]:
        return [base for base in self._roots(resource) if base.is_dir()]

    # -- resolving -------------------------------------------------------------------------------
    def resolve(self, resource: str, name: str) -> Path:
        """The file or folder a listed name stands for."""
        if resource in FOLDER_MODEL_KINDS and name in self.builtin:
            return self.builtin[name]
        if resource == "input_images":  # clients fill this folder: no link may lead out of it
            path = contained(self.input, name, resource)
            if os.path.isfile(path):
                return Path(path)
            raise UnknownFileError(resource, name, "not found")
        relative = safe_relative(resource, name)
        for base in self._bases(resource):
            candidate = base / relative
            if candidate.exists():
                return candidate
        raise UnknownFileError(resource, name, "not found")

    def input_path(self, name: str) -> Path:
        return self.resolve("input_images", name)

    def input_file(self, name: str) -> str:
        """Where input image `name` is, or would be, as a string; unlike `input_path` it does not look.

        LoadImage checks and fingerprints every prompt's image with one stat of its own: a second one
        here, and pathlib's parsing, cost more than the rest of the check."""
        return contained(self.input, name, "input_images")


OUTSIDE = "must be a path inside its folder"
LINKED_OUT = "leads outside its folder through a symbolic link"
ESCAPES = (OUTSIDE, LINKED_OUT)  # the reasons that are attempts to leave a folder (403, not 400)
MAX_NAME_BYTES = 255  # one path component, as Linux, macOS and Windows allow
MAX_PATH_BYTES = 1024
_PLAIN = frozenset("/\\:")  # not in a plain file name: separators, and a drive's colon
FILE_TYPES = ("output", "input", "temp")  # the folders a file's `type` names, as ComfyUI lists them


def check_relative(resource: str, name: str, *, empty_ok: bool = False) -> None:
    """Refuse a name with '..', a drive, an absolute start, a NUL or another control character (CR/LF would
    break the headers the file is served with), or a part longer than file systems allow; the error names
    the input."""
    if not name:
        if empty_ok:
            return
        raise UnknownFileError(resource, name, "is not a file name")
    plain = len(name) <= MAX_NAME_BYTES and name.isascii() and name.isprintable() and _PLAIN.isdisjoint(name)
    if plain and name not in (".", ".."):
        return  # a plain file name, as nearly every one is: no separator, no drive, nothing to escape
    if not name.isprintable() and any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise UnknownFileError(resource, name, "holds a control character")
    if name.startswith(("/", "\\")) or ".." in name.replace("\\", "/").split("/") or (os.sep != "/" and ":" in name):
        raise UnknownFileError(resource, name, OUTSIDE)
    encoded = name.encode("utf-8", "surrogatepass")
    if len(encoded) > MAX_PATH_BYTES or any(len(part) > MAX_NAME_BYTES for part in encoded.split(b"/")):
        raise UnknownFileError(resource, name[:60], "is too long for a file name")


def safe_relative(resource: str, name: str) -> Path:
    """A relative path with no '..', no drive and no absolute start, or an error naming the input."""
    check_relative(resource, name)
    return Path(name)


@functools.lru_cache(maxsize=64)
def real_folder(folder: Path) -> str:
    """A served folder's real path (the server's own folders: looked up once, not per request)."""
    return os.path.realpath(folder)


def contained(folder: Path, name: str, resource: str, *, empty_ok: bool = False) -> str:
    """The one rule for a client-named path below one of the server's folders: `name` checked as above,
    joined to the folder, and refused when a symbolic link on the way leads out of it. The path is
    returned as a string (LoadImage calls this for every prompt; pathlib costs more than the check)."""
    check_relative(resource, name, empty_ok=empty_ok)
    root = real_folder(folder)
    if not name:
        return root
    path = os.path.join(root, name)
    # The root is real already: only the parts below it can be links. One lstat each (resolving the
    # whole path would look at every part from the file system's root); the full resolution only for a
    # path that does pass through a link.
    current = root
    for part in name.split("/"):
        if part in ("", "."):
            continue
        current = os.path.join(current, part)
        try:
            linked = stat.S_ISLNK(os.lstat(current).st_mode)
        except OSError:  # not there (yet): no link further down either
            break
        if linked:
            real = os.path.realpath(path)
            if real != root and not real.startswith(root + os.sep):
                raise UnknownFileError(resource, name, LINKED_OUT)
            break
    return path


def _mtime(directory: Path) -> int | None:
    try:
        return directory.stat().st_mtime_ns
    except OSError:
        return None


def _record(directory: Path, directories: dict[Path, int]) -> bool:
    """Note a directory's mtime (-1 if it does not exist); True if it is a directory to read."""
    mtime = _mtime(directory) if directory.is_dir() else None
    directories[directory] = -1 if mtime is None else mtime
    return mtime is not None


def _unchanged(directories: dict[Path, int], roots: list[Path]) -> bool:
    return all(root in directories for root in roots) and all(
        (_mtime(d) if d.is_dir() else None) == (None if m == -1 else m) for d, m in directories.items()
    )
