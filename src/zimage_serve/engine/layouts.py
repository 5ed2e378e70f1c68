"""Finding a model's components in the three layouts users hold Z-Image weights in.

a. the official diffusers folder (`model_index.json`, one folder per component);
b. ComfyUI's split files: diffusion model, Qwen3-4B text encoder and Flux VAE as single files;
c. a ComfyUI `models/` root, where those files sit in `diffusion_models/`, `text_encoders/`, `vae/`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from zimage_serve.engine.checkpoint import read_header
from zimage_serve.engine.components import ComponentSource
from zimage_serve.engine.keymap import Kind
from zimage_serve.engine.names import ROOT_FOLDERS
from zimage_serve.engine.schedule import TURBO_SCHEDULER_CONFIG
from zimage_serve.engine.variants import TURBO, detect_variant
from zimage_serve.errors import ModelLoadError, ZImageError

# The names the official ComfyUI template asks for; preferred when several files qualify.
TEMPLATE_NAMES: dict[str, str] = {
    "transformer": "z_image_turbo_bf16.safetensors",
    "text_encoder": "qwen_3_4b.safetensors",
    "vae": "ae.safetensors",
}
DIFFUSERS_WEIGHTS = {
    "transformer": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
}
TOKENIZER_ENV = "ZIMAGE_TOKENIZER"
HUB_REPO = "Tongyi-MAI/Z-Image-Turbo"


@dataclass(frozen=True)
class ModelSources:
    name: str
    layout: str
    transformer: ComponentSource
    text_encoder: ComponentSource
    vae: ComponentSource
    tokenizer: Path
    scheduler_config: dict[str, Any]
    native_size: int = 1024  # the model's default width and height
    variant: str = TURBO  # base or turbo (engine/variants.py): the default steps and guidance


def resolve(
    path: Path,
    *,
    text_encoder: Path | None = None,
    vae: Path | None = None,
    tokenizer: Path | None = None,
) -> ModelSources:
    """Work out which layout `path` is and where each component lives. Reads configs and headers only."""
    if not path.exists():
        raise ModelLoadError(path, "no such file or folder")
    if path.is_dir() and (path / "model_index.json").exists():
        return _diffusers_folder(path, tokenizer)
    if path.is_dir() and any((path / name).is_dir() for names in ROOT_FOLDERS.values() for name in names):
        return _models_root(path, text_encoder, vae, tokenizer)
    if path.is_file() and path.suffix == ".safetensors":
        return _split_files(path, text_encoder, vae, tokenizer)
    raise ModelLoadError(
        path,
        "not a model: expected a diffusers folder (with model_index.json), a ComfyUI models folder "
        "(with diffusion_models/, text_encoders/, vae/) or a .safetensors diffusion model file",
    )


def classify(path: Path) -> str:
    """What a single safetensors file holds, from its tensor names: a kind, 'lora', 'model_patch' (a Fun
    ControlNet) or 'unknown'."""
    keys = read_header(path).keys()
    if "control_all_x_embedder.2-1.weight" in keys:
        return "model_patch"
    if any("lora_" in key or ".lora." in key or key.endswith(".alpha") for key in keys):
        return "lora"
    if any("noise_refiner." in key or "context_refiner." in key or "cap_embedder." in key for key in keys):
        return "transformer"
    if any(key.endswith("self_attn.q_norm.weight") for key in keys) and any(
        key.endswith("embed_tokens.weight") for key in keys
    ):
        return "text_encoder"
    if "decoder.conv_in.weight" in keys:
        return "vae"
    return "unknown"


def root_files(root: Path, kind: str) -> list[Path]:
    files: list[Path] = []
    for folder in ROOT_FOLDERS[kind]:
        base = root / folder
        if base.is_dir():
            files.extend(sorted(p for p in base.rglob("*.safetensors") if p.is_file()))
    return files


def models_root_of(file: Path) -> Path | None:
    """The ComfyUI models root a file sits in, if it sits in one of its folders."""
    for parent in file.parents:
        if any(parent.name in names for names in ROOT_FOLDERS.values()):
            return parent.parent
    return None


def _diffusers_folder(folder: Path, tokenizer: Path | None) -> ModelSources:
    index = _read_json(folder / "model_index.json")
    for component in ("transformer", "text_encoder", "vae", "tokenizer"):
        if component not in index:
            raise ModelLoadError(folder / "model_index.json", f"names no {component!r} component")
    components = {kind: diffusers_component(folder, kind) for kind in ("transformer", "text_encoder", "vae")}
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    scheduler = _read_json(scheduler_file) if scheduler_file.exists() else dict(TURBO_SCHEDULER_CONFIG)
    extra = index.get("_zimage_serve")
    name = extra.get("name") if isinstance(extra, dict) else None  # our own, optional display name
    return ModelSources(
        name=name if isinstance(name, str) and name else folder.name,
        layout="diffusers folder",
        transformer=components["transformer"],
        text_encoder=components["text_encoder"],
        vae=components["vae"],
        tokenizer=find_tokenizer(tokenizer, default=folder / "tokenizer"),
        scheduler_config=scheduler,
        native_size=_native_size(index, folder / "model_index.json"),
        variant=detect_variant(folder),
    )


def _native_size(index: dict[str, Any], origin: Path) -> int:
    """Our own optional entry in model_index.json; diffusers ignores keys that start with '_'."""
    extra = index.get("_zimage_serve", {})
    size = extra.get("native_size", 1024) if isinstance(extra, dict) else None
    if isinstance(size, bool) or not isinstance(size, int) or size < 64 or size % 16:
        raise ModelLoadError(origin, f"_zimage_serve.native_size must be a multiple of 16 from 64, got {size!r}")
    return size


def diffusers_component(folder: Path, kind: Kind) -> ComponentSource:
    sub = folder / kind
    if not sub.is_dir():
        raise ModelLoadError(sub, f"the {kind} folder named in model_index.json is missing")
    config = _read_json(sub / "config.json")
    stem = DIFFUSERS_WEIGHTS[kind]
    for candidate in (sub / f"{stem}.safetensors.index.json", sub / f"{stem}.safetensors"):
        if candidate.exists():
            return ComponentSource(kind, candidate, config)
    raise ModelLoadError(sub, f"holds no {stem}.safetensors weights (nor a .safetensors.index.json)")


def _split_files(
    transformer: Path, text_encoder: Path | None, vae: Path | None, tokenizer: Path | None
) -> ModelSources:
    root = models_root_of(transformer)
    te = text_encoder or _pick_in_root(root, "text_encoder", transformer)
    ae = vae or _pick_in_root(root, "vae", transformer)
    return ModelSources(
        name=transformer.stem,
        layout="ComfyUI split files",
        transformer=single_file("transformer", transformer),
        text_encoder=single_file("text_encoder", te),
        vae=single_file("vae", ae),
        tokenizer=find_tokenizer(tokenizer, text_encoder_file=te),
        scheduler_config=dict(TURBO_SCHEDULER_CONFIG),
        variant=detect_variant(transformer),
    )


def _models_root(root: Path, text_encoder: Path | None, vae: Path | None, tokenizer: Path | None) -> ModelSources:
    transformer = _pick_in_root(root, "transformer", root)
    sources = _split_files(
        transformer,
        text_encoder or _pick_in_root(root, "text_encoder", root),
        vae or _pick_in_root(root, "vae", root),
        tokenizer,
    )
    return replace(sources, layout="ComfyUI models folder")


def _pick_in_root(root: Path | None, kind: str, wanted_by: Path) -> Path:
    if root is None:
        raise ModelLoadError(
            wanted_by,
            f"no {kind.replace('_', ' ')} given and the file is not inside a ComfyUI models folder; "
            f"pass --{kind.replace('_', '-')} PATH",
        )
    files = root_files(root, kind)
    preferred = [f for f in files if f.name == TEMPLATE_NAMES[kind]]
    rejected: list[str] = []
    for candidate in preferred + [f for f in files if f not in preferred]:
        try:
            found = classify(candidate)
        except ZImageError as exc:
            rejected.append(str(exc))
            continue
        if found == kind:
            return candidate
        rejected.append(f"{candidate.name} holds a {found.replace('_', ' ')}")
    folders = " or ".join(f"{root / name}/" for name in ROOT_FOLDERS[kind])
    why = f" ({'; '.join(rejected)})" if rejected else ""
    raise ModelLoadError(root, f"found no usable {kind.replace('_', ' ')} file in {folders}{why}")


def single_file(kind: Kind, path: Path) -> ComponentSource:
    if not path.exists():
        raise ModelLoadError(path, "file not found")
    if path.suffix != ".safetensors":
        raise ModelLoadError(path, "only .safetensors weights are loaded (pickle files can run code)")
    found = classify(path)
    if found != kind:
        what = "an unrecognised file" if found == "unknown" else f"a {found.replace('_', ' ')}"
        raise ModelLoadError(path, f"expected a {kind.replace('_', ' ')} but this is {what}")
    return ComponentSource(kind, path, None)


def find_tokenizer(
    explicit: Path | None, *, default: Path | None = None, text_encoder_file: Path | None = None
) -> Path:
    """Qwen3's tokenizer: ComfyUI's text-encoder file has none, so look where a user would keep one."""
    tried: list[str] = []
    candidates: list[Path] = []
    if explicit is not None:
        candidates.append(explicit)
    elif os.environ.get(TOKENIZER_ENV):
        candidates.append(Path(os.environ[TOKENIZER_ENV]))
    else:
        if default is not None:
            candidates.append(default)
        if text_encoder_file is not None:
            folder = text_encoder_file.parent
            candidates += [folder / f"{text_encoder_file.stem}_tokenizer", folder / "tokenizer"]
    for candidate in candidates:
        for folder in (candidate, candidate / "tokenizer"):
            if (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file():
                return folder
        tried.append(str(candidate))
    if explicit is None and not os.environ.get(TOKENIZER_ENV):
        hub = _tokenizer_from_hub()
        if hub is not None:
            return hub
        tried.append(f"the Hugging Face hub ({HUB_REPO}, tokenizer/)")
    raise ModelLoadError(
        candidates[0] if candidates else Path("tokenizer"),
        "no Qwen3 tokenizer found (the text-encoder file holds none). Tried: "
        + "; ".join(tried)
        + f". Pass --tokenizer with a tokenizer folder or a diffusers Z-Image folder, or set {TOKENIZER_ENV}",
    )


def _tokenizer_from_hub() -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        snapshot = snapshot_download(HUB_REPO, allow_patterns=["tokenizer/*"], local_files_only=offline)
    except Exception:  # offline, no cache, or the hub unreachable: the caller reports what was tried
        return None
    folder = Path(snapshot) / "tokenizer"
    return folder if (folder / "tokenizer.json").is_file() else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelLoadError(path, "file not found") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(path, f"not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(path, "expected a JSON object")
    return data
