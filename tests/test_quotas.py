"""Rate limits and quotas per token, at their boundaries, through the server's routes; the day's counters
survive a restart."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image

from tests.support.app import serving
from tests.support.jobs import done, png, running_ids, settle, slow_job, small_job, submit, upload, wait_until
from tests.support.tokens import make_tokens
from zimage_serve.limits import StorageLimits


def batch_job(prefix: str, batch: int, **options: Any) -> dict[str, Any]:
    prompt = small_job(prefix, **options)
    prompt["13"]["inputs"]["batch_size"] = batch
    return prompt


def test_requests_per_minute(tmp_path: Path) -> None:
    data = tmp_path / "data"
    tokens = make_tokens(data, alice={"rpm": 3})
    with serving(data, auth="on", preload=False) as server:  # nothing runs
        alice, bob = server.as_token(tokens["user"]), server.as_token(tokens["other"])
        for _ in range(3):
            assert alice.request("POST", "/queue", {})[0] == 200
        for _ in range(5):  # reads are not counted
            assert alice.request("GET", "/queue")[0] == 200
        status, headers, body = alice.request("POST", "/queue", {})
        assert status == 429 and 1 <= int(headers["retry-after"]) <= 60
        assert b"rpm" in body and b"alice" in body
        assert alice.request("POST", "/prompt", {"prompt": small_job("x")})[0] == 429
        assert bob.request("POST", "/queue", {})[0] == 200  # another user's budget is their own
        usage = alice.json("GET", "/api/zimage/usage")[1]
        assert usage["requests_last_minute"] == 3 and usage["limits"]["rpm"] == 3


def test_pixel_and_step_limits_are_400s_naming_the_tokens_limit(tmp_path: Path) -> None:
    data = tmp_path / "data"
    tokens = make_tokens(data, alice={"max_pixels": 64 * 64, "max_steps": 2})
    with serving(data, auth="on") as server:
        alice, bob = server.as_token(tokens["user"]), server.as_token(tokens["other"])
        status, answer = alice.json("POST", "/prompt", {"prompt": small_job("big", size=128)})
        assert status == 400
        text = str(answer)
        assert "token 'alice'" in text and "max_pixels" in text and "4,096" in text
        status, answer = alice.json("POST", "/prompt", {"prompt": small_job("steps", steps=3)})
        assert status == 400 and "max_steps" in str(answer)
        assert done(alice, submit(alice, small_job("fits", size=64, steps=2)))["status"]["completed"]
        assert bob.json("POST", "/prompt", {"prompt": small_job("bobs", size=128, steps=3)})[0] == 200
        status, _, body = alice.request("POST", "/v1/images/generations", {"prompt": "x", "size": "128x128"})
        assert status == 400 and b"max_pixels" in body
        settle(server.as_token(tokens["admin"]))  # Bob's job need not run


def test_images_per_day_count_a_batch_and_survive_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    tokens = make_tokens(data, alice={"images_per_day": 3})
    with serving(data, auth="on") as server:
        alice = server.as_token(tokens["user"])
        first = submit(alice, batch_job("day", 2))
        status, headers, body = alice.request("POST", "/prompt", {"prompt": batch_job("day", 2, seed=1)})
        assert status == 429 and int(headers["retry-after"]) >= 1 and b"images_per_day" in body
        third = submit(alice, batch_job("day", 1, seed=2))  # exactly the limit
        assert alice.request("POST", "/prompt", {"prompt": batch_job("day", 1, seed=3)})[0] == 429
        status, _, _ = alice.request("POST", "/v1/images/generations", {"prompt": "x", "size": "64x64"})
        assert status == 429
        done(alice, first)
        done(alice, third)
        usage = alice.json("GET", "/api/zimage/usage")[1]
        assert usage["images_today"] == 3 and usage["jobs_today"] == 2
    with serving(data, auth="on", preload=False) as server:  # the same data dir
        alice = server.as_token(tokens["user"])
        assert alice.request("POST", "/prompt", {"prompt": small_job("after-restart")})[0] == 429
        assert alice.json("GET", "/api/zimage/usage")[1]["images_today"] == 3
        admin = server.as_token(tokens["admin"]).json("GET", "/api/zimage/usage")[1]
        assert {u["user"]: u["images_today"] for u in admin["users"]}["alice"] == 3
        assert {u["user"] for u in admin["users"]} >= {"alice", "bob", "root"}


def chained_samplers(prefix: str, samplers: int) -> dict[str, Any]:
    """One latent through `samplers` samplers, one after the other: one image saved, `samplers` made."""
    prompt = small_job(prefix, steps=1)
    previous = "3"
    for i in range(1, samplers):
        prompt[f"s{i}"] = {**prompt["3"], "inputs": {**prompt["3"]["inputs"], "latent_image": [previous, 0]}}
        previous = f"s{i}"
    prompt["8"]["inputs"]["samples"] = [previous, 0]
    return prompt


def from_upload(prefix: str, image: str, repeat: int = 1, seed: int = 0) -> dict[str, Any]:
    """An uploaded image, encoded (each of its frames a latent), repeated `repeat` times, then sampled."""
    prompt = small_job(prefix, seed=seed)
    del prompt["13"]
    prompt["20"] = {"class_type": "LoadImage", "inputs": {"image": image}}
    prompt["21"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["20", 0], "vae": ["29", 0]}}
    prompt["22"] = {"class_type": "RepeatLatentBatch", "inputs": {"samples": ["21", 0], "amount": repeat}}
    prompt["3"]["inputs"]["latent_image"] = ["22", 0]
    return prompt


def animation(frames: int) -> bytes:
    pictures = [Image.new("RGB", (64, 64), colour) for colour in ("red", "green", "blue", "white")[:frames]]
    buffer = io.BytesIO()
    pictures[0].save(buffer, format="GIF", save_all=True, append_images=pictures[1:], duration=100)
    return buffer.getvalue()


def test_images_per_day_count_every_sampler_run_and_every_frame_made(tmp_path: Path) -> None:
    """F7: images are counted where samplers make them; what the graph does not show is counted as made."""
    data = tmp_path / "data"
    tokens = make_tokens(data, alice={"images_per_day": 5})
    with serving(data, auth="on") as server:
        alice = server.as_token(tokens["user"])
        status, _, body = alice.request("POST", "/prompt", {"prompt": chained_samplers("six", 6)})
        assert status == 429 and b"images_per_day: 6 images" in body  # one latent, six sampler runs
        assert upload(alice, png((64, 64)), "still.png")[0] == 200
        status, _, body = alice.request("POST", "/prompt", {"prompt": from_upload("repeat", "still.png", 16)})
        assert status == 429 and b"images_per_day: 16 images" in body
        assert alice.json("GET", "/api/zimage/usage")[1]["images_today"] == 0  # refused: nothing charged

        assert upload(alice, animation(4), "moving.gif")[0] == 200  # its graph shows 1 image; it makes 4
        first = done(alice, submit(alice, from_upload("frames", "moving.gif")))
        assert first["status"]["status_str"] == "success"
        assert len(first["outputs"]["9"]["images"]) == 4
        assert alice.json("GET", "/api/zimage/usage")[1]["images_today"] == 4

        failed = done(alice, submit(alice, from_upload("frames", "moving.gif", seed=1)))  # 1 fits, 4 do not
        [error] = [data for event, data in failed["status"]["messages"] if event == "execution_error"]
        assert error["node_id"] == "3" and "images_per_day: 8 images" in error["exception_message"]
        assert alice.json("GET", "/api/zimage/usage")[1]["images_today"] == 4  # the refused run made none

        again = done(alice, submit(alice, from_upload("frames", "moving.gif")))  # the first, cached whole
        assert again["status"]["status_str"] == "success" and len(again["outputs"]["9"]["images"]) == 4
        assert alice.json("GET", "/api/zimage/usage")[1]["images_today"] == 4  # nothing was made again


def test_queued_jobs(tmp_path: Path) -> None:
    data = tmp_path / "data"
    tokens = make_tokens(data, alice={"max_queued": 2})
    with serving(data, auth="on") as server:
        alice, bob = server.as_token(tokens["user"]), server.as_token(tokens["other"])
        running = submit(alice, slow_job("q-slow"))
        wait_until(lambda: running_ids(alice) == [running])
        waiting = submit(alice, small_job("q-1"))
        status, headers, body = alice.request("POST", "/prompt", {"prompt": small_job("q-2")})
        assert status == 429 and headers["retry-after"] and b"max_queued" in body
        assert bob.request("POST", "/prompt", {"prompt": small_job("q-bob")})[0] == 200
        assert alice.json("GET", "/api/zimage/usage")[1]["queued"] == 2
        alice.request("POST", "/interrupt", {})
        done(alice, waiting)
        assert alice.request("POST", "/prompt", {"prompt": small_job("q-3")})[0] == 200
        settle(server.as_token(tokens["admin"]))  # nor the jobs accepted here


def test_what_a_user_stores_is_bounded_per_token_and_by_the_servers_default(tmp_path: Path) -> None:
    """Uploads, saved workflows and templates count together; concurrent uploads cannot share the last room."""
    data = tmp_path / "data"
    tokens = make_tokens(data, alice={"max_storage": 40_000, "max_files": 5})
    with serving(data, auth="on", security={"user_storage": StorageLimits(bytes=10**9, files=2)}) as server:
        alice, bob = server.as_token(tokens["user"]), server.as_token(tokens["other"])
        admin = server.as_token(tokens["admin"])
        picture = png((64, 64), "red") + b"\0" * 9_000  # about 9 KB, still a valid PNG

        def upload_as(who: Any, name: str) -> int:
            return int(upload(who, picture, name)[0])

        with ThreadPoolExecutor(8) as pool:  # 8 at once: 4 fit in 40,000 bytes, the rest are refused
            statuses = list(pool.map(lambda i: upload_as(alice, f"p{i}.png"), range(8)))
        assert sorted(statuses) == [200] * 4 + [413] * 4, statuses
        status, _, body = alice.request("POST", "/userdata/workflows%2Fbig.json", raw=b"x" * 5_000)
        assert status == 413 and b"40,000" in body  # bytes: the uploads took the room
        stored = next(f"p{i}.png" for i, status in enumerate(statuses) if status == 200)
        assert upload_as(alice, stored) == 200  # the same bytes again: replaces nothing, adds nothing
        assert alice.request("POST", "/userdata/workflows%2Fa.json", raw=b"{}")[0] == 200  # the fifth file
        template = {"name": "mine", "workflow": small_job("mine")}
        status, answer = alice.json("POST", "/api/zimage/templates", template)
        assert status == 413 and "may keep 5" in answer["error"]  # files: a template version is one more

        assert upload_as(bob, "b0.png") == 200 and upload_as(bob, "b1.png") == 200  # the server's default: 2 files
        status, body = upload(bob, picture, "b2.png")
        assert status == 413 and "may keep 2" in body["error"]
        assert upload_as(admin, "shared.png") == 200  # the shared folders are the operator's
        status, body = upload(alice, picture, "x.png", type="output")
        assert status == 403 and "input or temp" in body["error"]
        usage = {t["name"]: t for t in admin.json("GET", "/api/zimage/tokens")[1]["tokens"]}
        assert (usage["alice"]["max_storage"], usage["alice"]["max_files"]) == (40_000, 5)
