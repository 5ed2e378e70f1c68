"""API-format prompts as UI-format workflows (what the frontend opens): the inverse of `ui_format.to_api`.

Used for the templates the frontend's template browser offers, made from the API workflows the package
ships, so a template and the workflow the server runs can never drift apart (a test converts each back
and compares). Nodes are laid out in columns by their depth in the graph.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from zimage_serve.errors import ZImageError
from zimage_serve.workflow.spec import Combo, Int, Link, Node
from zimage_serve.workflow.validate import is_link

COLUMN_PX, ROW_PX, WIDTH_PX = 360, 200, 320


def to_ui(prompt: Mapping[str, Any], nodes: Mapping[str, type[Node]]) -> dict[str, Any]:
    """A UI-format workflow of `prompt` (API format). Node ids must be whole numbers, as the frontend's."""
    ids = {node_id: _number(node_id) for node_id in prompt}
    links: list[list[Any]] = []
    outputs: dict[str, dict[int, list[int]]] = {node_id: {} for node_id in prompt}
    ui_nodes = []
    depth = _depths(prompt)
    rows: dict[int, int] = {}
    for order, (node_id, node) in enumerate(prompt.items()):
        node_class = nodes[node["class_type"]]
        inputs: list[dict[str, Any]] = []
        widgets: list[Any] = []
        for name, declared in node_class.all_inputs().items():
            value = node["inputs"].get(name)
            linked = is_link(value)
            if linked:
                links.append([len(links) + 1, ids[value[0]], int(value[1]), ids[node_id], len(inputs), ""])
                source_class = nodes[prompt[value[0]]["class_type"]]
                links[-1][5] = source_class.outputs[int(value[1])].type
                outputs[value[0]].setdefault(int(value[1]), []).append(len(links))
                entry: dict[str, Any] = {"name": name, "type": links[-1][5], "link": len(links)}
                if not isinstance(declared, Link):
                    entry["widget"] = {"name": name}
                inputs.append(entry)
            elif isinstance(declared, Link):
                inputs.append({"name": name, "type": declared.link_type, "link": None})
            if isinstance(declared, Link):
                continue
            widgets.append(None if linked else value)
            if isinstance(declared, Int) and declared.control_after_generate:
                widgets.append("fixed")  # a template's seed stays as written
            elif isinstance(declared, Combo) and declared.options.get("image_upload"):
                widgets.append("image")  # the upload button's placeholder, as the frontend saves it
        column = depth[node_id]
        row = rows.get(column, 0)
        rows[column] = row + 1
        ui_nodes.append(
            {
                "id": ids[node_id],
                "type": node["class_type"],
                "pos": [column * COLUMN_PX, row * ROW_PX],
                "size": [WIDTH_PX, 60 + 26 * (len(widgets) + len(inputs))],
                "flags": {},
                "order": order,
                "mode": 0,
                "inputs": inputs,
                "outputs": [],
                "properties": {"Node name for S&R": node["class_type"]},
                "widgets_values": widgets,
                **({"title": node["_meta"]["title"]} if node.get("_meta", {}).get("title") else {}),
            }
        )
    for ui_node, node_id in zip(ui_nodes, prompt, strict=True):
        node_class = nodes[prompt[node_id]["class_type"]]
        ui_node["outputs"] = [
            {
                "name": out.name or out.type,
                "type": out.type,
                "links": outputs[node_id].get(slot, []),
                "slot_index": slot,
            }
            for slot, out in enumerate(node_class.outputs)
        ]
    return {
        "last_node_id": max(ids.values(), default=0),
        "last_link_id": len(links),
        "nodes": ui_nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 0.8, "offset": [40, 40]}},
        "version": 0.4,
    }


def _number(node_id: str) -> int:
    if not str(node_id).isdigit():
        raise ZImageError(f"node id {node_id!r}: UI-format workflows number their nodes")
    return int(node_id)


def _depths(prompt: Mapping[str, Any]) -> dict[str, int]:
    """Each node's column: one past the deepest node it reads from."""
    found: dict[str, int] = {}

    def depth(node_id: str, seen: frozenset[str]) -> int:
        if node_id in found:
            return found[node_id]
        if node_id in seen:
            raise ZImageError(f"dependency cycle through node {node_id}")
        sources = [v[0] for v in prompt[node_id]["inputs"].values() if is_link(v) and v[0] in prompt]
        found[node_id] = 1 + max((depth(s, seen | {node_id}) for s in sources), default=-1)
        return found[node_id]

    for node_id in prompt:
        depth(node_id, frozenset())
    return found
