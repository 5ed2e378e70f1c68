"""The models `zimage models pull` knows: where each file is published and where it goes in a models folder.

Plain data, importing nothing heavy, so `zimage models pull --list` answers at once. The ComfyUI layout takes
the split files Comfy-Org publishes and names them as the official templates do (`z_image_turbo_bf16` in
`diffusion_models/`, `qwen_3_4b` in `text_encoders/`, `ae` in `vae/`), so the templates run unchanged; ComfyUI's
text-encoder file holds no tokenizer, so Qwen3's is taken from the official repository and put where the
layout finder looks for it (`text_encoders/qwen_3_4b_tokenizer/`). The diffusers layout is the official
Tongyi-MAI folder, put in `checkpoints/` where CheckpointLoaderSimple lists it and where the ComfyUI-layout
finder (which reads `diffusion_models/`, `text_encoders/`, `vae/`) does not mistake its shards for split files.
Sources: Comfy-Org's workflow templates (their `models` URLs) and the Z-Image model cards.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

LAYOUTS = ("comfy", "diffusers")


@dataclass(frozen=True)
class Source:
    """Files of one hub repository: those matching `patterns` go to `folder` (relative to the models folder),
    each under its repository path less the `strip` prefix."""

    repo: str
    patterns: tuple[str, ...]
    folder: str
    strip: str = ""
    revision: str = "main"
    approx_bytes: int = 0  # for the catalogue listing only; a pull reads the real sizes from the hub

    def wants(self, path: str) -> bool:
        return path.startswith(self.strip) and any(fnmatchcase(path, pattern) for pattern in self.patterns)

    def destination(self, path: str) -> str:
        """Where the repository file `path` goes, relative to the models folder (POSIX)."""
        return f"{self.folder}/{path.removeprefix(self.strip)}"


@dataclass(frozen=True)
class Entry:
    name: str
    title: str
    about: str
    layouts: dict[str, tuple[Source, ...]]  # a layout it is not published in falls back to "comfy"

    def sources(self, layout: str) -> tuple[Source, ...]:
        return self.layouts.get(layout) or self.layouts["comfy"]


GB = 1_000_000_000
_COMFY_TURBO = "Comfy-Org/z_image_turbo"
# Qwen3-4B and the Flux VAE are shared by Turbo and the base model: one source for both, so pulling the
# second finds them complete.
_TEXT_ENCODER = Source(
    _COMFY_TURBO,
    ("split_files/text_encoders/qwen_3_4b.safetensors",),
    "text_encoders",
    "split_files/text_encoders/",
    approx_bytes=8_045 * 10**6,
)
_VAE = Source(_COMFY_TURBO, ("split_files/vae/ae.safetensors",), "vae", "split_files/vae/", approx_bytes=335_304_388)
_TOKENIZER = Source("Tongyi-MAI/Z-Image-Turbo", ("tokenizer/*",), "text_encoders/qwen_3_4b_tokenizer", "tokenizer/")
_DIFFUSERS_PARTS = (
    "model_index.json",
    "scheduler/*",
    "transformer/*",
    "text_encoder/*",
    "vae/*",
    "tokenizer/*",
)

CATALOGUE: dict[str, Entry] = {
    entry.name: entry
    for entry in (
        Entry(
            "z-image-turbo",
            "Z-Image-Turbo",
            "the 8-step distilled model (bf16): diffusion model, Qwen3-4B text encoder, Flux VAE, tokenizer",
            {
                "comfy": (
                    Source(
                        _COMFY_TURBO,
                        ("split_files/diffusion_models/z_image_turbo_bf16.safetensors",),
                        "diffusion_models",
                        "split_files/diffusion_models/",
                        approx_bytes=12_310 * 10**6,
                    ),
                    _TEXT_ENCODER,
                    _VAE,
                    _TOKENIZER,
                ),
                "diffusers": (
                    Source(
                        "Tongyi-MAI/Z-Image-Turbo",
                        _DIFFUSERS_PARTS,
                        "checkpoints/Z-Image-Turbo",
                        approx_bytes=20_530 * 10**6,
                    ),
                ),
            },
        ),
        Entry(
            "z-image",
            "Z-Image (base)",
            "the non-distilled base model (28-50 steps, guidance): diffusion model, text encoder, VAE, tokenizer",
            {
                "comfy": (
                    Source(
                        "Comfy-Org/z_image",
                        ("split_files/diffusion_models/z_image.safetensors",),
                        "diffusion_models",
                        "split_files/diffusion_models/",
                        approx_bytes=12_310 * 10**6,
                    ),
                    _TEXT_ENCODER,
                    _VAE,
                    _TOKENIZER,
                ),
                "diffusers": (
                    Source("Tongyi-MAI/Z-Image", _DIFFUSERS_PARTS, "checkpoints/Z-Image", approx_bytes=20_530 * 10**6),
                ),
            },
        ),
        Entry(
            "z-image-fun-controlnet",
            "Z-Image-Turbo Fun ControlNet Union 2.1",
            "alibaba-pai's ControlNet for Turbo (canny, HED, depth, pose, MLSD; inpainting): one file, "
            "model_patches/, in either layout",
            {
                "comfy": (
                    Source(
                        "alibaba-pai/Z-Image-Turbo-Fun-Controlnet-Union-2.1",
                        ("Z-Image-Turbo-Fun-Controlnet-Union-2.1.safetensors",),
                        "model_patches",
                        approx_bytes=6_700 * 10**6,
                    ),
                ),
            },
        ),
    )
}


def approx_size(entry: Entry, layout: str) -> int:
    return sum(source.approx_bytes for source in entry.sources(layout))
