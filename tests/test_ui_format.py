"""UI-format workflows convert to the API prompts ComfyUI's frontend would queue."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.workflows import SHARED_TEMPLATES, TEMPLATES, nested_subgraphs
from zimage_serve.limits import Limits
from zimage_serve.workflow.nodes import NODES
from zimage_serve.workflow.ui_format import WorkflowFormatError, WorkflowTooLarge, _Converter, is_api_format, to_api


def node(
    id_: int,
    type_: str,
    widgets: Any = None,
    inputs: list[tuple[str, str, int | None]] = (),
    mode: int = 0,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "id": id_,
        "type": type_,
        "mode": mode,
        "widgets_values": widgets if widgets is not None else [],
        "inputs": [{"name": n, "type": t, "link": link} for n, t, link in inputs],
        **extra,
    }


def graph() -> dict[str, Any]:
    """UNET → shift → KSampler ← text encode, → decode → save; links as the frontend writes them."""
    return {
        "version": 0.4,
        "nodes": [
            node(1, "UNETLoader", ["zimage-nano", "default"]),
            node(2, "CLIPLoader", ["zimage-nano", "lumina2", "default"]),
            node(3, "VAELoader", ["zimage-nano"]),
            node(4, "CLIPTextEncode", ["a red circle"], [("clip", "CLIP", 2)]),
            node(5, "ConditioningZeroOut", [], [("conditioning", "CONDITIONING", 3)]),
            node(6, "EmptySD3LatentImage", [128, 128, 1]),
            node(7, "ModelSamplingAuraFlow", [3], [("model", "MODEL", 1)]),
            node(
                8,
                "KSampler",
                [42, "randomize", 8, 1, "euler", "simple", 1],
                [
                    ("model", "MODEL", 4),
                    ("positive", "CONDITIONING", 5),
                    ("negative", "CONDITIONING", 6),
                    ("latent_image", "LATENT", 7),
                ],
            ),
            node(9, "VAEDecode", [], [("samples", "LATENT", 8), ("vae", "VAE", 9)]),
            node(10, "SaveImage", ["ui"], [("images", "IMAGE", 10)]),
            node(11, "Note", ["just a note"]),
        ],
        "links": [
            [1, 1, 0, 7, 0, "MODEL"],
            [2, 2, 0, 4, 0, "CLIP"],
            [3, 4, 0, 5, 0, "CONDITIONING"],
            [4, 7, 0, 8, 0, "MODEL"],
            [5, 4, 0, 8, 1, "CONDITIONING"],
            [6, 5, 0, 8, 2, "CONDITIONING"],
            [7, 6, 0, 8, 3, "LATENT"],
            [8, 8, 0, 9, 0, "LATENT"],
            [9, 3, 0, 9, 1, "VAE"],
            [10, 9, 0, 10, 0, "IMAGE"],
        ],
    }


def test_widgets_and_links_become_named_inputs() -> None:
    prompt = to_api(graph(), NODES)
    assert is_api_format(prompt) and "11" not in prompt  # notes are not sent
    assert prompt["8"] == {
        "class_type": "KSampler",
        "inputs": {
            "seed": 42,
            "steps": 8,
            "cfg": 1,
            "sampler_name": "euler",
            "scheduler": "simple",
            "denoise": 1,
            "model": ["7", 0],
            "positive": ["4", 0],
            "negative": ["5", 0],
            "latent_image": ["6", 0],
        },
        "_meta": {"title": "KSampler"},
    }
    assert prompt["2"]["inputs"] == {"clip_name": "zimage-nano", "type": "lumina2", "device": "default"}


def test_api_format_passes_through_unchanged() -> None:
    api = {"1": {"class_type": "SaveImage", "inputs": {}}}
    assert to_api(api, NODES) == api


def test_muted_nodes_are_dropped_with_their_links() -> None:
    workflow = graph()
    workflow["nodes"][4]["mode"] = 2  # ConditioningZeroOut muted
    prompt = to_api(workflow, NODES)
    assert "5" not in prompt and "negative" not in prompt["8"]["inputs"]


def test_bypassed_nodes_pass_their_matching_input_through() -> None:
    workflow = graph()
    workflow["nodes"][6]["mode"] = 4  # ModelSamplingAuraFlow bypassed
    prompt = to_api(workflow, NODES)
    assert "7" not in prompt and prompt["8"]["inputs"]["model"] == ["1", 0]
    workflow["nodes"][4]["mode"] = 4  # a bypassed ConditioningZeroOut hands on the positive conditioning
    assert to_api(workflow, NODES)["8"]["inputs"]["negative"] == ["4", 0]


def test_reroutes_and_primitives_are_resolved() -> None:
    workflow = graph()
    workflow["nodes"].append(node(20, "Reroute", [], [("", "*", 11)]))
    workflow["nodes"].append(node(21, "PrimitiveNode", [7, "fixed"]))
    workflow["nodes"][7]["inputs"].append({"name": "seed", "type": "INT", "link": 12, "widget": {"name": "seed"}})
    workflow["links"] = [link for link in workflow["links"] if link[0] != 8]
    workflow["links"] += [
        [8, 8, 0, 20, 0, "LATENT"],
        [11, 8, 0, 20, 0, "*"],
        [13, 20, 0, 9, 0, "LATENT"],
        [12, 21, 0, 8, 4, "INT"],
    ]
    workflow["nodes"][8]["inputs"][0]["link"] = 13
    prompt = to_api(workflow, NODES)
    assert "20" not in prompt and "21" not in prompt
    assert prompt["9"]["inputs"]["samples"] == ["8", 0]
    assert prompt["8"]["inputs"]["seed"] == 7


def test_version_1_links_are_objects() -> None:
    workflow = graph()
    workflow["links"] = [
        {"id": k[0], "origin_id": k[1], "origin_slot": k[2], "target_id": k[3], "target_slot": k[4], "type": k[5]}
        for k in workflow["links"]
    ]
    assert to_api(workflow, NODES) == to_api(graph(), NODES)


@pytest.mark.skipif(not SHARED_TEMPLATES.is_dir(), reason="the project's shared fixtures are not beside this clone")
def test_the_vendored_templates_are_the_shared_ones() -> None:
    for name in ("image_z_image_turbo.subgraph.json", "image_z_image_turbo_lora.flat.json"):
        assert (TEMPLATES / name).read_bytes() == (SHARED_TEMPLATES / name).read_bytes()


def test_the_subgraph_template_flattens_with_colon_ids() -> None:
    workflow = json.loads((TEMPLATES / "image_z_image_turbo.subgraph.json").read_text())
    prompt = to_api(workflow, NODES)
    assert sorted(prompt) == sorted(
        ["9", "57:3", "57:8", "57:11", "57:13", "57:27", "57:28", "57:29", "57:30", "57:33"]
    )
    assert prompt["9"]["inputs"]["images"] == ["57:8", 0]
    assert prompt["57:3"]["inputs"]["model"] == ["57:11", 0]
    assert prompt["57:3"]["inputs"]["seed"] == 0 and prompt["57:13"]["inputs"]["width"] == 1024
    assert prompt["57:27"]["inputs"]["text"].startswith("Latina female")


def test_a_subgraph_input_fed_from_outside() -> None:
    workflow = json.loads((TEMPLATES / "image_z_image_turbo.subgraph.json").read_text())
    workflow["nodes"].append(node(70, "PrimitiveNode", ["一只猫"]))
    instance = next(n for n in workflow["nodes"] if n["id"] == 57)
    instance["inputs"][0]["link"] = 99
    workflow["links"].append([99, 70, 0, 57, 0, "STRING"])
    assert to_api(workflow, NODES)["57:27"]["inputs"]["text"] == "一只猫"


@pytest.mark.parametrize(
    ("workflow", "message"),
    [
        ({"nodes": "x"}, "not a ComfyUI workflow"),
        ({"nodes": [{"type": "KSampler"}]}, "needs an id and a type"),
        ({"nodes": [], "links": [[1, 2]]}, "malformed link"),
        ({"nodes": [], "links": {}}, "'links' must be a list"),
        ([], "not a ComfyUI workflow"),
        ({"prompt": {}}, "not a ComfyUI workflow"),
    ],
)
def test_malformed_workflows_are_refused_clearly(workflow: Any, message: str) -> None:
    with pytest.raises(WorkflowFormatError, match=message):
        to_api(workflow, NODES)


def test_a_subgraph_that_contains_itself_is_refused() -> None:
    sub = {"id": "loop", "nodes": [node(1, "loop")], "links": [], "inputs": [], "outputs": []}
    workflow = {"nodes": [node(5, "loop")], "links": [], "definitions": {"subgraphs": [sub]}}
    with pytest.raises(WorkflowFormatError, match="subgraph loop contains itself"):
        to_api(workflow, NODES)


def test_subgraphs_that_multiply_are_refused_before_they_are_flattened(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ten levels of four copies: 2.6 KB of JSON that would flatten to 4^10 = 1,048,576 nodes."""
    bomb = nested_subgraphs(10, 4)
    assert len(json.dumps(bomb)) < 4000
    flattened: list[str] = []
    monkeypatch.setattr(_Converter, "_add_graph", lambda *args, **kwargs: flattened.append("a graph"))
    with pytest.raises(WorkflowTooLarge, match=r"flattens to 1,048,576 nodes in a graph .* 500 .*--max-nodes"):
        to_api(bomb, NODES)
    assert flattened == []  # nothing was built


def test_the_node_limit_counts_what_the_subgraphs_flatten_to() -> None:
    assert len(to_api(nested_subgraphs(4, 3), NODES)) == 81  # 3^4 latent nodes, all within the default 500
    with pytest.raises(WorkflowTooLarge, match="243 nodes"):
        to_api(nested_subgraphs(5, 3), NODES, Limits(nodes=242))
    assert len(to_api(nested_subgraphs(5, 3), NODES, Limits(nodes=243))) == 243


def test_subgraphs_nested_too_deep_are_refused() -> None:
    assert len(to_api(nested_subgraphs(15, 1), NODES)) == 1  # subgraphs s0 ... s15: 16 deep
    with pytest.raises(WorkflowTooLarge, match="nested more than 16 deep"):
        to_api(nested_subgraphs(16, 1), NODES)


JUNK = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 60) | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "id",
                    "type",
                    "mode",
                    "inputs",
                    "links",
                    "nodes",
                    "widgets_values",
                    "name",
                    "link",
                    "definitions",
                    "subgraphs",
                    "origin_id",
                    "target_id",
                    "origin_slot",
                    "target_slot",
                ]
            ),
            inner,
            max_size=5,
        )
    ),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None)
@given(workflow=st.fixed_dictionaries({"nodes": st.lists(JUNK, max_size=5), "links": JUNK}))
def test_junk_ui_workflows_give_a_format_error_or_a_prompt(workflow: dict[str, Any]) -> None:
    try:
        prompt = to_api(workflow, NODES)
    except WorkflowFormatError:
        return
    assert isinstance(prompt, dict)
    json.dumps(prompt)
