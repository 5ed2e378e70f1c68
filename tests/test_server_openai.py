"""The official openai client against the server: models, images as base64 and as URLs, errors.

The client is openai's own, over an httpx transport that hands its requests to the application in this
process (tests/support/clients.py)."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from PIL import Image

from tests.support.app import AppServer, serving
from tests.support.clients import httpx_client
from tests.support.jobs import ready
from tests.support.watch import calls_on_the_loop
from zimage_serve.nano.checker import read


def openai_client(server: AppServer) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{server.url}/v1",
        api_key="not-needed-on-loopback",
        max_retries=0,
        timeout=120,
        http_client=httpx_client(server),
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppServer]:
    """Shared by the tests below: each makes its own requests, and none looks at what the others queued."""
    with serving(tmp_path_factory.mktemp("openai") / "data") as running:
        ready(running)  # its model loaded now, not while another test's server starts (tests/support/jobs.py)
        yield running


@pytest.fixture
def client(server: AppServer) -> openai.OpenAI:
    return openai_client(server)


def test_models_lists_the_built_in_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["zimage-nano"]


def test_generate_b64_json(client: openai.OpenAI) -> None:
    result = client.images.generate(
        model="zimage-nano",
        prompt="一个红色的圆形在蓝色背景上",
        n=2,
        size="128x128",
        response_format="b64_json",
        extra_body={"seed": 42},
    )
    assert result.data is not None and len(result.data) == 2
    for item in result.data:
        assert item.b64_json is not None
        image = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
        assert image.size == (128, 128)
        reading = read(image)
        assert (reading.background, reading.colour) == ("blue", "red")


def test_generate_url(server: AppServer, client: openai.OpenAI) -> None:
    result = client.images.generate(
        model="zimage-nano", prompt="a yellow square on a white background", response_format="url", size="192x128"
    )
    assert result.data is not None and result.data[0].url is not None
    url = result.data[0].url
    assert url.startswith(f"{server.url}/")  # a URL the client can fetch from the server it asked
    response = server.client.get(url)
    assert response.status_code == 200
    assert Image.open(io.BytesIO(response.content)).size == (192, 128)


@pytest.mark.parametrize(
    ("kwargs", "status", "param"),
    [
        ({"model": "dall-e-3", "prompt": "x"}, 404, "model"),
        ({"model": "zimage-nano", "prompt": ""}, 400, "prompt"),
        ({"model": "zimage-nano", "prompt": "x", "n": 11}, 400, "n"),
        ({"model": "zimage-nano", "prompt": "x", "size": "100x100"}, 400, "size"),
        ({"model": "zimage-nano", "prompt": "x", "size": "huge"}, 400, "size"),
        ({"model": "zimage-nano", "prompt": "x", "response_format": "png"}, 400, "response_format"),
    ],
)
def test_bad_requests_get_openai_errors(client: openai.OpenAI, kwargs: dict[str, Any], status: int, param: str) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        client.images.generate(**kwargs)
    assert caught.value.status_code == status
    body = caught.value.body
    assert isinstance(body, dict) and body["param"] == param and body["type"] == "invalid_request_error"


def test_the_6b_models_are_listed_when_their_files_are_there(tmp_path: Path) -> None:
    models = tmp_path / "models"
    for folder, name in (("diffusion_models", "z_image.safetensors"), ("text_encoders", "qwen_3_4b.safetensors"),
                         ("vae", "ae.safetensors")):  # fmt: skip
        (models / folder).mkdir(parents=True)
        (models / folder / name).write_bytes(b"")
    with serving(tmp_path / "data", models=[models], preload=False) as running:  # lists models, loads none
        client = openai_client(running)
        assert [m.id for m in client.models.list()] == ["zimage-nano", "z-image"]  # not Turbo: its file is missing
        (models / "diffusion_models" / "z_image_turbo_bf16.safetensors").write_bytes(b"")
        assert [m.id for m in client.models.list()] == ["zimage-nano", "z-image-turbo", "z-image"]


def test_the_route_waits_on_the_jobs_end_not_by_polling_the_queue_on_the_event_loop(
    server: AppServer, client: openai.OpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One way to wait: woken by the job's closing event, reading the queue off the loop, a few times."""
    service = server.runtime.service
    reads: list[bool] = []  # one per read of the job: whether it ran on an event loop
    monkeypatch.setattr(service, "get", calls_on_the_loop(service.get, reads))
    result = client.images.generate(model="zimage-nano", prompt="a red circle", size="256x256")
    assert result.data is not None and len(result.data) == 1
    assert reads and not any(reads)
    assert len(reads) <= 3  # before the wait, once woken (and a recheck, had the run been slow)
