"""Shared helpers for workflow tests: the shipped workflows and a runner around validate + execute."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from zimage_serve import workflows
from zimage_serve.workflow.execute import Executor, RunResult
from zimage_serve.workflow.folders import Folders
from zimage_serve.workflow.nodes import NODES
from zimage_serve.workflow.validate import ValidationResult, Validator

ROOT = Path(__file__).resolve().parents[1]
NANO_WORKFLOW = workflows.NANO
TURBO_WORKFLOW = workflows.TURBO
TEMPLATES = Path(__file__).resolve().parent / "fixtures" / "workflows"  # the official templates, vendored
SHARED_TEMPLATES = ROOT.parent / "shared" / "fixtures" / "workflows"


def nano_prompt() -> dict[str, Any]:
    return copy.deepcopy(json.loads(NANO_WORKFLOW.read_text()))


def validate(prompt: Any, folders: Folders, targets: list[str] | None = None) -> ValidationResult:
    return Validator(NODES, folders).validate(prompt, targets)


def run(executor: Executor, prompt: dict[str, Any], prompt_id: str = "p", events: list[Any] | None = None) -> RunResult:
    checked = validate(prompt, executor.folders)
    assert checked.ok, (checked.error, checked.node_errors)

    def emit(event: str, data: dict[str, Any]) -> None:
        if events is not None:
            events.append((event, data))

    return executor.run(prompt_id, checked.prompt, checked.outputs, {}, emit)


def saved_image(executor: Executor, prompt: dict[str, Any], node: str | None = None) -> Any:
    """Run `prompt` and read back the first image its save node (`node`, or the only output) wrote, as
    int16 pixels so differences do not wrap."""
    import numpy as np
    from PIL import Image

    checked = validate(prompt, executor.folders)
    assert checked.ok, (checked.error, checked.node_errors)
    result = executor.run("saved", checked.prompt, checked.outputs, {}, None)
    assert result.ok, result.error
    ui = result.outputs[node] if node is not None else next(iter(result.outputs.values()))
    entry = ui["images"][0]
    return np.asarray(Image.open(executor.folders.output / entry["subfolder"] / entry["filename"]), dtype=np.int16)


def img2img_workflow() -> dict[str, Any]:
    workflow = nano_prompt()
    workflow["20"] = {"class_type": "LoadImage", "inputs": {"image": "start.png"}}
    workflow["21"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["20", 0], "vae": ["29", 0]}}
    workflow["3"]["inputs"].update(latent_image=["21", 0], denoise=0.6)
    del workflow["13"]
    workflow["41"] = {
        "class_type": "LoraLoader",
        "inputs": {"model": ["28", 0], "clip": ["30", 0], "lora_name": "style.safetensors"},
    }
    workflow["41"]["inputs"].update(strength_model=0.8, strength_clip=1.0)
    workflow["11"]["inputs"]["model"] = ["41", 0]
    workflow["6"]["inputs"]["clip"] = ["41", 1]
    return workflow


# -- rendering -----------------------------------------------------------------------------------------


def nested_subgraphs(levels: int, copies: int) -> dict[str, Any]:
    """A UI-format workflow whose subgraph i holds `copies` instances of subgraph i + 1 (`levels` of them),
    the last one a single empty latent: it flattens to copies ** levels nodes."""
    subgraphs: list[dict[str, Any]] = [
        {"id": f"s{i}", "nodes": [{"id": j, "type": f"s{i + 1}"} for j in range(copies)], "links": []}
        for i in range(levels)
    ]
    leaf = {"id": 1, "type": "EmptySD3LatentImage", "widgets_values": [64, 64, 1], "inputs": []}
    subgraphs.append({"id": f"s{levels}", "nodes": [leaf], "links": []})
    return {"nodes": [{"id": 1, "type": "s0"}], "links": [], "definitions": {"subgraphs": subgraphs}}
