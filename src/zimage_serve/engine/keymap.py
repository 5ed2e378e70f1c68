"""Renaming checkpoint tensors into the diffusers / transformers layout, with an account of every key.

The conversions themselves are diffusers' own (`single_file_utils`). They run twice: first on meta
tensors built from the header, to check that every tensor is used and every weight is present before
anything is read; then on the real tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from zimage_serve.engine.libraries import load_model_libraries

Kind = Literal["transformer", "text_encoder", "vae"]
COMFY_PREFIX = "model.diffusion_model."
# Tensors a published file may hold that the model does not use.
IGNORED_KEYS: dict[Kind, frozenset[str]] = {
    "transformer": frozenset({"norm_final.weight"}),
    "text_encoder": frozenset({"lm_head.weight"}),
    "vae": frozenset(),
}


def is_comfy_transformer(keys: Mapping[str, Any]) -> bool:
    return any(key.endswith(".attention.qkv.weight") for key in keys) or any(
        key.startswith(("x_embedder.", "final_layer.", COMFY_PREFIX)) for key in keys
    )


def is_ldm_vae(keys: Mapping[str, Any]) -> bool:
    return any(key.startswith(("encoder.down.", "decoder.up.")) for key in keys)


@dataclass
class Conversion:
    state: dict[str, torch.Tensor]  # diffusers names
    unused: list[str]  # source keys that no converted tensor came from


def to_diffusers(kind: Kind, source: dict[str, torch.Tensor], vae_config: dict[str, Any] | None = None) -> Conversion:
    origins = {id(tensor): key for key, tensor in source.items()}
    if kind == "transformer":
        state = _transformer(dict(source))
    elif kind == "text_encoder":
        state = {key.removeprefix("model."): tensor for key, tensor in source.items()}
    elif is_ldm_vae(source):
        assert vae_config is not None, "an LDM-layout VAE needs its block layout to convert"
        # diffusers' converter, imported only for a file that needs it (engine/libraries.py).
        load_model_libraries()
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        state = convert_ldm_vae_checkpoint(dict(source), vae_config)
    else:
        state = dict(source)
    used = {origins.get(id(root(tensor))) for tensor in state.values()}
    ignored = IGNORED_KEYS[kind]
    state = {key: tensor for key, tensor in state.items() if key not in ignored}
    unused = sorted(key for key in source if key not in used and key not in ignored)
    return Conversion(state, unused)


def _transformer(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if is_comfy_transformer(state):
        # diffusers' converter, imported only for a file that needs it (engine/libraries.py).
        load_model_libraries()
        from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

        converted: dict[str, torch.Tensor] = convert_z_image_transformer_checkpoint_to_diffusers(state)
        return converted
    return state


def root(tensor: torch.Tensor) -> torch.Tensor:
    """Converters slice (qkv chunks, 1x1 conv squeezes); a view's base names the source tensor."""
    while tensor._base is not None:
        tensor = tensor._base
    return tensor
