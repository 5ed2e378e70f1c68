"""Our templates open in the official frontend at a scale where nodes are drawn, not as blank grey boxes
(they opened at 49 %, below the frontend's level-of-detail threshold of about 57 %)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.browser import browser_page
from tests.support.threaded import threaded_server
from zimage_serve import workflows
from zimage_serve.workflow.nodes import NODES
from zimage_serve.workflow.ui_export import TITLE_PX, bounds, to_ui
from zimage_serve.workflows import templates

READABLE = 0.8


def fitted_scale(ui: dict[str, Any], window: tuple[int, int]) -> float:
    """The scale the frontend opens a template from its browser at: litegraph's fitToBounds (75 % of the
    window) over the nodes' bounds, title bars and its 10-unit padding included."""
    _, _, width, height = bounds(ui["nodes"])
    return float(min(0.75 * window[0] / (width + 20), 0.75 * window[1] / (height + 20)))


@pytest.mark.parametrize("template", templates.TEMPLATES, ids=lambda t: t.name)
def test_each_template_carries_a_readable_view_of_its_top_left(template: templates.Template) -> None:
    ui = to_ui(workflows.load(template.workflow), NODES)
    view = ui["extra"]["ds"]
    scale, (x, y) = view["scale"], view["offset"]
    assert READABLE <= scale <= 1.0, view
    left, top, width, height = bounds(ui["nodes"])
    corner = ((left + x) * scale, (top + y) * scale)  # litegraph: screen = (graph + offset) × scale
    assert 0 < corner[0] < 200 and 0 < corner[1] < 200, (corner, view)
    assert (left + width + x) * scale <= 1280 and (top + height + y) * scale <= 800  # all of it in 1280 × 800
    assert fitted_scale(ui, (1400, 900)) >= READABLE  # where the template browser opens it
    nodes = ui["nodes"]
    for a in nodes:  # no node covers another, title bars included
        for b in nodes:
            if a is not b:
                ax, ay, bx, by = a["pos"][0], a["pos"][1] - TITLE_PX, b["pos"][0], b["pos"][1] - TITLE_PX
                apart = ax + a["size"][0] <= bx or bx + b["size"][0] <= ax
                assert apart or ay + a["size"][1] + TITLE_PX <= by or by + b["size"][1] + TITLE_PX <= ay, (a, b)


def test_a_template_opens_readable_in_the_frontend(tmp_path: Path) -> None:
    with threaded_server(tmp_path / "data") as server, browser_page() as watched:
        page = watched.page
        page.goto(server.url + "/", wait_until="networkidle", timeout=90_000)
        dialog = page.get_by_role("dialog")  # a first visit opens the template browser by itself
        dialog.get_by_text("zimage-nano: shapes in a second").wait_for(timeout=30_000)
        # the cards stop moving once their thumbnails are in (a busy machine loads them late)
        page.wait_for_function("() => [...document.querySelectorAll('[role=dialog] img')].every(i => i.complete)")
        dialog.get_by_text("zimage-nano: shapes in a second").click(timeout=60_000)
        text = workflows.load(workflows.NANO)["6"]["inputs"]["text"]  # the template's, not the default graph's
        page.wait_for_function(
            """text => window.app.graph._nodes.some(n => (n.widgets ?? []).some(w => w.value === text))
                       && window.app.pendingCamera === undefined""",  # loaded, and its view set
            arg=text,
            timeout=30_000,
        )
        seen = page.evaluate(
            """() => { const canvas = window.app.canvas; canvas.ds.computeVisibleArea(canvas.viewport);
                       const [x, y, w, h] = canvas.visible_area;
                       return { scale: canvas.ds.scale, lowQuality: canvas.low_quality,
                                inside: canvas.graph._nodes.every(n => { const [a, b, c, d] = n.boundingRect;
                                    return a >= x && b >= y && a + c <= x + w && b + d <= y + h }) } }"""
        )
        watched.screenshot("template-opened")
        assert seen["scale"] >= READABLE and not seen["lowQuality"] and seen["inside"], seen
