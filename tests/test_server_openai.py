"""The official openai client against a real server: models, images as base64 and as URLs, errors."""

from __future__ import annotations

import base64
import io
import urllib.request
from typing import Any

import openai
import pytest
from PIL import Image

from tests.server import Server, running_server
from zimage_serve.nano.checker import read


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with running_server(tmp_path_factory.mktemp("openai") / "data") as running:
        yield running


@pytest.fixture
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-needed-on-loopback", max_retries=0, timeout=120)


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


def test_generate_url(client: openai.OpenAI) -> None:
    result = client.images.generate(
        model="zimage-nano", prompt="a yellow square on a white background", response_format="url", size="192x128"
    )
    assert result.data is not None and result.data[0].url is not None
    with urllib.request.urlopen(result.data[0].url, timeout=30) as response:
        image = Image.open(io.BytesIO(response.read()))
    assert image.size == (192, 128)


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


def test_the_6b_models_are_listed_when_their_files_are_there(tmp_path: Any) -> None:
    models = tmp_path / "models"
    for folder, name in (("diffusion_models", "z_image.safetensors"), ("text_encoders", "qwen_3_4b.safetensors"),
                         ("vae", "ae.safetensors")):  # fmt: skip
        (models / folder).mkdir(parents=True)
        (models / folder / name).write_bytes(b"")
    with running_server(tmp_path / "data", "--models", str(models)) as running:
        listed = running.json("GET", "/v1/models")[1]
        assert [m["id"] for m in listed["data"]] == ["zimage-nano", "z-image"]  # not Turbo: its file is missing
        (models / "diffusion_models" / "z_image_turbo_bf16.safetensors").write_bytes(b"")
        listed = running.json("GET", "/v1/models")[1]
        assert [m["id"] for m in listed["data"]] == ["zimage-nano", "z-image-turbo", "z-image"]
