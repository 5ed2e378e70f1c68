"""The official Comfy API v2 client (`comfy-sdk`, unchanged) against the server, over a real socket: what
a team's Comfy Cloud script does once `COMFY_BASE_URL` names this server and its key is one of our tokens."""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from comfy_sdk import Comfy
from comfy_sdk.events import OutputReady, Progress, StatusChange
from comfy_sdk.exceptions import IdempotencyKeyReuse, JobFailed, NotFound
from PIL import Image

from tests.server import Listening
from tests.support.jobs import ready, slow_job, small_job, wait_until
from tests.support.threaded import threaded_server
from tests.support.tokens import make_tokens


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Listening, dict[str, str]]]:
    data = tmp_path_factory.mktemp("sdk") / "data"
    tokens = make_tokens(data)
    with threaded_server(data, auth="on") as server:
        ready(server.as_token(tokens["admin"]))
        yield server, tokens


def client(served: tuple[Listening, dict[str, str]], who: str, monkeypatch: pytest.MonkeyPatch) -> Comfy:
    server, tokens = served
    monkeypatch.setenv("COMFY_BASE_URL", f"http://127.0.0.1:{server.port}")
    return Comfy(api_key=tokens[who])


def png(colour: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 24), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_script_runs_a_workflow_and_streams_its_progress(served: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    with client(served, "user", monkeypatch) as comfy:
        job = comfy.run(comfy.workflows.from_json(small_job("sdk/run")), timeout=120)
        [output] = job.get_outputs("9")
        assert Image.open(io.BytesIO(output.to_bytes())).size == (64, 64)
        assert output.to_bytes(range=(0, 7)) == b"\x89PNG\r\n\x1a\n"

        job = comfy.submit(comfy.workflows.from_json(small_job("sdk/events", steps=3)), metadata={"run": "events"})
        events = list(job.events())
        assert isinstance(events[0], StatusChange) and events[-1] == StatusChange(status="succeeded")
        assert any(isinstance(e, Progress) for e in events) and any(isinstance(e, OutputReady) for e in events)
        assert job.result().metadata == {"run": "events"}
        assert [s.id for s in comfy.list_jobs(metadata={"run": "events"})] == [job.id]


def test_an_asset_is_uploaded_once_and_used_in_a_workflow(served: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    content = png("purple")
    with client(served, "user", monkeypatch) as comfy:
        first = comfy.assets.from_bytes(content, filename="photo.png", content_type="image/png")
        first.commit()
        second = comfy.assets.from_bytes(content, filename="photo.png", content_type="image/png")
        second.commit()  # found by its hash: nothing sent again
        assert first.created_new is True and second.created_new is False and second.hash == first.hash
        workflow = comfy.workflows.from_json(
            {
                "1": {"class_type": "LoadImage", "inputs": {"image": "placeholder.png"}},
                "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "sdk/asset"}},
            }
        )
        workflow.set_input("1", "image", second)
        [output] = comfy.run(workflow, timeout=120).get_outputs("2")
        assert Image.open(io.BytesIO(output.to_bytes())).getpixel((0, 0)) == (128, 0, 128)


def test_cancel_retry_and_another_users_job(served: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    with client(served, "user", monkeypatch) as comfy, client(served, "other", monkeypatch) as other:
        job = comfy.submit(comfy.workflows.from_json(slow_job("sdk/cancel")))
        wait_until(lambda: job.refresh().status == "running")
        job.cancel()
        with pytest.raises(JobFailed):
            job.result()
        assert job.status == "canceled"

        key = str(uuid.uuid4())
        done = comfy.submit(comfy.workflows.from_json(small_job("sdk/key")), idempotency_key=key)
        with pytest.raises(IdempotencyKeyReuse):
            comfy.submit(comfy.workflows.from_json(small_job("sdk/key")), idempotency_key=key)
        done.result()

        with pytest.raises(NotFound):
            other.jobs.get(done.id)
