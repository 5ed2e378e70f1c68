"""ComfyUI's V3 Autogrow inputs (Batch Images, Batch Masks): numbered dotted keys in API-format graphs."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.workflows import validate
from zimage_serve.engine.placement import Placement
from zimage_serve.workflow.execute import Executor
from zimage_serve.workflow.folders import Folders
from zimage_serve.workflow.nodes import NODES
from zimage_serve.workflow.spec import object_info


@pytest.fixture(scope="module")
def executor(tmp_path_factory: pytest.TempPathFactory) -> Executor:
    folders = Folders.default(tmp_path_factory.mktemp("autogrow"), [])
    folders.input.mkdir(parents=True)
    for name, size, colour in (("a.png", (32, 24), (250, 0, 0)), ("b.png", (32, 24), (0, 250, 0)),
                               ("c.png", (16, 16), (0, 0, 250))):  # fmt: skip
        Image.new("RGB", size, colour).save(folders.input / name)
    return Executor(NODES, folders, Placement.choose("cpu"))


def graph(**members: str) -> dict[str, Any]:
    """A LoadImage per member (`image0="a.png"`), batched by BatchImagesNode, saved."""
    prompt: dict[str, Any] = {}
    links = {}
    for index, (member, file) in enumerate(members.items()):
        prompt[f"{index + 1}"] = {"class_type": "LoadImage", "inputs": {"image": file}}
        links[f"images.{member}"] = [f"{index + 1}", 0]
    prompt["10"] = {"class_type": "BatchImagesNode", "inputs": links}
    prompt["11"] = {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "batch"}}
    return prompt


def saved(executor: Executor, prompt: dict[str, Any]) -> list[np.ndarray]:
    checked = validate(prompt, executor.folders)
    assert checked.ok, (checked.error, checked.node_errors)
    result = executor.run("g", checked.prompt, checked.outputs, {}, None)
    assert result.ok, result.error
    return [np.asarray(Image.open(executor.folders.output / e["subfolder"] / e["filename"]))
            for e in result.outputs["11"]["images"]]  # fmt: skip


def test_object_info_describes_the_autogrow_as_comfyuis_frontend_reads_it(executor: Executor) -> None:
    info = object_info(NODES, executor.folders)
    assert info["BatchImagesNode"]["input"]["required"]["images"] == [
        "COMFY_AUTOGROW_V3",
        {"template": {"input": {"required": {"image": ["IMAGE"]}}, "prefix": "image", "min": 2, "max": 50}},
    ]
    assert info["BatchImagesNode"]["output"] == ["IMAGE"] and info["BatchImagesNode"]["display_name"] == "Batch Images"
    assert info["BatchMasksNode"]["input"]["required"]["masks"][1]["template"]["prefix"] == "mask"


def test_numbered_members_batch_in_order_each_fitted_to_the_first(executor: Executor) -> None:
    pictures = saved(executor, graph(image0="a.png", image1="c.png", image2="b.png"))
    assert [p.shape for p in pictures] == [(24, 32, 3)] * 3  # c.png made 32×24
    assert pictures[0][0, 0].tolist() == [250, 0, 0] and pictures[2][0, 0].tolist() == [0, 250, 0]
    assert pictures[1][12, 16].tolist() == [0, 0, 250]


def test_a_member_past_the_first_two_may_be_left_out(executor: Executor) -> None:
    pictures = saved(executor, graph(image0="a.png", image1="b.png", image4="c.png"))
    assert len(pictures) == 3


def test_the_first_two_members_are_required_and_named(executor: Executor) -> None:
    checked = validate(graph(image0="a.png"), executor.folders)
    assert not checked.ok
    [error] = checked.node_errors["10"]["errors"]
    assert error["type"] == "required_input_missing" and error["extra_info"]["input_name"] == "images.image1"
    checked = validate(graph(image0="a.png", image1="b.png", image50="c.png"), executor.folders)
    assert checked.ok  # past the last member there is no input: ignored, as ComfyUI ignores unknown keys


def test_the_image_count_adds_the_members_batches() -> None:
    linked = {"images.image0": 2, "images.image1": 1, "images.image3": 4}  # as image_count reads the graph
    assert NODES["BatchImagesNode"].batch({}, linked) == 7


def test_batch_masks_fits_each_mask_to_the_first(executor: Executor) -> None:
    prompt = {
        "1": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 32, "height": 24}},
        "2": {"class_type": "SolidMask", "inputs": {"value": 0.5, "width": 8, "height": 8}},
        "10": {"class_type": "BatchMasksNode", "inputs": {"masks.mask0": ["1", 0], "masks.mask1": ["2", 0]}},
        "12": {"class_type": "MaskToImage", "inputs": {"mask": ["10", 0]}},
        "11": {"class_type": "SaveImage", "inputs": {"images": ["12", 0], "filename_prefix": "masks"}},
    }
    first, second = saved(executor, prompt)
    assert first.shape == second.shape == (24, 32, 3)
    assert first.min() == 255 and second[10, 10].tolist() == [127, 127, 127]


def test_keys_past_the_last_member_are_no_links_for_the_image_count(executor: Executor) -> None:
    """A key the node does not have is ignored everywhere: in the quota's count too, where a link through it
    back from a later node would otherwise look like a cycle."""
    from zimage_serve.workflow.image_count import estimated_images

    prompt = graph(image0="a.png", image1="b.png")
    prompt["10"]["inputs"]["images.image99"] = ["11", 0]
    checked = validate(prompt, executor.folders)
    assert checked.ok, checked.node_errors
    assert estimated_images(checked.prompt, NODES) == 0
