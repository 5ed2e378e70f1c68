"""Jobs and calls that every server test makes, against an in-process `AppServer` or a real `Server`."""

from __future__ import annotations

import io
import json
import time
import uuid
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import urlencode

from PIL import Image

from tests.workflows import nano_prompt
from zimage_serve import strict_json


class Caller(Protocol):
    """A server as a test calls it (in this process or over loopback), with or without a token."""

    def request(
        self, method: str, path: str, body: Any = None, raw: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]: ...

    def json(self, method: str, path: str, body: Any = None) -> tuple[int, Any]: ...


def small_job(prefix: str, *, seed: int = 0, size: int = 64, steps: int = 1) -> dict[str, Any]:
    """The built-in model's workflow at a small size: done in well under a second."""
    prompt = nano_prompt()
    prompt["13"]["inputs"].update(width=size, height=size)
    prompt["3"]["inputs"].update(seed=seed, steps=steps)
    prompt["9"]["inputs"]["filename_prefix"] = prefix
    return prompt


def slow_job(prefix: str, seed: int = 0) -> dict[str, Any]:
    """A job that runs for minutes: something to interrupt, or to keep the worker busy while others wait."""
    return small_job(prefix, seed=seed, size=1024, steps=30)


def running_job(prefix: str, seed: int = 0) -> dict[str, Any]:
    """A job of some seconds: still running when a test that saw it start kills or signals something, and
    short enough to be run again to its end afterwards."""
    return small_job(prefix, seed=seed, size=512, steps=30)


def wait_until(condition: Callable[[], Any], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


def history(server: Caller) -> dict[str, Any]:
    found: dict[str, Any] = server.json("GET", "/history")[1]
    return found


def running_ids(server: Caller) -> list[str]:
    return [item[1] for item in server.json("GET", "/queue")[1]["queue_running"]]


def submit(server: Caller, prompt: dict[str, Any], **extra: Any) -> str:
    status, answer = server.json("POST", "/prompt", {"prompt": prompt, **extra})
    assert status == 200, answer
    return str(answer["prompt_id"])


def done(server: Caller, prompt_id: str, timeout: float = 120.0) -> dict[str, Any]:
    """The prompt's history entry, once it has one."""
    wait_until(lambda: prompt_id in server.json("GET", f"/history/{prompt_id}")[1], timeout)
    entry: dict[str, Any] = server.json("GET", f"/history/{prompt_id}")[1][prompt_id]
    return entry


def image_of(entry: dict[str, Any]) -> dict[str, str]:
    [image] = [i for ui in entry["outputs"].values() for i in ui["images"]]
    return dict(image)


def view_query(image: dict[str, str]) -> str:
    return "/view?" + urlencode({k: image[k] for k in ("filename", "subfolder", "type")})


def png(size: tuple[int, int] = (16, 16), colour: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def upload(
    server: Caller, content: bytes, filename: str = "photo.png", path: str = "/upload/image", **fields: str
) -> tuple[int, Any]:
    """A multipart upload as the frontend sends it (`fields` beside the file: overwrite, subfolder ...)."""
    return post_file(server, path, "image", content, filename, fields)


def post_file(
    server: Caller, path: str, field: str, content: bytes, filename: str, fields: dict[str, str]
) -> tuple[int, Any]:
    """A multipart form posted to `path`: `fields`, then the file `content` in `field`; the status and JSON."""
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n".encode()
        + content
        + b"\r\n"
    )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    status, _, answer = server.request(
        "POST", path, raw=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    return status, json.loads(answer) if answer else None


def listings_are_strict(server: Caller) -> None:
    """Every listing answers 200 with standard JSON (no NaN, nothing a strict parser refuses)."""
    for path in ("/queue", "/history", "/prompt", "/queue?limit=5"):
        status, _, content = server.request("GET", path)
        assert status == 200, (path, content[:300])
        strict_json.loads(content)


def settle(server: Caller, timeout: float = 120.0) -> None:
    """Nothing waiting and nothing running (for a server that tests share): what waits is cleared and what
    runs interrupted until the queue is empty. With authentication on, call it as an admin."""

    def empty() -> bool:
        queue = server.json("GET", "/queue")[1]
        if queue["queue_pending"]:
            server.request("POST", "/queue", {"clear": True})
        if queue["queue_running"]:
            server.request("POST", "/interrupt", {})
        return not queue["queue_pending"] and not queue["queue_running"]

    wait_until(empty, timeout)


def ready(server: Caller, timeout: float = 120.0) -> None:
    """Once /health says the worker has loaded the default model. An in-process server loads it in a
    thread after it starts: wait for that before another server in the same process loads models, since
    building a model (accelerate's init_empty_weights) patches torch for the whole process."""
    wait_until(lambda: server.request("GET", "/health")[0] == 200, timeout)


def next_event(socket: Any) -> dict[str, Any]:
    """The socket's next JSON message, past the binary preview frames a sampler sends meanwhile."""
    while True:
        message = socket.receive()
        if message.get("text") is not None:
            found: dict[str, Any] = json.loads(message["text"])
            return found
        if message.get("type") == "websocket.close":
            raise AssertionError(f"the socket closed: {message}")


def upload_asset(server: Caller, content: bytes, *, name: str = "photo.png", **fields: str) -> tuple[int, Any]:
    """A multipart upload to Comfy API v2's `POST /api/v2/assets` (`fields`: content_type, file_path ...)."""
    return post_file(server, "/api/v2/assets", "file", content, name, fields)
