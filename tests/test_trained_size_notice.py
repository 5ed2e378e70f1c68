"""A size the model was never trained at is told to the person asking, not only to the server's log: in the
OpenAI route's answer (without breaking what the openai package parses) and on the simple page."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from starlette.testclient import TestClient

from tests.browser import browser_page
from tests.support.app import serving
from tests.support.threaded import threaded_server


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with serving(tmp_path_factory.mktemp("trained") / "data", preload=False) as server:
        yield server.client


def images(client: TestClient, size: str) -> tuple[openai.types.ImagesResponse, str | None]:
    """What the openai package makes of the answer, and its Warning header."""
    base = str(client.base_url).rstrip("/")
    api = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", http_client=client, max_retries=0, timeout=120)
    raw = api.images.with_raw_response.generate(
        model="zimage-nano", prompt="a red circle", size=size, response_format="b64_json", extra_body={"seed": 1}
    )
    return raw.parse(), raw.headers.get("warning")


def test_the_openai_route_tells_the_caller_of_an_untrained_size(client: TestClient) -> None:
    result, header = images(client, "64x64")
    assert result.data is not None and len(result.data) == 1 and result.data[0].b64_json  # OpenAI's shape, parsed
    warnings = (result.model_extra or {}).get("warnings")
    assert warnings == ["zimage-nano was trained at 128×128 only; at 64×64 it draws a pattern, not a picture "
                        "(ask for 128×128)"], result.model_extra  # fmt: skip
    assert header is not None and header.startswith('299 zimage-serve "') and "128x128 only" in header


def test_the_trained_size_has_no_warning(client: TestClient) -> None:
    result, header = images(client, "128x128")
    assert result.data is not None and "warnings" not in (result.model_extra or {})
    assert header is None


def test_the_simple_pages_models_say_what_they_were_trained_at(client: TestClient) -> None:
    models = client.get("/api/zimage/workflows").json()
    assert models["zimage-nano"]["trained_size"] == 128
    assert ["64", "64"] in [[str(side) for side in size] for size in models["zimage-nano"]["sizes"]]


def test_the_simple_page_shows_a_notice_beside_an_untrained_size(tmp_path: Path) -> None:
    with threaded_server(tmp_path / "data") as server, browser_page() as watched:
        page = watched.page
        page.goto(server.url + "/simple", wait_until="networkidle")
        page.wait_for_function("() => document.querySelector('#size').options.length > 0")
        note = page.locator("#size-note")
        assert page.input_value("#size") == "128x128" and not note.is_visible()
        assert not page.locator("#sign-out").is_visible()  # authentication off: nobody to sign out
        page.select_option("#size", "64x64")
        assert note.is_visible()
        assert note.inner_text() == (
            "zimage-nano was trained at 128 × 128 only: at 64 × 64 it draws a pattern, not a picture."
        )
        watched.screenshot("simple-untrained-size")
        page.click("#language")
        assert "只在 128 × 128 下训练过" in note.inner_text()
        page.select_option("#size", "128x128")
        assert not note.is_visible()
        assert watched.errors == []
