"""Live previews while a sampler runs: ComfyUI's binary WebSocket frames (type 1, or 4 with the node for a
client whose feature flags ask), nothing when nobody watches or a prompt asks for none, and a map from
zimage-nano's latents to colours that comes close to its VAE's decodes."""

from __future__ import annotations

import io
import json
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from tests.support.app import AppServer, serving
from tests.support.jobs import done, ready, small_job, submit
from zimage_serve.engine.latent_preview import TABLE_FILE, LatentToRGB, fit_pictures
from zimage_serve.nano.default import SHIPPED
from zimage_serve.workflow.previews import PreviewSettings, RunPreviews


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppServer]:
    with serving(tmp_path_factory.mktemp("previews") / "data") as running:
        ready(running)
        yield running


def frames_of_a_run(server: AppServer, flags: dict[str, Any] | None, **extra: Any) -> list[bytes]:
    """The binary frames a socket gets while a prompt of 4 steps runs."""
    client_id = uuid.uuid4().hex
    found: list[bytes] = []
    with server.websocket(f"/ws?clientId={client_id}") as socket:
        socket.receive_json()  # status
        if flags is not None:
            socket.send_text(json.dumps({"type": "feature_flags", "data": flags}))
            assert socket.receive_json()["data"]["supports_preview_metadata"] is True
        # A new seed each time: a sampler whose result is cached does not run, and makes no preview.
        job = small_job("previews/run", steps=4, seed=uuid.uuid4().int % 2**32)
        prompt_id = submit(server, job, client_id=client_id, extra_data=extra)
        while True:
            message = socket.receive()
            if message.get("bytes") is not None:
                found.append(message["bytes"])
                continue
            event = json.loads(message["text"])
            if event["type"] == "executing" and event["data"]["node"] is None:
                break
            if event["type"] in ("execution_success", "execution_error"):
                break
    done(server, prompt_id)
    return found


def test_a_client_that_asks_gets_previews_with_their_node(server: AppServer) -> None:
    frames = frames_of_a_run(server, {"supports_preview_metadata": True})
    assert frames, "no preview arrived"
    kind, length = struct.unpack(">II", frames[0][:8])
    assert kind == 4
    metadata = json.loads(frames[0][8 : 8 + length])
    assert metadata["node_id"] == "3" and metadata["image_type"] == "image/jpeg" and metadata["prompt_id"]
    picture = Image.open(io.BytesIO(frames[0][8 + length :]))
    assert picture.format == "JPEG" and picture.size == (8, 8)  # the latent's cells of a 64×64 image


def test_other_clients_get_comfyuis_plain_preview_frames(server: AppServer) -> None:
    frames = frames_of_a_run(server, None)
    assert frames
    kind, image_format = struct.unpack(">II", frames[0][:8])
    assert (kind, image_format) == (1, 1)
    assert Image.open(io.BytesIO(frames[0][8:])).format == "JPEG"


def test_a_prompt_may_ask_for_no_previews(server: AppServer) -> None:
    assert frames_of_a_run(server, {"supports_preview_metadata": True}, preview_method="none") == []


def test_previews_are_made_only_while_someone_watches() -> None:
    sent: list[str] = []
    latent = torch.zeros(1, 16, 4, 4)
    table = LatentToRGB(tuple(tuple([0.1] * 16) for _ in range(3)), (0.5, 0.5, 0.5))
    from zimage_serve.engine.latent_preview import PREVIEWS
    from zimage_serve.engine.parts import LatentFormat

    fmt = LatentFormat(1.25, 0.5)
    PREVIEWS.know(fmt, table)
    watched = [False]
    run = RunPreviews(PreviewSettings(), {}, "p", lambda event, data: sent.append(event), lambda: watched[0])
    preview = run.for_node("3")
    assert preview is not None
    preview(latent, fmt)
    assert sent == []
    watched[0] = True
    preview(latent, fmt)
    preview(latent, fmt)  # within the throttle: not sent
    assert sent == ["preview"]
    assert RunPreviews(PreviewSettings("none"), {}, "p", lambda e, d: None, None).for_node("3") is None
    assert RunPreviews(PreviewSettings("none"), {"preview_method": "auto"}, "p", lambda e, d: None, None).on


def test_the_shipped_nano_map_comes_close_to_its_vaes_decodes() -> None:
    """The map in the package (tools/fit_latent_rgb.py wrote it) against nano's VAE, on pictures it was not
    fitted to: within 16 % of the range on average (a linear map of a small VAE's latents)."""
    from zimage_serve.engine.latent_preview import fit
    from zimage_serve.engine.layouts import diffusers_component
    from zimage_serve.engine.libraries import load_model_libraries
    from zimage_serve.engine.parts import load_vae
    from zimage_serve.engine.placement import Placement

    load_model_libraries()
    table = LatentToRGB.of(json.loads((Path(SHIPPED) / "vae" / TABLE_FILE).read_text()))
    vae = load_vae("zimage-nano", diffusers_component(SHIPPED, "vae"), Placement.choose("cpu"))
    pictures = fit_pictures(count=4, seed=7)
    raw = vae.encode(pictures)
    decoded = vae.decode(raw)
    latent = vae.scaling.process_in(raw)
    cells = torch.nn.functional.adaptive_avg_pool2d(decoded.permute(0, 3, 1, 2), latent.shape[-2:])
    mapped = torch.from_numpy(table.project(latent[:1]).astype("float32")).permute(2, 0, 1) / 255
    assert float((mapped - cells[0]).abs().mean()) < 0.16
    refitted = fit(vae, vae.scaling)  # the fit is deterministic: the shipped map is what the tool makes
    assert all(abs(a - b) < 1e-3 for a, b in zip(refitted.bias, table.bias, strict=True))


def test_a_map_fitted_from_a_vae_is_kept_for_the_next_process(comfy_root: Path, tmp_path: Path) -> None:
    from zimage_serve.engine.latent_preview import Previews, kept_name
    from zimage_serve.engine.layouts import single_file
    from zimage_serve.engine.libraries import load_model_libraries
    from zimage_serve.engine.parts import load_vae
    from zimage_serve.engine.placement import Placement

    load_model_libraries()
    vae = load_vae("ae.safetensors", single_file("vae", comfy_root / "vae" / "ae.safetensors"), Placement.choose("cpu"))
    first = Previews()
    first.keep_in(tmp_path / "previews")
    assert first.table(vae.scaling) is None  # no VAE of that space seen yet
    first.teach(vae)
    fitted = first.table(vae.scaling)
    assert fitted is not None and fitted.channels == 16
    assert (tmp_path / "previews" / kept_name(vae.scaling)).is_file()
    later = Previews()  # another process sharing the data dir: no VAE loaded there yet
    later.keep_in(tmp_path / "previews")
    assert later.table(vae.scaling) == fitted
