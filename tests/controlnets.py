"""Tiny Fun ControlNet Union checkpoints in the published layout (diffusers' key names), one per variant.

Built with diffusers' own `ZImageControlNetModel` at the tiny test model's width, so a file written here
has exactly the keys and shapes the published files have, scaled down. Its projections start at zero
in diffusers (a fresh ControlNet changes nothing), so every weight is drawn at random instead.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import ZImageControlNetModel
from safetensors.torch import save_file

from zimage_serve.nano.random_model import randomise

# version → (control layers, input channels, its own refiner blocks steer the noise refiner)
VARIANTS = {"1.0": (6, 16, False), "2.0": (15, 33, True), "2.1": (15, 33, True), "2.1 lite": (3, 33, True)}


def build_controlnet(version: str, dim: int = 64, heads: int = 2, seed: int = 0) -> ZImageControlNetModel:
    layers, channels, own_refiner = VARIANTS[version]
    model = ZImageControlNetModel(
        control_layers_places=list(range(layers)),
        control_refiner_layers_places=[0, 1],
        control_in_dim=channels,
        add_control_noise_refiner="control_noise_refiner" if own_refiner else None,
        dim=dim,
        n_refiner_layers=2,
        n_heads=heads,
        n_kv_heads=heads,
    )
    randomise(model, torch.Generator().manual_seed(seed))
    if version == "2.0":  # the broken release: its refiner's first projection is all zeros
        with torch.no_grad():
            model.control_noise_refiner[0].after_proj.weight.zero_()
    for param in model.parameters():  # in place: ModelMixin.to warns about keeping modules in float32
        param.data = param.data.to(torch.bfloat16)
    return model


def write_controlnet(path: Path, version: str, seed: int = 0) -> Path:
    """One .safetensors file, as alibaba-pai publishes them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {key: value.contiguous() for key, value in build_controlnet(version, seed=seed).state_dict().items()}
    save_file(state, str(path))
    return path


def write_controlnet_folder(folder: Path, version: str, seed: int = 0) -> Path:
    """A diffusers `ZImageControlNetModel` folder (config.json + weights), as save_pretrained writes it."""
    build_controlnet(version, seed=seed).save_pretrained(folder, safe_serialization=True)
    return folder
