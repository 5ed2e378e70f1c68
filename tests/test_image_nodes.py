"""ComfyUI's core image nodes, run through the validator and the executor, against values worked out by hand."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tests.workflows import run, validate
from zimage_serve.engine.placement import Placement
from zimage_serve.limits import Limits
from zimage_serve.workflow.execute import Executor
from zimage_serve.workflow.folders import Folders
from zimage_serve.workflow.nodes import NODES
from zimage_serve.workflow.nodes.image_ops import scale


@pytest.fixture
def executor(tmp_path: Path) -> Executor:
    return Executor(NODES, Folders.default(tmp_path, []), Placement.choose("cpu"))


def saved(executor: Executor, graph: dict[str, Any], source: str) -> list[np.ndarray]:
    """Run `graph` with a SaveImage on `source`; the 8-bit pixels it wrote."""
    graph = {**graph, "99": {"class_type": "SaveImage", "inputs": {"images": [source, 0], "filename_prefix": "t"}}}
    result = run(executor, graph)
    assert result.ok, result.error
    images = result.outputs["99"]["images"]
    return [np.asarray(Image.open(executor.folders.output / i["subfolder"] / i["filename"])) for i in images]


def empty(width: int, height: int, color: int, batch: int = 1) -> dict[str, Any]:
    return {
        "class_type": "EmptyImage",
        "inputs": {"width": width, "height": height, "batch_size": batch, "color": color},
    }


def test_empty_image_is_one_colour(executor: Executor) -> None:
    [first, second] = saved(executor, {"1": empty(6, 4, 0xFF8000, batch=2)}, "1")
    assert first.shape == (4, 6, 3) and np.array_equal(first, second)
    assert (first == np.array([255, 128, 0], dtype=np.uint8)).all()  # 0x80 / 255 · 255 = 128


def test_invert_makes_the_complement(executor: Executor) -> None:
    graph = {"1": empty(2, 2, 0x204060), "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}}}
    [pixels] = saved(executor, graph, "2")
    assert (pixels == np.array([255 - 0x20, 255 - 0x40, 255 - 0x60])).all()


def test_crop_keeps_its_corner_inside_the_image() -> None:
    image = torch.arange(5 * 4, dtype=torch.float32).reshape(1, 5, 4, 1).expand(1, 5, 4, 3)
    crop = NODES["ImageCrop"]().run
    out = crop(None, image=image, width=2, height=3, x=1, y=1).outputs[0]  # type: ignore[arg-type]
    assert out.shape == (1, 3, 2, 3) and out[0, :, :, 0].tolist() == [[5, 6], [9, 10], [13, 14]]
    # x beyond the width starts at the last column; a crop past the edge ends where the image does.
    edge = crop(None, image=image, width=8, height=8, x=9, y=4).outputs[0]  # type: ignore[arg-type]
    assert edge[0, :, :, 0].tolist() == [[19]]


def test_scale_by_sizes_and_nearest_values() -> None:
    image = torch.tensor([[0.0, 1.0], [0.5, 0.25]]).reshape(1, 2, 2, 1).expand(1, 2, 2, 3)
    out = NODES["ImageScaleBy"]().run(
        _ctx(), image=image, upscale_method="nearest-exact", scale_by=2.0
    ).outputs[0]  # fmt: skip
    assert out.shape == (1, 4, 4, 3)
    assert out[0, :, :, 0].tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [0.5, 0.5, 0.25, 0.25], [0.5, 0.5, 0.25, 0.25]]
    half = NODES["ImageScaleBy"]().run(_ctx(), image=image, upscale_method="area", scale_by=0.5).outputs[0]
    assert half.shape == (1, 1, 1, 3) and half[0, 0, 0, 0].item() == pytest.approx((0 + 1 + 0.5 + 0.25) / 4)


def test_scale_keeps_the_aspect_ratio_when_a_side_is_0_and_crops_to_the_centre() -> None:
    image = torch.rand(1, 20, 40, 3)
    node = NODES["ImageScale"]()
    tall = node.run(_ctx(), image=image, upscale_method="bilinear", width=0, height=10, crop="disabled").outputs[0]
    assert tall.shape == (1, 10, 20, 3)
    same = node.run(_ctx(), image=image, upscale_method="bilinear", width=0, height=0, crop="disabled").outputs[0]
    assert same is image
    # 40×20 to a square with a centre crop: the middle 20 columns, unscaled.
    square = node.run(_ctx(), image=image, upscale_method="nearest-exact", width=20, height=20, crop="center")
    assert torch.equal(square.outputs[0], image[:, :, 10:30, :])


def test_lanczos_goes_through_8_bit_pictures_as_comfyui_does() -> None:
    image = torch.linspace(0, 1, 16 * 16 * 3).reshape(1, 16, 16, 3)
    out = scale(image, 8, 8, "lanczos", "disabled")
    expected = Image.fromarray((image[0].numpy() * 255).clip(0, 255).astype(np.uint8)).resize(
        (8, 8), Image.Resampling.LANCZOS
    )
    assert np.array_equal(np.rint(out[0].numpy() * 255).astype(np.uint8), np.asarray(expected))


def test_batch_fits_the_second_image_to_the_first(executor: Executor) -> None:
    graph = {
        "1": empty(8, 4, 0xFF0000),
        "2": empty(4, 4, 0x0000FF),
        "3": {"class_type": "ImageBatch", "inputs": {"image1": ["1", 0], "image2": ["2", 0]}},
    }
    first, second = saved(executor, graph, "3")
    assert first.shape == second.shape == (4, 8, 3)
    assert (first == [255, 0, 0]).all() and (second == [0, 0, 255]).all()


def test_sizes_past_the_pixel_limit_are_refused(tmp_path: Path) -> None:
    folders = Folders.default(tmp_path, [])
    too_big = {"1": empty(4096, 4096, 0), "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}}
    checked = validate(too_big, folders)
    assert not checked.ok and "pixels" in str(checked.node_errors)
    limited = Limits(pixels=64 * 64)
    scaled = NODES["ImageScale"]()
    with pytest.raises(Exception, match="pixels"):
        scaled.run(_ctx(limited), image=torch.zeros(1, 8, 8, 3), upscale_method="bilinear", width=128, height=128,
                   crop="disabled")  # fmt: skip


def test_object_info_shows_them_in_comfyuis_shape(tmp_path: Path) -> None:
    from zimage_serve.workflow.spec import object_info

    info = object_info(NODES, Folders.default(tmp_path, []))
    assert info["ImageScale"]["input"]["required"]["upscale_method"][0] == [
        "nearest-exact", "bilinear", "area", "bicubic", "lanczos"
    ]  # fmt: skip
    assert info["EmptyImage"]["input"]["required"]["color"][1] == {
        "default": 0, "min": 0, "max": 0xFFFFFF, "step": 1, "display": "color"
    }  # fmt: skip
    assert info["ImageBatch"]["display_name"] == "Batch Images" and info["ImageCrop"]["output"] == ["IMAGE"]


def _ctx(limits: Limits | None = None) -> Any:
    from zimage_serve.workflow.context import NodeContext

    return NodeContext(folders=None, placement=None, node_id="n", limits=limits or Limits())  # type: ignore[arg-type]


def test_scale_to_max_dimension_keeps_the_aspect_ratio() -> None:
    node = NODES["ImageScaleToMaxDimension"]()
    wide = node.run(_ctx(), image=torch.rand(1, 30, 60, 3), upscale_method="area", largest_size=40).outputs[0]
    tall = node.run(_ctx(), image=torch.rand(2, 60, 30, 3), upscale_method="bicubic", largest_size=40).outputs[0]
    square = node.run(_ctx(), image=torch.rand(1, 8, 8, 3), upscale_method="lanczos", largest_size=16).outputs[0]
    assert (wide.shape, tall.shape, square.shape) == ((1, 20, 40, 3), (2, 40, 20, 3), (1, 16, 16, 3))


def test_get_image_size_sets_another_nodes_size_through_links(executor: Executor) -> None:
    """As the Fun ControlNet template does: GetImageSize's INT outputs feed a size widget."""
    graph = {
        "1": empty(40, 24, 0x00FF00, batch=3),
        "2": {"class_type": "GetImageSize", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "EmptyImage", "inputs": {"width": ["2", 0], "height": ["2", 1], "batch_size": ["2", 2],
                                                     "color": 0xFFFFFF}},
    }  # fmt: skip
    pictures = saved(executor, graph, "3")
    assert len(pictures) == 3 and pictures[0].shape == (24, 40, 3) and (pictures[0] == 255).all()
    wrong = {**graph, "3": {"class_type": "EmptyImage", "inputs": {**graph["3"]["inputs"], "width": ["1", 0]}}}
    checked = validate({**wrong, "9": {"class_type": "SaveImage", "inputs": {"images": ["3", 0]}}}, executor.folders)
    assert not checked.ok and checked.node_errors["3"]["errors"][0]["type"] == "return_type_mismatch"


def test_mask_nodes(executor: Executor) -> None:
    solid = NODES["SolidMask"]().run(_ctx(), value=0.25, width=3, height=2).outputs[0]
    assert solid.shape == (1, 2, 3) and (solid == 0.25).all()
    inverted = NODES["InvertMask"]().run(_ctx(), mask=solid).outputs[0]
    assert (inverted == 0.75).all()
    image = torch.tensor([[[[0.1, 0.2, 0.3, 0.4]]]])  # one RGBA pixel
    to_mask = NODES["ImageToMask"]().run
    assert [to_mask(_ctx(), image=image, channel=c).outputs[0].item() for c in ("red", "green", "blue", "alpha")] == (
        pytest.approx([0.1, 0.2, 0.3, 0.4])
    )
    assert to_mask(_ctx(), image=image[..., :3], channel="alpha").outputs[0].item() == 1.0  # no alpha: opaque
    # A mask saved as an image: grey levels 0.75 · 255 = 191.25 → 191 in all three channels.
    graph = {
        "1": {"class_type": "SolidMask", "inputs": {"value": 0.75, "width": 4, "height": 2}},
        "2": {"class_type": "MaskToImage", "inputs": {"mask": ["1", 0]}},
    }
    [pixels] = saved(executor, graph, "2")
    assert pixels.shape == (2, 4, 3) and (pixels == 191).all()
