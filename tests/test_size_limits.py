"""One set of size limits everywhere: `zimage generate`, the OpenAI route, a template's width and height, and
a workflow's latent refuse the same oversized picture, each naming the same bound (zimage_serve/limits.py).

They used to disagree: the CLI stopped at 2048 a side, the OpenAI route at 4096, templates and workflows at
ComfyUI's 16384 (a 4112 × 64 latent was queued and drawn)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.testclient import TestClient

from tests.support.app import serving
from tests.workflows import nano_prompt
from zimage_serve.cli import main
from zimage_serve.limits import MAX_SIDE, MIN_SIDE, Limits
from zimage_serve.templates.builtin import builtin

# (width, height, the bound every refusal must name)
OVERSIZED = [
    pytest.param(4096, 4096, "4,194,304", id="pixels"),  # within the sides, over --max-pixels' default
    pytest.param(MAX_SIDE + 16, 64, str(MAX_SIDE), id="longest-side"),  # few pixels, a side too long
    pytest.param(48, 128, str(MIN_SIDE), id="shortest-side"),
]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with serving(tmp_path_factory.mktemp("sizes") / "data", preload=False) as server:
        yield server.client


def refused_by_the_cli(width: int, height: int, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as caught:
        main(["generate", "a red circle", "--width", str(width), "--height", str(height), "--device", "cpu"])
    assert caught.value.code == 1
    return capsys.readouterr().err


def refused_by_openai(client: TestClient, width: int, height: int) -> str:
    answer = client.post("/v1/images/generations", json={"prompt": "a red circle", "size": f"{width}x{height}"})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == "size" and error["type"] == "invalid_request_error"
    return str(error["message"])


def refused_by_a_template(client: TestClient, width: int, height: int) -> str:
    answer = client.post(
        "/api/zimage/templates/zimage-nano/prompt", json={"params": {"width": width, "height": height}}
    )
    assert answer.status_code == 400, answer.text
    return json.dumps(answer.json())


def latent_graph(width: int, height: int) -> dict[str, Any]:
    prompt = nano_prompt()
    prompt["13"]["inputs"].update(width=width, height=height)
    return prompt


def refused_in_a_workflow(client: TestClient, width: int, height: int) -> str:
    answer = client.post("/prompt", json={"prompt": latent_graph(width, height)})
    assert answer.status_code == 400, answer.text
    body = answer.json()
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    [reason, *_] = body["node_errors"]["13"]["errors"]
    assert reason["type"] in ("value_bigger_than_max", "value_smaller_than_min")
    return json.dumps(reason)


@pytest.mark.parametrize(("width", "height", "bound"), OVERSIZED)
def test_the_same_picture_is_refused_everywhere_naming_the_same_bound(
    client: TestClient, capsys: pytest.CaptureFixture[str], width: int, height: int, bound: str
) -> None:
    named = re.compile(rf"(?<![\d,]){re.escape(bound)}(?!,?\d)")  # the number itself, not inside another
    refusals = {
        "zimage generate": refused_by_the_cli(width, height, capsys),
        "OpenAI route": refused_by_openai(client, width, height),
        "template": refused_by_a_template(client, width, height),
        "workflow": refused_in_a_workflow(client, width, height),
    }
    for where, message in refusals.items():
        assert named.search(message), (where, message)


def test_the_largest_allowed_picture_is_allowed_everywhere(client: TestClient) -> None:
    """4096 × 1024 is the longest side at the default pixel limit: nothing refuses it."""
    from zimage_serve.engine.params import GenerationParams

    GenerationParams("a red circle", width=MAX_SIDE, height=Limits().pixels // MAX_SIDE).validate()
    template = builtin("zimage-nano")
    assert template is not None
    graph = template.render(width=MAX_SIDE, height=1024)
    assert graph["13"]["inputs"]["width"] == MAX_SIDE
    answer = client.post("/prompt", json={"prompt": latent_graph(MAX_SIDE, 1024), "front": True})
    assert answer.status_code == 200, answer.text
    job = answer.json()["prompt_id"]
    client.post("/queue", json={"delete": [job]})
    client.post("/interrupt", json={"prompt_id": job})  # if the worker took it already: minutes at this size


def test_template_and_cli_bounds_are_the_shared_ones() -> None:
    template = builtin("z-image-turbo")
    assert template is not None
    width = template.parameters["width"]
    assert (width.minimum, width.maximum) == (MIN_SIDE, MAX_SIDE)
