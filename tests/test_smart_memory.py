"""Smart memory driving the real engine: the tiny model on a fake card too small to hold it all gives the
same images as with everything on the device, while its components move in and out between the calls.
Here the 'card' is the CPU itself (see tests/test_residency.py for what that means)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from zimage_serve.engine import GenerationParams, ZImageEngine
from zimage_serve.engine.devices import MemoryMode
from zimage_serve.engine.layouts import resolve
from zimage_serve.engine.loader import LoadedModel, load_model
from zimage_serve.engine.parts import Vae
from zimage_serve.engine.placement import Placement
from zimage_serve.engine.residency import FixedBudget

PROMPTS = ("a purple square", "a green circle", "a purple square")
CARD = 2_500_000  # bytes: the tiny model's transformer (2.4 MB) fits, but not beside its VAE (1.5 MB)


def images(loaded: LoadedModel) -> list[np.ndarray]:
    engine = ZImageEngine(loaded)
    return [np.asarray(engine.generate(GenerationParams(p, seed=9, width=64, height=64)).images[0]) for p in PROMPTS]


def test_smart_memory_gives_the_same_images_on_a_card_too_small_for_the_model(tiny_model: Path) -> None:
    cpu = torch.device("cpu")
    everything = load_model(resolve(tiny_model), placement=Placement(cpu, torch.float32, torch.float32, MemoryMode.GPU))
    smart = load_model(resolve(tiny_model), placement=Placement(cpu, torch.float32, torch.float32, MemoryMode.SMART))
    assert everything.residency is None and smart.residency is not None
    smart.residency.budget = FixedBudget(CARD, calls_take=0)
    weights = sum(c.footprint.total for c in smart.residency._components())
    assert weights > CARD
    expected = images(everything)
    assert [np.array_equal(a, b) for a, b in zip(images(smart), expected, strict=True)] == [True] * 3
    # Each image brought the transformer back after the VAE had pushed it out: more moved than the weights.
    assert smart.residency.moved_in > 2 * weights
    assert sum(smart.residency.resident().values()) * 2**30 <= CARD
    # A repeated prompt comes from the prompt cache: the text encoder is not brought back for it.
    text = next(c for c in smart.residency._components() if c.name.startswith("text encoder"))
    used = text.last_used
    ZImageEngine(smart).generate(GenerationParams(PROMPTS[0], seed=1, width=64, height=64))
    assert text.last_used > used  # a new engine has its own cache: the text encoder ran
    engine = ZImageEngine(smart)
    engine.generate(GenerationParams(PROMPTS[1], seed=1, width=64, height=64))
    used = text.last_used
    engine.generate(GenerationParams(PROMPTS[1], seed=2, width=64, height=64))
    assert text.last_used == used


def test_a_vae_call_that_runs_out_of_memory_is_made_again_in_tiles(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """As ComfyUI does when a large image does not fit: the VAE's own tiles (an out-of-memory error is what
    a GPU raises; here the whole-image calls raise it)."""
    cpu = torch.device("cpu")
    loaded = load_model(resolve(tiny_model), placement=Placement(cpu, torch.float32, torch.float32, MemoryMode.GPU))
    vae = Vae("tiny", loaded.vae)
    tile = loaded.vae.tile_latent_min_size = 4  # small tiles for a small image (Flux's VAE: 128, 1024 pixels)
    loaded.vae.tile_sample_min_size = 8 * tile
    latents = torch.randn(1, 16, 2 * tile, 3 * tile)  # six tiles' worth
    pictures = torch.rand(1, 8 * 2 * tile, 8 * 3 * tile, 3)
    whole_decode, whole_encode = vae.decode(latents), vae.encode(pictures)

    def out_of_memory(*args: object, **kwargs: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    monkeypatch.setattr(loaded.vae, "decode", out_of_memory)
    monkeypatch.setattr(loaded.vae, "encode", out_of_memory)
    tiled_decode, tiled_encode = vae.decode(latents), vae.encode(pictures)
    assert tiled_decode.shape == whole_decode.shape and tiled_encode.shape == whole_encode.shape
    assert not torch.equal(tiled_decode, whole_decode)  # blended tiles (far apart here: tiny tiles, random weights)
    with torch.inference_mode():
        expected = loaded.vae.tiled_decode(latents, return_dict=False)[0]
        loaded.vae.use_tiling = True  # diffusers' own tiled encode, as its encode makes it
        expected_latent = type(loaded.vae).encode(loaded.vae, pictures.permute(0, 3, 1, 2) * 2 - 1).latent_dist.mode()
    assert torch.equal(tiled_decode[0], ((expected.float() + 1) / 2).clamp(0, 1)[0].permute(1, 2, 0))
    assert torch.allclose(tiled_encode, expected_latent, atol=1e-5) and not torch.equal(tiled_encode, whole_encode)
    assert f"VAE decoding at {24 * tile}x{16 * tile} did not fit in the GPU's memory" in caplog.text
    assert "VAE encoding at" in caplog.text
