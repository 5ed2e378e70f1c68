"""IMAGE tensors to pictures and back, as LoadImage and SaveImage do it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from zimage_serve.workflow.nodes.image import open_image, to_pil


def test_values_are_clamped_and_cut_to_the_level_below_as_comfyui_does() -> None:
    """ComfyUI's SaveImage casts clip(255 · x) to 8 bits, which truncates: these values would round up."""
    levels = torch.tensor([-0.5, 0.0, 0.499 / 255, 0.999 / 255, 0.5, 254.6 / 255, 1.0, 7.0])
    image = levels.repeat(3, 1).T.reshape(1, 2, 4, 3)
    [picture] = to_pil(image)
    assert picture.mode == "RGB" and picture.size == (4, 2)
    assert np.asarray(picture)[..., 0].ravel().tolist() == [0, 0, 0, 0, 127, 254, 255, 255]
    comfyui = np.clip(255.0 * image.numpy(), 0, 255).astype(np.uint8)[0]  # ComfyUI's own expression
    assert (np.asarray(picture) == comfyui).all()


def test_a_batch_gives_one_picture_each_and_alpha_is_kept() -> None:
    generator = torch.Generator().manual_seed(0)
    batch = torch.rand(3, 5, 7, 4, generator=generator)
    pictures = to_pil(batch)
    assert [p.mode for p in pictures] == ["RGBA"] * 3 and all(p.size == (7, 5) for p in pictures)
    for picture, frame in zip(pictures, batch, strict=True):
        assert np.array_equal(np.asarray(picture), np.clip(255.0 * frame.numpy(), 0, 255).astype(np.uint8))
    gray = to_pil(torch.full((1, 2, 2, 1), 0.5))
    assert np.asarray(gray[0]).squeeze().tolist() == [[127, 127], [127, 127]]


def test_a_saved_picture_loads_back_to_the_same_pixels(tmp_path: Path) -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "in.png")
    image, mask = open_image(tmp_path / "in.png")
    assert image.shape == (1, 9, 11, 3) and mask.shape == (1, 64, 64)
    [picture] = to_pil(image)
    assert np.array_equal(np.asarray(picture), pixels)
    picture.save(tmp_path / "out.png")  # a picture over a shared buffer saves like any other
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out.png")), pixels)


def test_any_dtype_grad_or_layout_gives_the_same_pictures_and_the_input_is_left_alone() -> None:
    image = torch.linspace(0, 1, 3 * 2 * 4).reshape(1, 3, 2, 4).permute(0, 2, 3, 1)  # not contiguous
    before = image.clone()
    expected = np.asarray(to_pil(image.contiguous())[0])
    for variant in (image, image.clone().requires_grad_(True), image.double()):
        assert np.array_equal(np.asarray(to_pil(variant)[0]), expected)
    assert torch.equal(image, before)
    for half in (torch.float16, torch.bfloat16):  # these round the levels a little
        assert np.abs(np.asarray(to_pil(image.to(half))[0]).astype(int) - expected.astype(int)).max() <= 1
