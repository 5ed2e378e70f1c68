"""The official Z-Image (base) template runs unchanged on tiny checkpoints named as it names them; CFG matters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.checkpoints import copy_tokenizer, write_comfy_root
from tests.workflows import TEMPLATES, saved_image
from zimage_serve.engine.placement import Placement
from zimage_serve.workflow.execute import Executor
from zimage_serve.workflow.folders import Folders
from zimage_serve.workflow.nodes import NODES
from zimage_serve.workflow.ui_format import to_api

TEMPLATE = TEMPLATES / "image_z_image.json"


@pytest.fixture(scope="module")
def executor(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Executor:
    """ComfyUI's file names for the base model: z_image.safetensors, qwen_3_4b.safetensors, ae.safetensors."""
    root = write_comfy_root(tiny_model, tmp_path_factory.mktemp("base") / "models")
    (root / "diffusion_models" / "z_image_turbo_bf16.safetensors").rename(
        root / "diffusion_models" / "z_image.safetensors"
    )
    copy_tokenizer(tiny_model, root / "text_encoders" / "qwen_3_4b_tokenizer")
    data = tmp_path_factory.mktemp("data")
    return Executor(NODES, Folders.default(data, [root]), Placement.choose("cpu"))


def prompt(**changes: Any) -> dict[str, Any]:
    graph = to_api(json.loads(TEMPLATE.read_text(encoding="utf-8")), NODES)
    for key, value in changes.items():
        node, name = key.split("__")
        graph[node]["inputs"][name] = value
    return graph


def image(executor: Executor, graph: dict[str, Any]) -> np.ndarray:
    return saved_image(executor, graph)


def test_the_template_is_the_base_models_graph() -> None:
    graph = prompt()
    sampler = next(n for n in graph.values() if n["class_type"] == "KSampler")["inputs"]
    assert (sampler["steps"], sampler["cfg"], sampler["sampler_name"], sampler["scheduler"]) == (
        50, 4, "res_multistep", "simple"
    )  # fmt: skip
    loaders = {n["class_type"]: n["inputs"] for n in graph.values() if n["class_type"].endswith("Loader")}
    assert loaders["UNETLoader"]["unet_name"] == "z_image.safetensors"
    assert loaders["CLIPLoader"] == {"clip_name": "qwen_3_4b.safetensors", "type": "lumina2", "device": "default"}
    assert graph["71"]["class_type"] == "CLIPTextEncode" and graph["69"]["inputs"]["negative"] == ["71", 0]


def test_the_template_runs_with_only_its_steps_lowered(executor: Executor) -> None:
    """At its 1024² and cfg 4; 4 of its 50 steps (a second each on the tiny model) run the same code."""
    assert image(executor, prompt(**{"69__steps": 4})).shape == (1024, 1024, 3)


def test_cfg_and_the_negative_prompt_matter(executor: Executor) -> None:
    small = {"68__width": 128, "68__height": 128, "69__steps": 6, "69__seed": 3}
    cfg4 = image(executor, prompt(**small))
    cfg1 = image(executor, prompt(**small, **{"69__cfg": 1}))
    other = image(executor, prompt(**small, **{"71__text": "a green square on a red background"}))
    assert np.abs(cfg4 - cfg1).mean() > 1 and np.abs(cfg4 - other).mean() > 1
    # At cfg 1 the negative is never evaluated, so changing it changes nothing.
    same = image(executor, prompt(**small, **{"69__cfg": 1, "71__text": "anything at all"}))
    assert np.array_equal(cfg1, same)


def test_the_base_models_diffusers_folder_runs_the_template(executor: Executor, tiny_model: Path) -> None:
    """The official Tongyi-MAI/Z-Image layout: one folder stands in for all three loaders' files (each lists
    it by its name), and gives the image the split files give; `generate` reads it as the base model."""
    import shutil

    from zimage_serve.engine.variants import detect_variant

    root = executor.folders.models[0]
    folder = root / "diffusion_models" / "Z-Image"
    shutil.copytree(tiny_model, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_zimage_serve"].pop("variant")  # as published: the name alone says which model it is
    (folder / "model_index.json").write_text(json.dumps(index))
    for kind in ("text_encoders", "vae"):
        (root / kind / "Z-Image").symlink_to(folder, target_is_directory=True)
    small = {"68__width": 128, "68__height": 128, "69__steps": 4, "69__seed": 5}
    from_files = image(executor, prompt(**small))
    from_folder = image(
        executor, prompt(**small, **{"66__unet_name": "Z-Image", "62__clip_name": "Z-Image", "63__vae_name": "Z-Image"})
    )
    assert np.abs(from_files - from_folder).max() <= 1
    assert detect_variant(folder) == "base"
