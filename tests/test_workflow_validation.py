"""Validation gives ComfyUI's error types and node_errors shape, and never raises, for any JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.workflows import nano_prompt, validate
from zimage_serve.workflow.folders import Folders

KNOWN_TYPES = {
    "invalid_prompt",
    "missing_node_type",
    "prompt_no_outputs",
    "prompt_outputs_failed_validation",
    "required_input_missing",
    "bad_linked_input",
    "return_type_mismatch",
    "exception_during_inner_validation",
    "invalid_input_type",
    "value_smaller_than_min",
    "value_bigger_than_max",
    "value_not_in_list",
    "custom_validation_failed",
}


@pytest.fixture
def folders(tmp_path: Path) -> Folders:
    return Folders.default(tmp_path)


def only_error(prompt: dict[str, Any], folders: Folders) -> tuple[str, dict[str, Any]]:
    """The single (node id, reason) the prompt fails with; checks the surrounding shape on the way."""
    result = validate(prompt, folders)
    assert not result.ok
    assert result.error is not None and result.error["type"] == "prompt_outputs_failed_validation"
    assert result.error["message"] == "Prompt outputs failed validation"
    assert set(result.error) == {"type", "message", "details", "extra_info"}
    [(node_id, entry)] = result.node_errors.items()
    assert set(entry) == {"errors", "dependent_outputs", "class_type"}
    assert entry["dependent_outputs"] == ["9"]
    assert entry["class_type"] == prompt[node_id]["class_type"]
    [reason] = entry["errors"]
    assert set(reason) == {"type", "message", "details", "extra_info"}
    assert f"{reason['message']}: {reason['details']}" in result.error["details"]
    return node_id, reason


def test_the_nano_workflow_is_valid_and_coerced(folders: Folders) -> None:
    prompt = nano_prompt()
    prompt["3"]["inputs"]["steps"] = "8"
    prompt["3"]["inputs"]["cfg"] = 1
    result = validate(prompt, folders)
    assert result.ok and result.outputs == ["9"] and result.node_errors == {}
    assert result.prompt["3"]["inputs"]["steps"] == 8
    assert isinstance(result.prompt["3"]["inputs"]["cfg"], float)
    assert prompt["3"]["inputs"]["steps"] == "8"  # the caller's prompt is not modified


def test_missing_and_unknown_class_type(folders: Folders) -> None:
    prompt = nano_prompt()
    del prompt["3"]["class_type"]
    result = validate(prompt, folders)
    assert result.error == {
        "type": "invalid_prompt",
        "message": "Cannot execute because a node is missing the class_type property.",
        "details": "Node ID '#3'",
        "extra_info": {},
    }
    prompt = nano_prompt()
    prompt["3"]["class_type"] = "KSamplerTurbo"
    prompt["3"]["_meta"] = {"title": "My sampler"}
    result = validate(prompt, folders)
    assert result.error == {
        "type": "missing_node_type",
        "message": "Node 'KSamplerTurbo' not found. The custom node may not be installed.",
        "details": "Node ID '#3'",
        "extra_info": {"node_id": "3", "class_type": "KSamplerTurbo", "node_title": "My sampler"},
    }


def test_no_output_node(folders: Folders) -> None:
    prompt = nano_prompt()
    del prompt["9"]
    result = validate(prompt, folders)
    assert result.error == {
        "type": "prompt_no_outputs",
        "message": "Prompt has no outputs",
        "details": "",
        "extra_info": {},
    }
    assert validate(nano_prompt(), folders, targets=["8"]).error["type"] == "prompt_no_outputs"  # type: ignore[index]


def test_required_input_missing(folders: Folders) -> None:
    prompt = nano_prompt()
    del prompt["3"]["inputs"]["model"]
    node_id, reason = only_error(prompt, folders)
    assert node_id == "3"
    assert reason == {
        "type": "required_input_missing",
        "message": "Required input is missing",
        "details": "model",
        "extra_info": {"input_name": "model"},
    }


@pytest.mark.parametrize("value", [["11"], ["11", 0, 1], [None, 0], ["11", "0"], ["11", 0.5], ["11", True]])
def test_bad_linked_input(folders: Folders, value: list[Any]) -> None:
    prompt = nano_prompt()
    prompt["3"]["inputs"]["model"] = value
    node_id, reason = only_error(prompt, folders)
    assert (node_id, reason["type"], reason["details"]) == ("3", "bad_linked_input", "model")
    assert reason["extra_info"]["input_name"] == "model"


def test_constant_where_a_link_is_needed(folders: Folders) -> None:
    prompt = nano_prompt()
    prompt["3"]["inputs"]["model"] = "zimage-nano"
    node_id, reason = only_error(prompt, folders)
    assert (node_id, reason["type"]) == ("3", "bad_linked_input")


def test_return_type_mismatch(folders: Folders) -> None:
    prompt = nano_prompt()
    prompt["3"]["inputs"]["model"] = ["30", 0]  # a CLIP where a MODEL goes
    node_id, reason = only_error(prompt, folders)
    assert node_id == "3" and reason["type"] == "return_type_mismatch"
    assert reason["message"] == "Return type mismatch between linked nodes"
    assert reason["details"] == "model, received_type(CLIP) mismatch input_type(MODEL)"
    assert reason["extra_info"]["received_type"] == "CLIP"
    assert reason["extra_info"]["linked_node"] == ["30", 0]


def test_link_to_a_missing_node_or_output(folders: Folders) -> None:
    prompt = nano_prompt()
    prompt["8"]["inputs"]["samples"] = ["12", 0]
    node_id, reason = only_error(prompt, folders)
    assert node_id == "8" and reason["type"] == "exception_during_inner_validation"
    assert "'12' does not exist" in reason["details"]
    assert reason["extra_info"]["input_name"] == "samples"
    prompt = nano_prompt()
    prompt["8"]["inputs"]["samples"] = ["3", 1]
    node_id, reason = only_error(prompt, folders)
    assert node_id == "8" and "has no output 1" in reason["details"]


def test_cycle(folders: Folders) -> None:
    prompt = nano_prompt()
    prompt["13"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["8", 0], "vae": ["29", 0]}}
    result = validate(prompt, folders)
    assert result.error is not None and result.error["type"] == "prompt_outputs_failed_validation"
    cyclic = {
        nid
        for nid, entry in result.node_errors.items()
        for r in entry["errors"]
        if r["extra_info"].get("exception_type") == "graph.DependencyCycleError"
    }
    assert cyclic == {"3", "8", "13"}
    assert "dependency cycle" in result.error["details"]


@pytest.mark.parametrize(("name", "value"), [("steps", "eight"), ("steps", None), ("cfg", "nan"), ("seed", [1])])
def test_invalid_input_type(folders: Folders, name: str, value: Any) -> None:
    prompt = nano_prompt()
    prompt["3"]["inputs"][name] = {"__value__": value} if isinstance(value, list) else value
    node_id, reason = only_error(prompt, folders)
    assert node_id == "3" and reason["type"] == "invalid_input_type"
    assert reason["message"].startswith("Failed to convert an input value to a ")
    assert reason["extra_info"]["input_name"] == name


def test_range_checks(folders: Folders) -> None:
    prompt = nano_prompt()
    prompt["3"]["inputs"]["steps"] = 200000
    _, reason = only_error(prompt, folders)
    assert reason == {
        "type": "value_bigger_than_max",
        "message": "Value 200000 bigger than max of 10000",
        "details": "steps",
        "extra_info": {
            "input_name": "steps",
            "input_config": [
                "INT",
                {
                    "default": 20,
                    "min": 1,
                    "max": 10000,
                    "step": 1,
                    "tooltip": "The number of steps used in the denoising process.",
                },
            ],
            "received_value": 200000,
        },
    }
    prompt = nano_prompt()
    prompt["3"]["inputs"]["denoise"] = -0.5
    _, reason = only_error(prompt, folders)
    assert reason["type"] == "value_smaller_than_min" and reason["message"] == "Value -0.5 smaller than min of 0.0"


def test_value_not_in_list(folders: Folders) -> None:
    prompt = nano_prompt()
    prompt["3"]["inputs"]["sampler_name"] = "dpmpp_3m_sde"
    node_id, reason = only_error(prompt, folders)
    assert node_id == "3" and reason["type"] == "value_not_in_list"
    from zimage_serve.engine.names import SAMPLERS

    choices = str(list(SAMPLERS))  # ComfyUI's wording: the Python list of the choices
    assert "'uni_pc'" in choices
    assert reason["details"] == f"sampler_name: 'dpmpp_3m_sde' not in {choices}"
    prompt = nano_prompt()
    prompt["28"]["inputs"]["unet_name"] = "z_image_turbo_bf16.safetensors"
    node_id, reason = only_error(prompt, folders)
    assert node_id == "28" and "not in ['zimage-nano']" in reason["details"]


def test_custom_validation_of_load_image(folders: Folders) -> None:
    prompt = nano_prompt()
    prompt["20"] = {"class_type": "LoadImage", "inputs": {"image": "missing.png"}}
    prompt["21"] = {"class_type": "PreviewImage", "inputs": {"images": ["20", 0]}}
    result = validate(prompt, folders)
    assert result.ok and result.outputs == ["9"]  # the good output still runs
    [reason] = result.node_errors["20"]["errors"]
    assert result.node_errors["20"]["dependent_outputs"] == ["21"]
    assert reason["type"] == "custom_validation_failed"
    assert reason["details"] == "image - Invalid image file: missing.png"
    folders.input.mkdir(parents=True)
    (folders.input / "broken.png").write_bytes(b"not a png")
    Image.new("RGB", (8, 8)).save(folders.input / "ok.png")
    prompt["20"]["inputs"]["image"] = "broken.png"
    assert validate(prompt, folders).node_errors["20"]["errors"][0]["type"] == "custom_validation_failed"
    prompt["20"]["inputs"]["image"] = "ok.png"
    assert validate(prompt, folders).node_errors == {}


def test_only_nodes_reachable_from_outputs_are_checked(folders: Folders) -> None:
    prompt = nano_prompt()
    prompt["50"] = {"class_type": "KSampler", "inputs": {"steps": -4}}
    assert validate(prompt, folders).ok


def test_partial_execution_targets(folders: Folders) -> None:
    prompt = nano_prompt()
    prompt["21"] = {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}
    assert validate(prompt, folders).outputs == ["9", "21"]
    assert validate(prompt, folders, targets=["21"]).outputs == ["21"]


# -- anything at all ---------------------------------------------------------------------------------------
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=12,
)
NODE_IDS = st.sampled_from(["3", "6", "8", "9", "11", "13", "28", "29", "30", "33", "99", "x"])
INPUT_NAMES = st.sampled_from(
    [
        "model",
        "seed",
        "steps",
        "cfg",
        "sampler_name",
        "scheduler",
        "positive",
        "negative",
        "latent_image",
        "denoise",
        "samples",
        "vae",
        "images",
        "text",
        "clip",
        "width",
        "unet_name",
        "shift",
        "filename_prefix",
    ]
)
VALUES = JSON | st.tuples(NODE_IDS | st.integers(), st.integers(-2, 4) | JSON).map(list)


@st.composite
def mutated_prompts(draw: st.DrawFn) -> dict[str, Any]:
    prompt: dict[str, Any] = nano_prompt()
    for _ in range(draw(st.integers(1, 4))):
        node_id = draw(NODE_IDS)
        action = draw(st.sampled_from(["value", "delete", "class", "node", "inputs"]))
        node = prompt.get(node_id)
        if action == "node" or not isinstance(node, dict):
            prompt[node_id] = draw(JSON)
        elif action == "class":
            node["class_type"] = draw(JSON | st.sampled_from(["KSampler", "SaveImage", "VAEDecode"]))
        elif action == "inputs":
            node["inputs"] = draw(JSON)
        elif action == "delete" and isinstance(node.get("inputs"), dict) and node["inputs"]:
            node["inputs"].pop(draw(st.sampled_from(sorted(node["inputs"]))))
        elif isinstance(node.get("inputs"), dict):
            node["inputs"][draw(INPUT_NAMES)] = draw(VALUES)
    return prompt


def assert_well_formed(result: Any) -> None:
    json.dumps(result.error)
    json.dumps(result.node_errors)
    if result.error is not None:
        assert result.error["type"] in KNOWN_TYPES
    for entry in result.node_errors.values():
        for reason in entry["errors"]:
            assert reason["type"] in KNOWN_TYPES
            assert isinstance(reason["message"], str) and isinstance(reason["details"], str)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=mutated_prompts())
def test_mutated_graphs_validate_without_raising(tmp_path: Path, prompt: dict[str, Any]) -> None:
    assert_well_formed(validate(prompt, Folders.default(tmp_path)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=JSON)
def test_arbitrary_json_is_refused_cleanly(tmp_path: Path, prompt: Any) -> None:
    result = validate(prompt, Folders.default(tmp_path))
    assert not result.ok
    assert_well_formed(result)


BREAKAGES = [
    ("3", "steps", 0),
    ("3", "model", ["30", 0]),
    ("3", "model", ["nope", 0]),
    ("8", "samples", "3"),
    ("3", "scheduler", "ddim_uniform"),
    ("13", "width", 10**9),
]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(breakage=st.sampled_from(BREAKAGES), noise=mutated_prompts())
def test_a_broken_input_is_always_reported(tmp_path: Path, breakage: tuple[str, str, Any], noise: Any) -> None:
    prompt = nano_prompt()
    node_id, name, value = breakage
    prompt[node_id]["inputs"][name] = value
    result = validate(prompt, Folders.default(tmp_path))
    assert not result.ok and result.error is not None
    assert result.error["type"] == "prompt_outputs_failed_validation"
    assert node_id in result.node_errors or any(
        r["extra_info"].get("input_name") == name for e in result.node_errors.values() for r in e["errors"]
    )
