"""Where workflows find their files: a ComfyUI-style models root, and input / output / temp folders.

Combo inputs that name files (`unet_name`, `lora_name`, `image`, ...) list what is on disk when asked,
as ComfyUI does. The built-in zimage-nano model is listed in every model list, so a default workflow
runs with nothing downloaded. Names are relative POSIX paths; `resolve` refuses anything that would
leave its folder.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from zimage_serve.engine.layouts import ROOT_FOLDERS
from zimage_serve.errors import ZImageError

# ComfyUI's folder names, with the older ones it still reads; the engine's layout finder knows the same.
MODEL_FOLDERS: dict[str, tuple[str, ...]] = {
    "checkpoints": ("checkpoints",),
    "diffusion_models": ROOT_FOLDERS["transformer"],
    "text_encoders": ROOT_FOLDERS["text_encoder"],
    "vae": ROOT_FOLDERS["vae"],
    "loras": ROOT_FOLDERS["lora"],
}
MODEL_EXTENSIONS = (".safetensors", ".sft")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Folder models (diffusers layout) can stand in for any of these.
FOLDER_MODEL_KINDS = ("checkpoints", "diffusion_models", "text_encoders", "vae")


def builtin_models() -> dict[str, Path]:
    """The models that ship with the package, by the name loaders list them under."""
    from zimage_serve.nano.default import SHIPPED

    return {"zimage-nano": SHIPPED} if (SHIPPED / "model_index.json").is_file() else {}


class UnknownFileError(ZImageError):
    def __init__(self, resource: str, name: str, why: str) -> None:
        super().__init__(f"{resource}: {name!r} {why}")
        self.resource, self.name = resource, name


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

    # -- lists -----------------------------------------------------------------------------------
    def names(self, resource: str) -> list[str]:
        if resource == "input_images":
            return self._input_images()
        if resource not in MODEL_FOLDERS:
            raise ValueError(f"unknown resource {resource}")
        found: list[str] = []
        if resource in FOLDER_MODEL_KINDS:
            found += list(self.builtin)
        for base in self._bases(resource):
            for path in sorted(base.rglob("*")):
                relative = path.relative_to(base).as_posix()
                if (path.is_file() and path.suffix.lower() in MODEL_EXTENSIONS) or (
                    resource in FOLDER_MODEL_KINDS and path.is_dir() and (path / "model_index.json").is_file()
                ):
                    found.append(relative)
        return list(dict.fromkeys(found))

    def _input_images(self) -> list[str]:
        if not self.input.is_dir():
            return []
        return sorted(p.name for p in self.input.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)

    def _bases(self, resource: str) -> list[Path]:
        return [root / sub for root in self.models for sub in MODEL_FOLDERS[resource] if (root / sub).is_dir()]

    # -- resolving -------------------------------------------------------------------------------
    def resolve(self, resource: str, name: str) -> Path:
        """The file or folder a listed name stands for."""
        if resource in FOLDER_MODEL_KINDS and name in self.builtin:
            return self.builtin[name]
        relative = safe_relative(resource, name)
        bases = [self.input] if resource == "input_images" else self._bases(resource)
        for base in bases:
            candidate = base / relative
            if candidate.exists():
                return candidate
        raise UnknownFileError(resource, name, "not found")

    def input_path(self, name: str) -> Path:
        return self.resolve("input_images", name)


def safe_relative(resource: str, name: str) -> Path:
    """A relative path with no '..', no drive and no absolute start, or an error naming the input."""
    if not name or "\x00" in name:
        raise UnknownFileError(resource, name, "is not a file name")
    pure = Path(name)
    if pure.is_absolute() or name.startswith(("/", "\\")) or ".." in pure.parts or (os.sep != "/" and ":" in name):
        raise UnknownFileError(resource, name, "must be a path inside its folder")
    return pure
