"""Templates in UI format are made from the shipped API workflows; converting one back gives the same
prompt, so what the template browser opens is what the server runs."""

from __future__ import annotations

import pytest

from zimage_serve import workflows
from zimage_serve.errors import ZImageError
from zimage_serve.workflow.nodes import NODES
from zimage_serve.workflow.ui_export import to_ui
from zimage_serve.workflow.ui_format import to_api
from zimage_serve.workflows import templates


def plain(prompt: dict) -> dict:  # type: ignore[type-arg]
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in prompt.items()}


@pytest.mark.parametrize("template", templates.TEMPLATES, ids=lambda t: t.name)
def test_each_template_converts_back_to_its_workflow(template: templates.Template) -> None:
    prompt = workflows.load(template.workflow)
    ui = to_ui(prompt, NODES)
    assert plain(to_api(ui, NODES)) == plain(prompt)
    assert ui["last_link_id"] == len(ui["links"]) and {n["id"] for n in ui["nodes"]} == {int(k) for k in prompt}
    for link_id, origin, slot, target, target_slot, kind in ui["links"]:
        source = next(n for n in ui["nodes"] if n["id"] == origin)
        assert link_id in source["outputs"][slot]["links"] and source["outputs"][slot]["type"] == kind
        assert next(n for n in ui["nodes"] if n["id"] == target)["inputs"][target_slot]["link"] == link_id
    assert template.thumbnail.is_file()
    seeds = [n for n in ui["nodes"] if n["type"] == "KSampler"]
    assert seeds and seeds[0]["widgets_values"][1] == "fixed"  # the control value after the seed


def test_node_ids_must_be_numbers() -> None:
    with pytest.raises(ZImageError, match="number"):
        to_ui({"a": {"class_type": "EmptySD3LatentImage", "inputs": {}}}, NODES)


def test_the_index_lists_every_template() -> None:
    [category] = templates.index()
    names = [t["name"] for t in category["templates"]]
    assert names == [
        "zimage-nano",
        "01_get_started_text_to_image",  # ComfyUI's 4-step start, the first Z-Image-Turbo one offered
        "z-image-turbo",
        "image_z_image_turbo_int8",
        "z-image",
        "z-image-distill",
        "image_z_image_int8",
    ]
    assert all(t["mediaSubtype"] == "webp" and t["description"] for t in category["templates"])
