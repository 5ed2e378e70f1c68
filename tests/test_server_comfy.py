"""A client written like ComfyUI's websocket example gets a correct image; every route also answers under
/api; /system_stats has ComfyUI's shape. Routes in this process; the worker process's own report of
/system_stats over a real server."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.server import running_server
from tests.support.app import AppServer, serving
from tests.support.jobs import wait_until
from tests.workflows import nano_prompt
from zimage_serve.nano.checker import read


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppServer]:
    """Shared by the tests below: none looks at the queue or history another one leaves."""
    with serving(tmp_path_factory.mktemp("serve") / "data") as running:
        yield running


def queue_and_wait(server: AppServer, prompt: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """POST /prompt, then read the socket until `executing` with node null for this prompt."""
    client_id = uuid.uuid4().hex
    messages: list[dict[str, Any]] = []
    with server.websocket(f"/ws?clientId={client_id}") as socket:
        status, answer = server.json("POST", "/prompt", {"prompt": prompt, "client_id": client_id})
        assert status == 200, answer
        prompt_id = answer["prompt_id"]
        while True:
            message = socket.receive()
            if message.get("bytes") is not None:  # a live preview: ComfyUI's type 1 frame, a JPEG
                assert message["bytes"][:8] == b"\x00\x00\x00\x01\x00\x00\x00\x01"
                continue
            messages.append(json.loads(message["text"]))
            data = messages[-1]["data"]
            if messages[-1]["type"] == "executing" and data["node"] is None and data["prompt_id"] == prompt_id:
                return prompt_id, messages


def test_the_websocket_example_flow_gets_the_nano_image(server: AppServer) -> None:
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
    path = server.data_dir / f"fetched-{prompt_id}.png"
    path.write_bytes(content)
    reading = read(Image.open(path))
    assert (reading.background, reading.colour) == ("blue", "red")


def test_every_route_also_answers_under_api(server: AppServer) -> None:
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


def test_system_stats_has_comfyuis_shape_at_once_and_the_worker_process_adds_its_memory_mode(tmp_path: Path) -> None:
    """The server asked at once, while its worker process may still be starting (the server loads no torch:
    it names the device), then once the worker process has reported."""
    with running_server(tmp_path / "data", "--no-preload") as fresh:
        status, stats = fresh.json("GET", "/system_stats")
        assert status == 200
        assert {"os", "python_version", "pytorch_version", "ram_total", "ram_free"} <= stats["system"].keys()
        (device,) = stats["devices"]
        assert device["type"] == "cpu" and {"name", "index", "vram_total", "vram_free"} <= device.keys()
        assert stats["system"]["ram_total"] > stats["system"]["ram_free"] > 0

        def reported() -> dict[str, Any] | None:
            (device,) = fresh.json("GET", "/system_stats")[1]["devices"]
            return device if "zimage_memory_mode" in device else None

        wait_until(reported)  # the worker process may still be importing torch on a busy machine
        device = reported() or {}
        assert device["zimage_memory_mode"] == "gpu"  # on the CPU: everything on the one device
        assert device["zimage_attention"] == "auto"


@pytest.mark.parametrize(
    ("body", "asked"),
    [({"unload_models": True}, [False]), ({"unload_models": True, "free_memory": True}, [True]), ({}, [])],
)
def test_free_unloads_models_and_free_memory_also_drops_the_caches_as_comfyui_does(
    server: AppServer, monkeypatch: pytest.MonkeyPatch, body: dict[str, bool], asked: list[bool]
) -> None:
    calls: list[bool] = []
    monkeypatch.setattr(server.runtime.worker, "free", lambda caches=True: calls.append(caches))
    assert server.request("POST", "/free", body)[0] == 200
    assert calls == asked
