"""The lane in front of FastAPI: POST /prompt goes straight to its handler, keeping the body limit and a
ComfyUI-shaped 500 for a bug; every other request reaches FastAPI unchanged."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.requests import Request

from zimage_serve.server import app as app_module
from zimage_serve.server import routes_queue


def call(lane: app_module.PromptLane, method: str, path: str, body: bytes = b"") -> tuple[int, dict[str, Any]]:
    """One HTTP request through the ASGI application, answered as (status, JSON body)."""
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")],
    }
    sent: list[dict[str, Any]] = []
    requests = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return requests.pop() if requests else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(lane(scope, receive, send))
    status = sent[0]["status"]
    content = b"".join(m.get("body", b"") for m in sent[1:])
    return status, json.loads(content) if content else {}


@pytest.fixture
def lane(monkeypatch: pytest.MonkeyPatch) -> app_module.PromptLane:
    async def fake_post_prompt(request: Request) -> JSONResponse:
        body = json.loads(await request.body())
        if body.get("fail"):
            raise RuntimeError("a bug in the route")
        return JSONResponse({"route": "lane", "path": request.url.path, "app": request.app.title})

    monkeypatch.setattr(routes_queue, "post_prompt", fake_post_prompt)
    framework = FastAPI(title="behind the lane")

    @framework.get("/prompt")
    async def get_prompt() -> dict[str, str]:
        return {"route": "fastapi"}

    return app_module.PromptLane(framework, body_limit=1000)


def test_post_prompt_takes_the_lane_bare_and_under_api(lane: app_module.PromptLane) -> None:
    for path in ("/prompt", "/api/prompt"):
        status, body = call(lane, "POST", path, b"{}")
        assert (status, body) == (200, {"route": "lane", "path": path, "app": "behind the lane"})


def test_every_other_request_reaches_fastapi(lane: app_module.PromptLane) -> None:
    assert call(lane, "GET", "/prompt") == (200, {"route": "fastapi"})
    assert call(lane, "POST", "/prompts", b"{}")[0] == 404
    assert call(lane, "PUT", "/prompt", b"{}")[0] == 405


def test_a_bug_in_the_route_is_a_logged_500_with_comfyui_shape(
    lane: app_module.PromptLane, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR):
        status, body = call(lane, "POST", "/prompt", b'{"fail": true}')
    assert status == 500
    assert body["error"]["type"] == "internal_error" and body["node_errors"] == {}
    assert "a bug in the route" not in json.dumps(body)  # no traceback or message shown to the client
    assert any("unhandled error on POST /prompt" in r.getMessage() and r.exc_info for r in caplog.records)


def test_the_lane_keeps_the_body_limit(lane: app_module.PromptLane) -> None:
    status, body = call(lane, "POST", "/api/prompt", b"[" + b"0," * 600 + b"0]")
    assert status == 413 and body["error"]["type"] == "request_too_large"
