"""The official Z-Image-Turbo templates run unchanged on tiny checkpoints named as they name them; LoRAs."""

from __future__ import annotations

import base64
import copy
import io
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tests.checkpoints import copy_tokenizer, diffusers_state, write_comfy_root
from tests.loras import lora_pairs, shared_qkv_down, write_comfy, write_diffusers, write_kohya
from tests.support.images import read_png_text
from tests.workflows import TEMPLATES, TURBO_WORKFLOW, validate
from zimage_serve.engine.devices import MemoryMode
from zimage_serve.engine.placement import Placement
from zimage_serve.engine.residency import FixedBudget, Residency
from zimage_serve.workflow.execute import Executor, RunResult
from zimage_serve.workflow.folders import Folders
from zimage_serve.workflow.nodes import NODES
from zimage_serve.workflow.ui_format import to_api

LORA = "pixel_art_style_z_image_turbo.safetensors"


@pytest.fixture(scope="module")
def models(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ComfyUI models root: the template's three file names, a tokenizer beside the text encoder, a LoRA."""
    root = write_comfy_root(tiny_model, tmp_path_factory.mktemp("workflow") / "models", prefix="model.diffusion_model.")
    copy_tokenizer(tiny_model, root / "text_encoders" / "qwen_3_4b_tokenizer")
    pairs = lora_pairs(diffusers_state(tiny_model / "transformer"))
    write_kohya(pairs, root / "loras" / LORA)
    shared = shared_qkv_down(pairs)
    write_diffusers(shared, root / "loras" / "ai-toolkit.safetensors")
    write_kohya(shared, root / "loras" / "kohya.safetensors")
    write_comfy(shared, root / "loras" / "comfy-qkv.safetensors")
    return root


@pytest.fixture
def executor(models: Path, tmp_path: Path) -> Executor:
    return Executor(NODES, Folders.default(tmp_path / "data", [models]), Placement.choose("cpu"))


def run(executor: Executor, prompt: dict[str, Any], extra: dict[str, Any] | None = None) -> RunResult:
    checked = validate(prompt, executor.folders)
    assert checked.ok, (checked.error, checked.node_errors)
    result = executor.run("t", checked.prompt, checked.outputs, extra or {}, None)
    assert result.ok, result.error
    return result


def output_image(executor: Executor, result: RunResult) -> Path:
    [(_, ui)] = result.outputs.items()
    image = ui["images"][-1]
    return executor.folders.output / image["subfolder"] / image["filename"]


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_the_subgraph_template_runs_unchanged(executor: Executor) -> None:
    workflow = json.loads((TEMPLATES / "image_z_image_turbo.subgraph.json").read_text())
    prompt = to_api(workflow, NODES)
    assert prompt["57:3"]["inputs"]["sampler_name"] == "res_multistep" and prompt["57:3"]["inputs"]["steps"] == 8
    result = run(executor, prompt, {"extra_pnginfo": {"workflow": workflow}})
    path = output_image(executor, result)
    assert path.name == "z-image-turbo_00001_.png" and Image.open(path).size == (1024, 1024)
    chunks = read_png_text(path)
    assert json.loads(chunks["workflow"])["definitions"]["subgraphs"][0]["name"] == "Text to Image (Z-Image-Turbo)"
    assert json.loads(chunks["prompt"])["57:13"]["inputs"]["width"] == 1024


def test_the_lora_template_runs_unchanged_with_its_lora_bypassed(executor: Executor) -> None:
    workflow = json.loads((TEMPLATES / "image_z_image_turbo_lora.flat.json").read_text())
    prompt = to_api(workflow, NODES)
    assert "48" not in prompt and prompt["47"]["inputs"]["model"] == ["46", 0]
    result = run(executor, prompt)
    assert Image.open(output_image(executor, result)).size == (1024, 1024)


def small(workflow: dict[str, Any], lora_mode: int) -> dict[str, Any]:
    """The LoRA template at 128² with its LoRA node switched on (mode 0) or left bypassed (4)."""
    workflow = copy.deepcopy(workflow)
    for node in workflow["nodes"]:
        if node["type"] == "LoraLoaderModelOnly":
            node["mode"] = lora_mode
        if node["type"] == "EmptySD3LatentImage":
            node["widgets_values"][:2] = [128, 128]
    return workflow


def test_switching_the_templates_lora_on_changes_the_image(executor: Executor) -> None:
    workflow = json.loads((TEMPLATES / "image_z_image_turbo_lora.flat.json").read_text())
    without = pixels(output_image(executor, run(executor, to_api(small(workflow, 4), NODES))))
    prompt = to_api(small(workflow, 0), NODES)
    assert prompt["47"]["inputs"]["model"] == ["48", 0]
    assert prompt["48"]["inputs"] == {"lora_name": LORA, "strength_model": 1, "model": ["46", 0]}
    with_lora = pixels(output_image(executor, run(executor, prompt)))
    assert np.abs(with_lora - without).mean() > 2


def lora_graph(lora: str | None, strength: float = 1.0, weight_dtype: str = "default") -> dict[str, Any]:
    prompt: dict[str, Any] = json.loads(TURBO_WORKFLOW.read_text())
    prompt["28"]["inputs"]["weight_dtype"] = weight_dtype
    prompt["13"]["inputs"].update(width=64, height=64)
    prompt["3"]["inputs"].update(steps=3, sampler_name="euler")
    if lora is not None:
        prompt["40"] = {
            "class_type": "LoraLoaderModelOnly",
            "inputs": {"model": ["28", 0], "lora_name": lora, "strength_model": strength},
        }
        prompt["11"]["inputs"]["model"] = ["40", 0]
    return prompt


def test_lora_formats_agree_and_strength_zero_changes_nothing(executor: Executor) -> None:
    def image(lora: str | None, strength: float = 1.0) -> np.ndarray:
        return pixels(output_image(executor, run(executor, lora_graph(lora, strength))))

    base = image(None)
    assert np.array_equal(image("ai-toolkit.safetensors", 0.0), base)
    toolkit = image("ai-toolkit.safetensors")
    assert np.abs(toolkit - base).mean() > 2
    assert np.abs(image("kohya.safetensors") - toolkit).max() <= 1
    assert np.abs(image("comfy-qkv.safetensors") - toolkit).max() <= 1
    half = image("ai-toolkit.safetensors", 0.5)
    assert 0 < np.abs(half - base).mean() < np.abs(toolkit - base).mean()
    # The patched weights are restored: the base model gives the same image afterwards.
    executor.free()
    assert np.array_equal(image(None), base)


@pytest.mark.parametrize("weight_dtype", ["fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"])
def test_fp8_weights_stay_close_and_take_loras(executor: Executor, weight_dtype: str) -> None:
    def image(lora: str | None, dtype: str) -> np.ndarray:
        return pixels(output_image(executor, run(executor, lora_graph(lora, weight_dtype=dtype))))

    base, fp8 = image(None, "default"), image(None, weight_dtype)
    assert 0 < np.abs(fp8 - base).mean() < 6  # close, and not silently the bf16 model
    toolkit, fp8_toolkit = image("ai-toolkit.safetensors", "default"), image("ai-toolkit.safetensors", weight_dtype)
    assert np.abs(fp8_toolkit - fp8).mean() > 2  # the LoRA is applied to the FP8 weights
    assert np.abs(fp8_toolkit - toolkit).mean() < 6
    assert np.array_equal(image(None, weight_dtype), fp8)  # and removed exactly afterwards


def test_concurrent_runs_share_one_model_and_a_lora_run_never_leaks_into_a_plain_one(executor: Executor) -> None:
    alone = Executor(NODES, executor.folders, Placement.choose("cpu"))  # its own cache: loads its own model
    base = pixels(output_image(alone, alone.run("alone", *_checked(executor, lora_graph(None)), {}, None)))
    jobs = {f"job{i}": lora_graph("ai-toolkit.safetensors" if i % 2 else None) for i in range(6)}
    for name, prompt in jobs.items():
        prompt["9"]["inputs"]["filename_prefix"] = name
    results: dict[str, RunResult] = {}

    def work(name: str) -> None:
        results[name] = executor.run(name, *_checked(executor, jobs[name]), {}, None)

    threads = [threading.Thread(target=work, args=(name,)) for name in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(r.ok for r in results.values()), [r.error for r in results.values()]
    loader = next(i for i, node in lora_graph(None).items() if node["class_type"] == "UNETLoader")
    assert sum(loader in r.executed for r in results.values()) == 1  # started together, loaded once
    for index, name in enumerate(jobs):
        image = pixels(output_image(executor, results[name]))
        if index % 2:
            assert np.abs(image - base).mean() > 2
        else:
            assert np.array_equal(image, base)


def _checked(executor: Executor, prompt: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    checked = validate(prompt, executor.folders)
    assert checked.ok
    return checked.prompt, checked.outputs


def test_loaderlora_with_a_clip_passes_the_clip_through(executor: Executor) -> None:
    prompt = lora_graph(None)
    prompt["40"] = {
        "class_type": "LoraLoader",
        "inputs": {
            "model": ["28", 0],
            "clip": ["30", 0],
            "lora_name": "kohya.safetensors",
            "strength_model": 1.0,
            "strength_clip": 1.0,
        },
    }
    prompt["11"]["inputs"]["model"] = ["40", 0]
    prompt["6"]["inputs"]["clip"] = ["40", 1]
    assert run(executor, prompt).ok


def test_a_lora_for_another_model_is_refused_by_name(executor: Executor, models: Path) -> None:
    pairs = {"layers.0.attention.to_q": (torch.zeros(2, 5), torch.zeros(7, 2))}
    write_diffusers(pairs, models / "loras" / "other-model.safetensors")
    checked = validate(lora_graph("other-model.safetensors"), executor.folders)
    result = executor.run("bad", checked.prompt, checked.outputs, {}, None)
    assert result.status == "error" and result.error is not None
    assert result.error["node_id"] == "40" and result.error["node_type"] == "LoraLoaderModelOnly"
    assert "other-model.safetensors" in result.error["exception_message"]
    assert "another model size" in result.error["exception_message"]


def test_smart_memory_gives_the_same_images_with_and_after_a_lora(executor: Executor) -> None:
    """On a fake card too small for the model, components move in and out; a LoRA is added to the weights
    where they are (some only in host memory) and taken off exactly: the image after it is the first one."""

    def image(runner: Executor, lora: str | None, seed: int) -> np.ndarray:
        prompt = lora_graph(lora)
        prompt["3"]["inputs"]["seed"] = seed
        return pixels(output_image(runner, run(runner, prompt)))

    cpu = torch.device("cpu")  # the execution device here; on a GPU the weights move to it
    residency = Residency(cpu, FixedBudget(2_500_000, calls_take=0))
    placement = Placement(cpu, torch.float32, torch.float32, memory_mode=MemoryMode.SMART, residency=residency)
    smart = Executor(NODES, executor.folders, placement)
    runs = [(None, 1), ("ai-toolkit.safetensors", 2), (None, 3)]  # new seeds: nothing comes from the cache
    for lora, seed in runs:
        assert np.array_equal(image(smart, lora, seed), image(executor, lora, seed)), (lora, seed)
    assert np.abs(image(executor, "ai-toolkit.safetensors", 3) - image(executor, None, 3)).mean() > 2
    assert len(residency._components()) == 3  # text encoder, transformer, VAE
    assert sum(residency.resident().values()) * 2**30 <= 2_500_000
    assert placement.concurrency_cap(2) == 1
    stats = smart.device_stats()
    assert stats["zimage_memory_mode"] == "smart"
    resident = stats["zimage_resident_gib"]
    assert isinstance(resident, dict) and sorted(resident) == sorted(c.name for c in residency._components())
    # POST /free with unload_models alone: out of the card, still loaded (and cached) in host memory.
    loaded = {id(module) for module in residency._modules}
    smart.free(caches=False)
    assert sum(residency.resident().values()) == 0 and len(residency._components()) == 3
    assert np.array_equal(image(smart, None, 4), image(executor, None, 4))
    assert sum(residency.resident().values()) > 0 and {id(module) for module in residency._modules} == loaded


def test_previews_of_split_files_use_a_map_fitted_from_their_vae(executor: Executor) -> None:
    """ComfyUI's split files bring no preview map: it is fitted from their VAE once it is loaded, and the
    runs after that one have previews (the latent's cells, as JPEG)."""
    prompt = to_api(json.loads((TEMPLATES / "image_z_image_turbo.subgraph.json").read_text()), NODES)
    prompt["57:13"]["inputs"].update(width=256, height=256)
    prompt["57:3"]["inputs"]["steps"] = 4
    checked = validate(prompt, executor.folders)
    events: list[tuple[str, dict[str, Any]]] = []
    for seed in (1, 2):  # the first run loads the VAE after its sampler has run
        checked.prompt["57:3"]["inputs"]["seed"] = seed
        result = executor.run(f"p{seed}", checked.prompt, checked.outputs, {}, lambda e, d: events.append((e, d)),
                              watched=lambda: True)  # fmt: skip
        assert result.ok, result.error
    previews = [data for event, data in events if event == "preview"]
    assert previews and all(data["node"] == "57:3" for data in previews)
    picture = Image.open(io.BytesIO(base64.b64decode(previews[-1]["data_base64"])))
    assert picture.format == "JPEG" and picture.size == (32, 32)
