"""Memory modes run through accelerate's real hooks. Here the 'accelerator' is the CPU itself, so the
hooks move nothing, but the engine must drive hooked modules correctly and get the same image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from zimage_serve.engine import GenerationParams, ZImageEngine
from zimage_serve.engine.devices import MemoryMode, Placement
from zimage_serve.engine.layouts import resolve
from zimage_serve.engine.loader import load_model

PARAMS = GenerationParams("a purple square", seed=9, width=64, height=64)


def image_with(tiny_model: Path, mode: MemoryMode) -> np.ndarray:
    placement = Placement(torch.device("cpu"), torch.float32, torch.float32, mode)
    engine = ZImageEngine(load_model(resolve(tiny_model), placement=placement))
    return np.asarray(engine.generate(PARAMS).images[0])


@pytest.mark.parametrize("mode", [MemoryMode.MODEL, MemoryMode.SEQUENTIAL])
def test_offload_modes_give_the_same_image(tiny_model: Path, mode: MemoryMode) -> None:
    assert np.array_equal(image_with(tiny_model, MemoryMode.GPU), image_with(tiny_model, mode))


def test_model_offload_installs_one_hook_per_component(tiny_model: Path) -> None:
    placement = Placement(torch.device("cpu"), torch.float32, torch.float32, MemoryMode.MODEL)
    loaded = load_model(resolve(tiny_model), placement=placement)
    assert len(loaded.hooks.hooks) == 3
    for module in (loaded.text_encoder, loaded.transformer, loaded.vae):
        assert hasattr(module, "_hf_hook")
