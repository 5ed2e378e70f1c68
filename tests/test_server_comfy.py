"""A client written like ComfyUI's websocket example gets a correct image from a real server process."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from websockets.sync.client import connect

from tests.server import Server, running_server
from tests.workflows import nano_prompt
from zimage_serve.nano.checker import read


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with running_server(tmp_path_factory.mktemp("serve") / "data") as running:
        yield running


def queue_and_wait(server: Server, prompt: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """POST /prompt, then read the socket until `executing` with node null for this prompt."""
    client_id = uuid.uuid4().hex
    messages: list[dict[str, Any]] = []
    with connect(f"{server.ws_url}?clientId={client_id}") as socket:
        status, answer = server.json("POST", "/prompt", {"prompt": prompt, "client_id": client_id})
        assert status == 200, answer
        prompt_id = answer["prompt_id"]
        while True:
            message = socket.recv(timeout=120)
            assert isinstance(message, str), "no binary frames unless previews were asked for"
            messages.append(json.loads(message))
            data = messages[-1]["data"]
            if messages[-1]["type"] == "executing" and data["node"] is None and data["prompt_id"] == prompt_id:
                return prompt_id, messages


def test_the_websocket_example_flow_gets_the_nano_image(server: Server) -> None:
    prompt_id, messages = queue_and_wait(server, nano_prompt())
    kinds = [m["type"] for m in messages]
    assert kinds[0] == "status" and "sid" in messages[0]["data"]
    start = kinds.index("execution_start")
    assert kinds[start + 1] == "execution_cached"
    assert kinds.index("execution_success") < len(kinds) - 1 and kinds[-1] == "executing"
    assert kinds[-2] == "status"  # history first, then status, then executing null
    assert kinds.count("progress") == 8

    status, history = server.json("GET", f"/history/{prompt_id}")
    assert status == 200
    entry = history[prompt_id]
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"] is True
    assert entry["prompt"][1] == prompt_id and entry["prompt"][4] == ["9"]
    assert entry["meta"] == {"9": {"node_id": "9", "display_node": "9", "parent_node": None, "real_node_id": "9"}}
    [image] = entry["outputs"]["9"]["images"]
    status, headers, content = server.request(
        "GET", f"/view?filename={image['filename']}&subfolder={image['subfolder']}&type={image['type']}"
    )
    assert status == 200 and headers["content-type"] == "image/png"
    path = server.data_dir / "fetched.png"
    path.write_bytes(content)
    reading = read(Image.open(path))
    assert (reading.background, reading.colour) == ("blue", "red")


def test_every_route_also_answers_under_api(server: Server) -> None:
    for path in (
        "/prompt",
        "/queue",
        "/history",
        "/object_info/KSampler",
        "/models",
        "/models/loras",
        "/embeddings",
        "/extensions",
        "/system_stats",
        "/features",
    ):
        plain, api = server.json("GET", path), server.json("GET", "/api" + path)
        assert plain[0] == api[0] == 200, path
        if path not in ("/system_stats",):
            assert plain[1] == api[1], path
    status, info = server.json("GET", "/api/object_info")
    assert status == 200 and info["KSampler"]["input"]["required"]["steps"][0] == "INT"
    assert server.json("GET", "/object_info/Nope") == (200, {})
    assert server.json("GET", "/models/nope")[0] == 404
    assert server.json("GET", "/models/diffusion_models")[1] == ["zimage-nano"]


def test_system_stats_has_comfyuis_shape_from_the_first_request(tmp_path: Path) -> None:
    with running_server(tmp_path / "data") as fresh:  # asked at once: the worker may still be starting
        status, stats = fresh.json("GET", "/system_stats")
    assert status == 200
    assert {"os", "python_version", "pytorch_version", "ram_total", "ram_free"} <= stats["system"].keys()
    (device,) = stats["devices"]
    assert device["type"] == "cpu" and {"name", "index", "vram_total", "vram_free"} <= device.keys()
    assert stats["system"]["ram_total"] > stats["system"]["ram_free"] > 0


def test_system_stats_report_the_memory_mode_once_the_worker_runs(server: Server) -> None:
    deadline = time.monotonic() + 120  # the worker process may still be importing torch on a busy machine
    while True:
        (device,) = server.json("GET", "/system_stats")[1]["devices"]
        if "zimage_memory_mode" in device or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert device["zimage_memory_mode"] == "gpu"  # on the CPU: everything on the one device
    assert device["zimage_attention"] == "auto"


@pytest.mark.parametrize(
    ("body", "status", "kind"),
    [
        (b"{not json", 400, "invalid_prompt"),
        (b"[]", 400, "invalid_prompt"),
        (b"{}", 400, "no_prompt"),
        (json.dumps({"prompt": {"1": {"class_type": "Nope", "inputs": {}}}}).encode(), 400, "missing_node_type"),
        (json.dumps({"prompt": {"1": {"class_type": "VAEDecode", "inputs": {}}}}).encode(), 400, "prompt_no_outputs"),
        (json.dumps({"prompt": {}, "prompt_id": "not-a-uuid"}).encode(), 400, "invalid_prompt_id"),
    ],
)
def test_bad_prompts_get_comfyui_shaped_400s(server: Server, body: bytes, status: int, kind: str) -> None:
    code, _, content = server.request("POST", "/prompt", raw=body)
    assert code == status
    answer = json.loads(content)
    assert answer["error"]["type"] == kind and answer["node_errors"] == {}
    assert set(answer["error"]) == {"type", "message", "details", "extra_info"}


def test_a_prompt_failing_validation_names_the_node(server: Server) -> None:
    prompt = nano_prompt()
    prompt["3"]["inputs"]["steps"] = 0
    code, answer = server.json("POST", "/prompt", {"prompt": prompt})
    assert code == 400 and answer["error"]["type"] == "prompt_outputs_failed_validation"
    assert answer["node_errors"]["3"]["class_type"] == "KSampler"
    assert answer["node_errors"]["3"]["errors"][0]["type"] == "value_smaller_than_min"


def test_oversized_bodies_and_traversal_are_refused(server: Server) -> None:
    for chunked in (False, True):
        code, content = server.oversized("/prompt", 20 * 1024 * 1024, chunked=chunked)
        assert code == 413 and b"request_too_large" in content
    for query, expected in [
        ("filename=../queue.sqlite3", 400),
        ("filename=/etc/passwd", 400),
        ("filename=passwd&subfolder=../../../../etc", 403),
        ("filename=x.png&type=secret", 400),
        ("filename=missing.png", 404),
        ("", 404),
    ]:
        assert server.request("GET", f"/view?{query}")[0] == expected, query
