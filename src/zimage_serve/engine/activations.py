"""The memory a component's call takes beyond its weights, estimated before it was ever measured.

Smart memory measures each component's peak at each input size on its first call there
(`engine/residency.py`); these estimates stand in before that, and decide `auto`'s choice before any model
is loaded. They come from the H100 run of Turbo at 1024² (all weights 19.1 GiB, peak 21.6 GiB), scaled by
each component's width, and are deliberately generous: a guess too small runs out of memory, one too large
only moves weights out once (a call whose estimate does not fit is still tried, with all it can get).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

KIB = 1024
MIB = 1024 * KIB
LATENT_CHANNELS = 16
LATENT_ELEMENTS_PER_PIXEL = LATENT_CHANNELS / 64  # 16 channels at an eighth of each side
DEFAULT_ELEMENTS = int(1024 * 1024 * LATENT_ELEMENTS_PER_PIXEL)  # a call of unknown size: a 1024² image
# Turbo's, per latent element: the transformer (3840 wide) 8 KiB, the VAE decoding (512 channels at its
# widest) 10 KiB; the text encoder (2560 wide), per token, 512 KiB and 64 MiB more.
TRANSFORMER_PER_ELEMENT, TRANSFORMER_WIDTH = 8 * KIB, 3840
VAE_PER_ELEMENT, VAE_WIDTH = 10 * KIB, 512
TEXT_PER_TOKEN, TEXT_FIXED, TEXT_WIDTH = 512 * KIB, 64 * MIB, 2560
DEFAULT_TOKENS = 512

Activation = Callable[[int | None], int]  # a call's input elements (None: unknown) -> bytes it may take


def latent_elements(pixels: int) -> int:
    return int(pixels * LATENT_ELEMENTS_PER_PIXEL)


def transformer(config: Any) -> Activation:
    per_element = TRANSFORMER_PER_ELEMENT * _width(config, "dim", TRANSFORMER_WIDTH) // TRANSFORMER_WIDTH
    return lambda elements: per_element * (DEFAULT_ELEMENTS if elements is None else elements)


def controlnet(config: Any) -> Activation:
    """Its blocks run beside the transformer's, at the transformer's width: half of its estimate."""
    whole = transformer(config)
    return lambda elements: whole(elements) // 2


def vae(config: Any) -> Activation:
    channels = getattr(config, "block_out_channels", None) or (VAE_WIDTH,)
    per_element = VAE_PER_ELEMENT * max(channels) // VAE_WIDTH
    return lambda elements: per_element * (DEFAULT_ELEMENTS if elements is None else elements)


def text_encoder(config: Any) -> Activation:
    per_token = TEXT_PER_TOKEN * _width(config, "hidden_size", TEXT_WIDTH) // TEXT_WIDTH
    return lambda tokens: TEXT_FIXED + per_token * (DEFAULT_TOKENS if tokens is None else tokens)


def largest_activations(pixels: int, weight_bytes: int, reference_bytes: int) -> int:
    """The most any one call of a Turbo-like model takes for an image of `pixels` (its components run one
    after another), scaled down for a smaller model by its weights (before it is loaded, the one size known)."""
    elements = latent_elements(pixels)
    turbo = max(transformer({})(elements), vae({})(elements), text_encoder({})(None))  # Turbo's widths: the defaults
    return turbo if weight_bytes >= reference_bytes else turbo * weight_bytes // reference_bytes


def _width(config: Any, name: str, default: int) -> int:
    value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
    return int(value) if isinstance(value, int) and value > 0 else default
