"""Smart memory driving the real engine: the tiny model on a fake card too small to hold it all gives the
same images as with everything on the device, while its components move in and out between the calls.
Here the 'card' is the CPU itself (see tests/test_residency.py for what that means)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from zimage_serve.engine import GenerationParams, ZImageEngine
from zimage_serve.engine.devices import MemoryMode, Placement
from zimage_serve.engine.layouts import resolve
from zimage_serve.engine.loader import LoadedModel, load_model
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
