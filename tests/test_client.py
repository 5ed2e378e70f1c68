"""The Python client against a real server process: generate, progress, concurrency, errors, retries."""

from __future__ import annotations

import asyncio
import contextlib
import io
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from safetensors.torch import load_file

from tests.loras import lora_pairs, write_diffusers
from tests.server import Listening, free_port
from tests.support.jobs import small_job, wait_until
from tests.support.threaded import threaded_server
from tests.support.tokens import make_tokens
from tests.workflows import img2img_workflow
from zimage_serve.client import (
    AsyncClient,
    AuthenticationError,
    Cancelled,
    Client,
    ExecutionError,
    Progress,
    PromptError,
    ServerUnavailable,
    TemplateNotFound,
    TemplateParameterError,
)
from zimage_serve.nano.default import default_model


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Listening]:
    root = tmp_path_factory.mktemp("client")
    models = root / "models"
    (models / "loras").mkdir(parents=True)
    [weights] = (default_model() / "transformer").glob("*.safetensors")
    write_diffusers(lora_pairs(load_file(weights), scale=0.2), models / "loras" / "style.safetensors")
    (models / "loras" / "broken.safetensors").write_bytes(b"not a safetensors file at all")
    with threaded_server(root / "data", models=[models]) as server:
        yield server


def test_generate_gives_images_files_and_progress_in_order(served: Listening) -> None:
    events: list[Progress] = []
    with Client(served.url) as client:
        result = client.generate(
            "zimage-nano", prompt="a blue square on white", seed=5, steps=6, on_progress=events.append
        )
    assert len(result.images) == 1 and result.images[0].size == (128, 128)
    assert result.files[0].type == "output" and result.files[0].filename.endswith(".png")
    assert result.template is not None and result.template.name == "zimage-nano"
    assert [e.value for e in events] == [1, 2, 3, 4, 5, 6] and {e.max for e in events} == {6}
    assert {e.prompt_id for e in events} == {result.prompt_id} and {e.node for e in events} == {"3"}
    history = served.json("GET", f"/history/{result.prompt_id}")[1][result.prompt_id]
    assert history["prompt"][2]["3"]["inputs"]["seed"] == 5  # the values reached the graph the server ran


def test_a_prompt_that_ended_before_the_wait_still_hands_on_its_progress(served: Listening) -> None:
    events: list[Progress] = []
    with Client(served.url) as client:
        # a seed of its own: a sampler cached from another test of this module's server reports no progress
        prompt_id = client.submit(small_job("client-early", seed=71, steps=3))
        wait_until(lambda: prompt_id in served.json("GET", f"/history/{prompt_id}")[1])
        result = client.wait(prompt_id, on_progress=events.append, timeout=60)
    assert [(e.node, e.value, e.max) for e in events] == [("3", 1, 3), ("3", 2, 3), ("3", 3, 3)]
    assert result.files[0].filename.startswith("client-early")


def test_two_waits_on_one_ended_prompt_both_end_at_once(served: Listening, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first wait takes the prompt's events; the second, which cannot hear all of them, asks the history
    (were it left to the events, it would sit until the quiet check, made an hour long here)."""
    monkeypatch.setattr("zimage_serve.client.aio.QUIET_CHECK", 3600.0)

    async def main() -> tuple[list[list[int]], list[str]]:
        async with AsyncClient(served.url) as client:
            prompt_id = await client.submit(small_job("client-twice", seed=85, steps=2))  # not cached: see above
            await asyncio.to_thread(wait_until, lambda: prompt_id in served.json("GET", f"/history/{prompt_id}")[1])
            steps: list[list[int]] = [[], []]
            results = await asyncio.wait_for(
                asyncio.gather(
                    *(client.wait(prompt_id, on_progress=lambda p, i=i: steps[i].append(p.value)) for i in (0, 1))
                ),
                timeout=60,
            )
            return steps, [r.files[0].filename for r in results]

    steps, files = asyncio.run(main())
    assert steps[0] == [1, 2] and files[0] == files[1] and files[0].startswith("client-twice")


def test_the_async_client_runs_jobs_concurrently(served: Listening) -> None:
    """Four generate calls on one client are all in the server's queue at once (the first one is slow)."""
    most_queued = 0

    async def main() -> list[str]:
        nonlocal most_queued
        async with AsyncClient(served.url) as client:

            async def one(seed: int) -> str:
                size = {"width": 384, "height": 384, "steps": 20} if seed == 0 else {"steps": 2}
                result = await client.generate("zimage-nano", seed=seed, **size)
                return result.files[0].filename

            jobs = asyncio.gather(*(one(seed) for seed in range(4)))
            while not jobs.done():
                most_queued = max(most_queued, len(await client.queued()))
                await asyncio.sleep(0.02)
            return await jobs

    names = asyncio.run(main())
    assert len(set(names)) == 4 and most_queued == 4


def test_without_a_websocket_the_client_polls(served: Listening) -> None:
    async def main() -> Any:
        async with AsyncClient(served.url, websocket=False, poll_interval=0.05) as client:
            return await client.generate("zimage-nano", seed=8, steps=2)

    result = asyncio.run(main())
    assert len(result.data) == 1 and Image.open(io.BytesIO(result.data[0])).size == (128, 128)


def test_a_refused_graph_raises_with_comfyuis_node_errors(served: Listening) -> None:
    job = small_job("client-bad")
    job["3"]["inputs"]["steps"] = 0
    with Client(served.url) as client, pytest.raises(PromptError) as caught:
        client.submit(job)
    assert list(caught.value.node_errors) == ["3"]
    assert caught.value.node_errors["3"]["errors"][0]["extra_info"]["input_name"] == "steps"
    assert caught.value.error["type"] == "prompt_outputs_failed_validation"
    assert "node 3 (KSampler)" in str(caught.value)


def test_a_failure_while_running_raises_with_the_node(served: Listening) -> None:
    with Client(served.url) as client, pytest.raises(ExecutionError) as caught:
        client.generate("zimage-nano", lora_name="broken.safetensors", steps=1)
    assert caught.value.node_id == "40" and caught.value.node_type == "LoraLoaderModelOnly"
    assert "broken.safetensors" in str(caught.value)


def test_a_lora_through_the_template_changes_the_image_and_strength_0_does_not(served: Listening) -> None:
    with Client(served.url) as client:
        plain = client.generate("zimage-nano", seed=3, steps=4).images[0].tobytes()
        styled = client.generate("zimage-nano", seed=3, steps=4, lora_name="style.safetensors").images[0].tobytes()
        off = client.generate("zimage-nano", seed=3, steps=4, lora_name="style.safetensors", lora_strength=0)
    assert styled != plain and off.images[0].tobytes() == plain


def test_parameter_errors_are_raised_before_anything_is_sent(served: Listening) -> None:
    before = len(served.json("GET", "/history")[1])
    with Client(served.url) as client:
        with pytest.raises(TemplateParameterError) as caught:
            client.generate("zimage-nano", seed=-3, stepz=4)
        assert set(caught.value.problems) == {"seed", "stepz"}
        with pytest.raises(TemplateNotFound):
            client.generate("no-such-template")
    assert len(served.json("GET", "/history")[1]) == before


def test_an_image_parameter_is_uploaded_and_used(served: Listening) -> None:
    template = {"name": "repaint", "workflow": img2img_workflow()}
    assert served.json("POST", "/api/zimage/templates", template)[0] == 201
    start = Image.new("RGB", (128, 128), "yellow")
    with Client(served.url) as client:
        result = client.generate("repaint", image=start, lora_name=None, seed=1, steps=3)
        again = client.generate("repaint", image=start, lora_name=None, seed=1, steps=3)
    assert result.images[0].size == (128, 128)
    graph = served.json("GET", f"/history/{result.prompt_id}")[1][result.prompt_id]["prompt"][2]
    assert graph["20"]["inputs"]["image"].endswith(".png") and "41" not in graph
    assert result.images[0].tobytes() == again.images[0].tobytes()


def test_deleting_a_waiting_prompt_ends_its_wait(served: Listening) -> None:
    async def main() -> None:
        async with AsyncClient(served.url) as client:
            running = await client.submit(small_job("client-slow", size=512, steps=40))
            waiting = await client.submit(small_job("client-waiting"))
            task = asyncio.create_task(client.wait(waiting))
            await asyncio.sleep(0.3)
            await client.cancel(waiting)
            with pytest.raises(Cancelled, match="removed from the queue"):
                await asyncio.wait_for(task, 30)
            await client.cancel(running)
            with contextlib.suppress(Cancelled):  # ended (canceled, or done first), so the next test starts idle
                await asyncio.wait_for(client.wait(running), 60)

    asyncio.run(main())


def test_tokens_are_sent_and_a_missing_one_is_an_authentication_error(tmp_path: Path) -> None:
    data = tmp_path / "data"
    tokens = make_tokens(data)
    with threaded_server(data, auth="on") as server:
        with Client(server.url, tokens["user"]) as client:
            result = client.generate("zimage-nano", steps=1)
        assert result.files[0].subfolder == ""  # the user's own space: names are relative to it
        assert (data / "output" / "users" / "alice" / result.files[0].filename).is_file()
        with Client(server.url) as anonymous, pytest.raises(AuthenticationError) as caught:
            anonymous.generate("zimage-nano", steps=1)
        assert caught.value.status == 401


def test_connection_errors_are_retried_with_backoff_then_raised(tmp_path: Path) -> None:
    port = free_port()
    started = time.monotonic()
    with Client(f"http://127.0.0.1:{port}", retries=3, backoff=0.1) as client, pytest.raises(ServerUnavailable):
        client.history("x")
    assert time.monotonic() - started > 0.3  # 0.1 + 0.2 + 0.4 s of waiting, less at most a quarter of jitter

    # A server that comes up while the client waits is reached.
    data = tmp_path / "late"

    async def main() -> Any:
        # enough retries (about 3 minutes of waiting) for a server that starts slowly on a busy machine
        async with AsyncClient(f"http://127.0.0.1:{port}", retries=20, backoff=0.5) as client:
            return await client.queued()

    command = [sys.executable, "-m", "zimage_serve.cli", "serve", "--port", str(port), "--data-dir", str(data)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert asyncio.run(main()) == set()
    finally:
        process.terminate()
        process.wait(60)


def test_templates_resolve_on_the_client_against_a_server_without_template_routes() -> None:
    """A plain ComfyUI answers 404 for /api/zimage/templates/...: the built-in template renders here."""
    seen: list[str] = []

    def comfyui(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        return httpx.Response(404, text="404: Not Found")

    async def main() -> Any:
        async with AsyncClient("http://comfy.invalid:8188", websocket=False) as client:
            client._http = httpx.AsyncClient(base_url=client.url, transport=httpx.MockTransport(comfyui))
            template = await client.template("z-image-turbo")
            with pytest.raises(TemplateNotFound):
                await client.template("house-style")
            return template

    template = asyncio.run(main())
    assert template.builtin and template.render(prompt="a fox")["6"]["inputs"]["text"] == "a fox"
    assert seen == ["/api/zimage/templates/z-image-turbo", "/api/zimage/templates/house-style"]


def test_importing_the_client_loads_no_heavy_library() -> None:
    code = (
        "import sys, zimage_serve.client; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'diffusers', 'transformers', 'PIL', "
        "'numpy', 'fastapi', 'uvicorn', 'starlette', 'safetensors'}))"
    )
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "[]", found.stdout


def test_waiting_on_a_prompt_another_client_queued(served: Listening, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its events go to the other client's socket: the quiet check finds it in the history."""
    monkeypatch.setattr("zimage_serve.client.aio.QUIET_CHECK", 0.3)
    status, answer = served.json("POST", "/prompt", {"prompt": small_job("client-other", steps=2), "client_id": "else"})
    assert status == 200
    with Client(served.url) as client:
        result = client.wait(answer["prompt_id"], timeout=60)
    assert result.files[0].filename.startswith("client-other") and len(result.data) == 1
