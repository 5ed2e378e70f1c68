"""ComfyUI's own Z-Image templates of 2026 run unchanged: the 4-step start, the INT8 Turbo template (INT8
ConvRot transformer, FP8-mixed text encoder) and the INT8 base template (Resolution Selector, Save Image
(Advanced)), on tiny files written in the published layouts and named as the templates name them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.quant_checkpoints import write_quant_models_root
from tests.support.images import read_png_text
from tests.workflows import validate
from zimage_serve.engine.placement import Placement
from zimage_serve.workflow.execute import Executor
from zimage_serve.workflow.folders import Folders
from zimage_serve.workflow.nodes import NODES
from zimage_serve.workflow.ui_format import to_api
from zimage_serve.workflows import templates


@pytest.fixture(scope="module")
def executor(tmp_path_factory: pytest.TempPathFactory) -> Executor:
    root = write_quant_models_root(tmp_path_factory.mktemp("comfy-org") / "models")
    return Executor(NODES, Folders.default(root.parent / "data", [root]), Placement.choose("cpu"))


def workflow(name: str) -> dict[str, Any]:
    template = templates.find(name)
    assert template is not None and template.ui_format
    data: dict[str, Any] = json.loads(template.workflow.read_text())
    return data


def run(executor: Executor, name: str) -> tuple[dict[str, Any], Path]:
    """The template as the frontend would queue it (graph and workflow), run; its prompt and its one file."""
    ui = workflow(name)
    prompt = to_api(ui, NODES)
    checked = validate(prompt, executor.folders)
    assert checked.ok, (checked.error, checked.node_errors)
    result = executor.run(name, checked.prompt, checked.outputs, {"extra_pnginfo": {"workflow": ui}}, None)
    assert result.ok, result.error
    [(_, outputs)] = result.outputs.items()
    [saved] = outputs["images"]
    return prompt, executor.folders.output / saved["subfolder"] / saved["filename"]


def sampler(prompt: dict[str, Any]) -> dict[str, Any]:
    [inputs] = [node["inputs"] for node in prompt.values() if node["class_type"] == "KSampler"]
    return inputs


def test_the_four_step_start_runs_unchanged(executor: Executor) -> None:
    prompt, path = run(executor, "01_get_started_text_to_image")
    assert (sampler(prompt)["steps"], sampler(prompt)["cfg"], sampler(prompt)["sampler_name"]) == (
        4,
        1,
        "res_multistep",
    )
    assert not any(node["class_type"] == "ModelSamplingAuraFlow" for node in prompt.values())  # bypassed there
    assert path.name.startswith("z-image-turbo_") and path.name.endswith("_.png")  # SaveImage's name
    assert Image.open(path).size == (1024, 1024)
    chunks = read_png_text(path)
    assert json.loads(chunks["workflow"])["definitions"]["subgraphs"][0]["name"] == "Z-Image-Turbo Text to Image"


def test_the_int8_turbo_template_runs_unchanged(executor: Executor) -> None:
    prompt, path = run(executor, "image_z_image_turbo_int8")
    loaders = {node["class_type"]: node["inputs"] for node in prompt.values()}
    assert loaders["UNETLoader"]["unet_name"] == "z_image_turbo_int8_convrot.safetensors"
    assert loaders["CLIPLoader"]["clip_name"] == "qwen_3_4b_fp8_mixed.safetensors"
    assert sampler(prompt)["steps"] == 8 and Image.open(path).size == (1024, 1024)


def test_the_int8_base_template_runs_unchanged(executor: Executor) -> None:
    prompt, path = run(executor, "image_z_image_int8")
    kinds = {node["class_type"] for node in prompt.values()}
    assert {"ResolutionSelector", "SaveImageAdvanced"} <= kinds
    assert (sampler(prompt)["steps"], sampler(prompt)["cfg"]) == (25, 4)
    assert path.name == "Z_image_base_int8_00001.png"  # Save Image (Advanced)'s name: no trailing underscore
    picture = Image.open(path)
    assert picture.size == (1024, 1024) and picture.mode == "RGB"  # from the Resolution Selector's 1 MP, 1:1
    assert json.loads(picture.info["prompt"])["95"]["inputs"]["format.bit_depth"] == "8-bit"
