"""API-format prompts as UI-format workflows (what the frontend opens): the inverse of `ui_format.to_api`.

Used for the templates the frontend's template browser offers, made from the API workflows the package
ships, so a template and the workflow the server runs can never drift apart (a test converts each back
and compares).

The layout must be readable where it opens. The frontend (1.58) fits a template from its browser to the
window, with a margin (litegraph's fitToBounds: 75 % of the window), whatever view the file carries; below
a scale of about 0.57 it draws nodes as blank boxes. One column per depth made the templates 2,100 units
wide, fitted at 49 % in a 1400-pixel window. So whole depths are stacked into columns, cut where the graph
best fits such a window: the templates take 1,120 × 724 units and open at 91 %. The file also carries a
view at a readable scale with the graph's top-left in view (`extra.ds`), which the frontend uses where it
restores a workflow's view (a saved or dropped file).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from zimage_serve.errors import ZImageError
from zimage_serve.workflow.spec import Autogrow, Combo, Int, Link, Node, String
from zimage_serve.workflow.validate import is_link

# litegraph's measures (graph units): a node's title bar, one slot row, one widget row with its margin.
TITLE_PX, SLOT_PX, WIDGET_PX, PAD_PX = 30, 20, 24, 14
TEXT_PX = 120  # a multiline text box
PREVIEW_PX = 200  # the image an output node shows
WIDTH_PX, WIDE_PX = 300, 400  # nodes; nodes with a text box
GAP_X, GAP_Y = 60, 30
FIT_WINDOW = (1400, 900)  # the window a layout is chosen for: a laptop's browser, the web UI tests' too
# The view the file carries: the whole graph in a 1280 × 800 window when it fits at a readable scale.
VIEW = (1280, 800)
MARGIN = (50, 70)  # screen pixels left and above the graph (the frontend's menus float over the canvas)
SCALES = (0.8, 1.0)  # never smaller (nodes turn to blank boxes near 0.57), never larger than life


def to_ui(prompt: Mapping[str, Any], nodes: Mapping[str, type[Node]]) -> dict[str, Any]:
    """A UI-format workflow of `prompt` (API format). Node ids must be whole numbers, as the frontend's."""
    ids = {node_id: _number(node_id) for node_id in prompt}
    links: list[list[Any]] = []
    outputs: dict[str, dict[int, list[int]]] = {node_id: {} for node_id in prompt}
    ui_nodes = []
    for order, (node_id, node) in enumerate(prompt.items()):
        node_class = nodes[node["class_type"]]
        inputs: list[dict[str, Any]] = []
        widgets: list[Any] = []
        for name, declared in node_class.inputs_for(node["inputs"]).items():
            if isinstance(declared, Autogrow):  # its members follow it, each an input of its own
                continue
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
        ui_nodes.append(
            {
                "id": ids[node_id],
                "type": node["class_type"],
                "pos": [0, 0],  # placed below, once every node's size is known
                "size": list(_size(node_class, len(widgets))),
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
    _place(ui_nodes, [_depths(prompt)[node_id] for node_id in prompt])
    return {
        "last_node_id": max(ids.values(), default=0),
        "last_link_id": len(links),
        "nodes": ui_nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": view(ui_nodes)},
        "version": 0.4,
    }


def _size(node_class: type[Node], widgets: int) -> tuple[int, int]:
    """A node's size below its title, as litegraph measures one: slot rows, widget rows, a text box, a preview."""
    declared = node_class.all_inputs().values()
    links = sum(1 for d in declared if isinstance(d, Link))
    texts = sum(1 for d in declared if isinstance(d, String) and d.multiline)
    height = max(links, len(node_class.outputs), 1) * SLOT_PX + widgets * WIDGET_PX + texts * TEXT_PX + PAD_PX
    if node_class.output_node and not node_class.outputs:
        height += PREVIEW_PX
    return (WIDE_PX if texts else WIDTH_PX), height


def _place(ui_nodes: list[dict[str, Any]], depths: list[int]) -> None:
    """Columns of whole depths, left to right (a deeper node is below or right of the nodes it reads, so
    links run down and to the right), cut where the graph fits a FIT_WINDOW window at the largest scale."""
    levels: dict[int, list[dict[str, Any]]] = {}
    for node, depth in zip(ui_nodes, depths, strict=True):
        levels.setdefault(depth, []).append(node)
    stacks = [levels[depth] for depth in sorted(levels)]
    heights = [sum(TITLE_PX + n["size"][1] for n in stack) + GAP_Y * (len(stack) - 1) for stack in stacks]
    widths = [max(n["size"][0] for n in stack) for stack in stacks]
    runs = {sum(heights[i:j]) + GAP_Y * (j - i - 1) for i in range(len(stacks)) for j in range(i + 1, len(stacks) + 1)}
    best: tuple[float, list[list[int]]] | None = None
    for budget in sorted(runs):  # every height a column could have: the best cut is one of them
        columns: list[list[int]] = []
        height = 0
        for index, block in enumerate(heights):
            if not columns or height + GAP_Y + block > budget:
                columns.append([])
                height = -GAP_Y
            columns[-1].append(index)
            height += GAP_Y + block
        width = sum(max(widths[i] for i in column) for column in columns) + GAP_X * (len(columns) - 1)
        tallest = max(sum(heights[i] for i in column) + GAP_Y * (len(column) - 1) for column in columns)
        scale = min(FIT_WINDOW[0] / width, FIT_WINDOW[1] / tallest)
        if best is None or scale > best[0]:
            best = (scale, columns)
    x = 0
    for column in best[1] if best is not None else []:
        y = TITLE_PX  # `pos` is the body's corner: the title bar sits above it
        for node in (n for i in column for n in stacks[i]):
            node["pos"] = [x, y]
            y += node["size"][1] + GAP_Y + TITLE_PX
        x += max(widths[i] for i in column) + GAP_X


def bounds(ui_nodes: list[dict[str, Any]]) -> tuple[float, float, float, float]:
    """The graph's extent, title bars included: left, top, width, height."""
    left = min((n["pos"][0] for n in ui_nodes), default=0)
    top = min((n["pos"][1] - TITLE_PX for n in ui_nodes), default=0)
    right = max((n["pos"][0] + n["size"][0] for n in ui_nodes), default=0)
    bottom = max((n["pos"][1] + n["size"][1] for n in ui_nodes), default=0)
    return left, top, right - left, bottom - top


def view(ui_nodes: list[dict[str, Any]]) -> dict[str, Any]:
    """The view the workflow opens at (litegraph's DragAndScale: screen = (graph + offset) × scale): the
    whole graph in a VIEW window if it fits at a scale within SCALES, and its top-left corner in view."""
    left, top, width, height = bounds(ui_nodes)
    room = [VIEW[i] - 2 * MARGIN[i] for i in (0, 1)]
    scale = min(SCALES[1], max(SCALES[0], min(room[0] / max(width, 1), room[1] / max(height, 1))))
    return {"scale": round(scale, 3), "offset": [round(MARGIN[0] / scale - left), round(MARGIN[1] / scale - top)]}


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
