"""Comfy API v2 (`/api/v2`), in process against real SQLite, with authentication on: the shapes are checked
with the official client's own models (`comfy_low.models`, generated from the spec), so what passes here is
what `comfy-sdk` reads."""

from __future__ import annotations

import base64
import io
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from blake3 import blake3
from comfy_low import models
from PIL import Image

from tests.support.app import AppServer, serving
from tests.support.jobs import done, ready, settle, slow_job, small_job, submit, upload_asset, wait_until
from tests.support.tokens import make_tokens
from zimage_serve.security.audit_verify import records
from zimage_serve.server.v2.retention import expire


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AppServer, dict[str, str]]]:
    data = tmp_path_factory.mktemp("v2") / "data"
    tokens = make_tokens(data)
    with serving(data, auth="on") as running:
        ready(running.as_token(tokens["admin"]))
        yield running, tokens


@pytest.fixture()
def alice(shared: tuple[AppServer, dict[str, str]]) -> AppServer:
    server, tokens = shared
    settle(server.as_token(tokens["admin"]))
    return server.as_token(tokens["user"])


@pytest.fixture()
def bob(shared: tuple[AppServer, dict[str, str]]) -> AppServer:
    server, tokens = shared
    return server.as_token(tokens["other"])


def png(colour: str = "red", size: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def asset_ref(asset: dict[str, Any]) -> dict[str, Any]:
    return {"__type": "core/ASSET", "info": {"id": asset["id"], "hash": asset["hash"], "file_path": "photo.png"}}


def copy_graph(image: Any, prefix: str) -> dict[str, Any]:
    """A model-free graph: an image loaded and saved again."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


def submit_v2(server: AppServer, workflow: dict[str, Any], key: str | None = None, **body: Any) -> tuple[int, Any]:
    headers = {"Idempotency-Key": key} if key else {}
    status, _, answer = server.request("POST", "/api/v2/jobs", {"workflow": workflow, **body}, headers=headers)
    return status, json.loads(answer)


def finished(server: AppServer, job_id: str) -> dict[str, Any]:
    def ended() -> bool:
        return server.json("GET", f"/api/v2/jobs/{job_id}")[1]["status"] in ("succeeded", "failed", "canceled")

    wait_until(ended)
    job: dict[str, Any] = server.json("GET", f"/api/v2/jobs/{job_id}")[1]
    models.Job.model_validate(job)  # the official client's reading of it
    return job


def code(answer: Any) -> str:
    models.ErrorEnvelope.model_validate(answer)
    return str(answer["error"]["code"])


def test_a_workflow_runs_through_v2_from_an_uploaded_asset_to_an_output_asset(alice: AppServer) -> None:
    content = png("blue")
    status, asset = upload_asset(alice, content, content_type="image/png", file_path="photo.png", tags="input")
    assert status == 201 and asset["created_new"] is True, asset
    models.Asset.model_validate(asset)
    assert asset["hash"] == "blake3:" + blake3(content).hexdigest() and asset["size_bytes"] == len(content)

    status, job = submit_v2(alice, copy_graph(asset_ref(asset), "v2/copy"), str(uuid.uuid4()), metadata={"sku": "A-7"})
    assert status == 201, job
    models.Job.model_validate(job)
    assert job["status"] in ("queued", "running") and job["urls"]["self"] == f"/api/v2/jobs/{job['id']}"
    assert job["metadata"] == {"sku": "A-7"}

    job = finished(alice, job["id"])
    assert job["status"] == "succeeded" and job["error"] is None and job["progress"]["value"] == 1.0
    [output] = job["outputs"]
    assert output["node_id"] == "2" and output["type"] == "image" and output["name"].startswith("copy")
    status, headers, saved = alice.request("GET", output["url"])
    assert status == 200 and headers["content-type"] == "image/png" and saved[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(io.BytesIO(saved)).getpixel((0, 0)) == (0, 0, 255)
    assert output["size_bytes"] == len(saved)
    # The output is an asset: its hash is computed when asked for, and the id is stable.
    status, described = alice.json("GET", f"/api/v2/assets/{output['id']}")
    assert status == 200 and described["hash"] == "blake3:" + blake3(saved).hexdigest()
    assert described["job_id"] == job["id"]
    assert finished(alice, job["id"])["outputs"][0]["id"] == output["id"]

    # An ordinary job: ComfyUI's routes show it, and the audit log recorded who queued it.
    assert job["id"] in alice.json("GET", "/history")[1]
    assert any(j["id"] == job["id"] for j in alice.json("GET", "/api/jobs")[1]["jobs"])
    logged = [r for r in records(alice.data_dir / "audit") if r.get("job_id") == job["id"]]
    assert any(r["kind"] == "request" and r["route"] == "/api/v2/jobs" and r["user"] == "alice" for r in logged)
    status, graph = alice.json("GET", f"/api/v2/jobs/{job['id']}/workflow")
    assert (
        status == 200 and graph["format"] == "api" and graph["workflow"]["1"]["inputs"]["image"].startswith("assets/")
    )


def test_a_comfyui_job_reads_through_v2(alice: AppServer) -> None:
    prompt_id = submit(alice, small_job("v2/comfy"))
    done(alice, prompt_id)
    job = finished(alice, prompt_id)
    assert job["status"] == "succeeded" and len(job["outputs"]) == 1


def test_an_idempotency_key_is_single_use_and_released_when_nothing_was_queued(alice: AppServer) -> None:
    key = str(uuid.uuid4())
    status, answer = submit_v2(alice, {"1": {"class_type": "NoSuchNode", "inputs": {}}}, key)
    assert status == 422 and code(answer) == "invalid_workflow"
    status, job = submit_v2(alice, small_job("v2/key"), key)  # the failed one did not use the key up
    assert status == 201, job
    status, answer = submit_v2(alice, small_job("v2/key"), key)
    assert status == 422 and code(answer) == "idempotency_key_reuse"
    finished(alice, job["id"])
    assert len([j for j in alice.json("GET", "/api/v2/jobs?limit=100")[1]["jobs"] if j["id"] == job["id"]]) == 1


def test_errors_come_in_v2s_envelope_and_name_what_is_wrong(alice: AppServer, shared: Any) -> None:
    server, _ = shared
    status, _, body = server.request("GET", "/api/v2/jobs/x")  # no token
    assert status == 401 and code(json.loads(body)) == "unauthorized"
    assert server.request("GET", "/api/v2/health")[0] == 200  # always open
    ui = {"nodes": [], "links": [], "version": 0.4}
    assert code(submit_v2(alice, ui)[1]) == "workflow_format_ui"
    status, answer = submit_v2(alice, small_job("v2/x"), webhook_url="https://example.com/hook")
    assert status == 422 and "webhook_url" in answer["error"]["message"]
    status, answer = submit_v2(alice, small_job("v2/x"), extra_data={"client_id": "x"})
    assert status == 422 and answer["error"]["details"]["errors"][0]["field"] == "extra_data.client_id"
    status, answer = submit_v2(alice, copy_graph({"__type": "core/ASSET", "info": {"id": str(uuid.uuid4())}}, "x"))
    assert status == 422 and code(answer) == "missing_asset" and answer["error"]["details"]["node_id"] == "1"
    status, _, body = alice.request("POST", "/api/v2/jobs", raw=b'{"workflow": NaN}')
    assert status == 422 and code(json.loads(body)) == "invalid_request"
    status, answer = submit_v2(alice, small_job("v2/x"), metadata="x" * 1025)
    assert status == 422 and code(answer) == "metadata_invalid"
    assert answer["error"]["details"]["errors"][0]["field"].startswith("metadata")
    status, answer = submit_v2(alice, small_job("v2/x"), metadata={f"k{i}": "v" for i in range(17)})
    assert status == 422 and "16" in answer["error"]["message"]
    status, answer = alice.json("GET", "/api/v2/jobs?limit=1000")
    assert status == 422 and code(answer) == "invalid_request"


def test_another_users_jobs_and_assets_are_not_found(alice: AppServer, bob: AppServer) -> None:
    content = png("green")
    _, asset = upload_asset(alice, content, content_type="image/png", file_path="secret.png")
    status, job = submit_v2(alice, copy_graph(asset_ref(asset), "v2/secret"))
    assert status == 201
    job = finished(alice, job["id"])
    for path in (f"/api/v2/jobs/{job['id']}", f"/api/v2/jobs/{job['id']}/workflow"):
        status, answer = bob.json("GET", path)
        assert status == 404 and code(answer) == "not_found"
    assert bob.json("POST", f"/api/v2/jobs/{job['id']}/cancel")[0] == 404
    assert bob.request("GET", f"/api/v2/jobs/{job['id']}/events")[0] == 404
    for asset_id in (asset["id"], job["outputs"][0]["id"]):
        assert bob.json("GET", f"/api/v2/assets/{asset_id}")[0] == 404
        assert bob.request("GET", f"/api/v2/assets/{asset_id}/content")[0] == 404
        assert bob.request("DELETE", f"/api/v2/assets/{asset_id}")[0] == 404
    # Content addressing tells bob nothing about what alice uploaded.
    assert alice.request("HEAD", f"/api/v2/assets/by-hash/{asset['hash']}")[0] == 200
    assert bob.request("HEAD", f"/api/v2/assets/by-hash/{asset['hash']}")[0] == 404
    status, answer = bob.json("POST", "/api/v2/assets/from-hash", {"hash": asset["hash"]})
    assert status == 404 and code(answer) == "blob_not_found"
    status, answer = submit_v2(bob, copy_graph(asset_ref(asset), "v2/steal"))
    assert status == 422 and code(answer) == "missing_asset"
    assert all(j["id"] != job["id"] for j in bob.json("GET", "/api/v2/jobs")[1]["jobs"])


def test_uploads_are_stored_once_per_content_and_served_with_ranges(alice: AppServer) -> None:
    content = png("yellow", 48)
    first = upload_asset(alice, content, content_type="image/png", file_path="a.png")[1]
    status, second = upload_asset(alice, content, content_type="image/png", file_path="b.png")
    assert status == 200 and second["created_new"] is False and second["hash"] == first["hash"]
    assert second["id"] != first["id"]
    folder = alice.data_dir / "input" / "users" / "alice" / "assets"
    assert [p.name for p in folder.iterdir() if first["hash"][7:] in p.name] == [first["hash"][7:] + ".png"]
    status, minted = alice.json("POST", "/api/v2/assets/from-hash", {"hash": first["hash"], "file_path": "c.png"})
    assert status == 201 and minted["hash"] == first["hash"] and minted["file_path"] == "c.png"
    status, answer = upload_asset(
        alice, content, content_type="image/png", file_path="d.png", expected_hash="blake3:" + "0" * 64
    )
    assert status == 409 and code(answer) == "hash_mismatch"

    status, headers, part = alice.request("GET", first["url"], headers={"Range": "bytes=0-7"})
    assert status == 206 and part == content[:8] and headers["content-range"] == f"bytes 0-7/{len(content)}"
    assert alice.request("GET", first["url"], headers={"Range": f"bytes={len(content) + 10}-"})[0] == 416

    # The bytes go with the last record over them.
    for asset in (first, second):
        assert alice.request("DELETE", f"/api/v2/assets/{asset['id']}")[0] == 204
        assert alice.request("DELETE", f"/api/v2/assets/{asset['id']}")[0] == 404
    assert (folder / (first["hash"][7:] + ".png")).exists()  # `minted` still holds them
    assert alice.request("DELETE", f"/api/v2/assets/{minted['id']}")[0] == 204
    assert not (folder / (first["hash"][7:] + ".png")).exists()
    assert alice.request("HEAD", f"/api/v2/assets/by-hash/{first['hash']}")[0] == 404


def test_an_output_is_held_by_its_job(alice: AppServer) -> None:
    status, job = submit_v2(alice, small_job("v2/held"))
    output = finished(alice, job["id"])["outputs"][0]
    status, _, body = alice.request("DELETE", f"/api/v2/assets/{output['id']}")
    assert status == 409 and code(json.loads(body)) == "asset_in_use"


def test_cancel_ends_a_waiting_job_at_once_and_stops_a_running_one(alice: AppServer) -> None:
    _, running = submit_v2(alice, slow_job("v2/slow"))
    _, waiting = submit_v2(alice, small_job("v2/waiting"))
    wait_until(lambda: alice.json("GET", f"/api/v2/jobs/{running['id']}")[1]["status"] == "running")
    status, answer = alice.json("POST", f"/api/v2/jobs/{waiting['id']}/cancel")
    assert status == 200 and answer["status"] == "canceled", answer
    models.Job.model_validate(answer)
    assert waiting["id"] in alice.json("GET", "/history")[1]  # in the history, never run
    status, answer = alice.json("POST", f"/api/v2/jobs/{running['id']}/cancel")
    assert status == 200 and answer["status"] in ("canceling", "canceled")
    assert finished(alice, running["id"])["status"] == "canceled"
    assert alice.json("POST", f"/api/v2/jobs/{running['id']}/cancel")[1]["status"] == "canceled"  # idempotent


def test_the_list_pages_newest_first_and_filters_by_status_and_label(alice: AppServer) -> None:
    ids = []
    for i in range(3):
        status, job = submit_v2(alice, small_job(f"v2/list{i}", seed=i), metadata={"batch": "list", "n": str(i)})
        assert status == 201
        ids.append(job["id"])
    for job_id in ids:
        finished(alice, job_id)
    status, page = alice.json("GET", "/api/v2/jobs?limit=2&metadata[batch]=list")
    assert status == 200 and [j["id"] for j in page["jobs"]] == ids[::-1][:2]
    rest = alice.json("GET", f"/api/v2/jobs?limit=2&metadata[batch]=list&cursor={page['next_cursor']}")[1]
    assert [j["id"] for j in rest["jobs"]] == [ids[0]]
    labelled = alice.json("GET", "/api/v2/jobs?metadata[n]=1")[1]["jobs"]
    assert [j["id"] for j in labelled] == [ids[1]]
    assert all(j["status"] == "succeeded" for j in alice.json("GET", "/api/v2/jobs?status=succeeded")[1]["jobs"])
    assert alice.json("GET", "/api/v2/jobs?status=queued")[1]["jobs"] == []


def test_an_event_stream_tells_a_job_from_its_status_to_its_outputs(alice: AppServer) -> None:
    # The worker busy with another job: the stream is open before this one starts.
    _, blocker = submit_v2(alice, slow_job("v2/blocker"))
    wait_until(lambda: alice.json("GET", f"/api/v2/jobs/{blocker['id']}")[1]["status"] == "running")
    status, job = submit_v2(alice, small_job("v2/stream", steps=3, seed=uuid.uuid4().int % 2**32))
    assert status == 201
    events: list[tuple[str, dict[str, Any]]] = []
    with alice.client.stream("GET", f"/api/v2/jobs/{job['id']}/events", headers=alice.headers) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: ") and name is not None:
                events.append((name, json.loads(line[6:])))
                if len(events) == 1:
                    assert events[0] == ("status", {"status": "queued", "queue_position": 1})
                    assert alice.json("POST", f"/api/v2/jobs/{blocker['id']}/cancel")[0] == 200
    names = [name for name, _ in events]
    assert names[-1] == "status" and {"progress", "preview", "output"} <= set(names), names
    assert ("status", {"status": "running", "queue_position": None}) in events
    final = events[-1][1]
    assert final["status"] == "succeeded" and len(final["outputs"]) == 1
    for name, data in events:
        if name == "progress":
            models.Progress.model_validate(data)
        elif name == "output":
            models.Output.model_validate(data)
            assert data["id"] == final["outputs"][0]["id"]
        elif name == "status":
            models.StatusEvent.model_validate(data)
        elif name == "preview":
            models.PreviewEvent.model_validate(data)
            assert data["node_id"] == "3" and data["content_type"] == "image/jpeg"
            assert Image.open(io.BytesIO(base64.b64decode(data["data_base64"]))).format == "JPEG"


def test_data_written_by_v2_survives_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    tokens = make_tokens(data)
    key = str(uuid.uuid4())
    with serving(data, auth="on", preload=False) as server:
        alice = server.as_token(tokens["user"])
        _, asset = upload_asset(alice, png("red"), content_type="image/png", file_path="p.png")
        status, job = submit_v2(alice, copy_graph(asset_ref(asset), "v2/restart"), key)
        assert status == 201
        job = finished(alice, job["id"])
    with serving(data, auth="on", preload=False) as server:
        alice = server.as_token(tokens["user"])
        assert finished(alice, job["id"])["outputs"][0]["id"] == job["outputs"][0]["id"]
        assert alice.json("GET", f"/api/v2/assets/{asset['id']}")[0] == 200
        assert code(submit_v2(alice, copy_graph(asset_ref(asset), "v2/again"), key)[1]) == "idempotency_key_reuse"


def test_jobs_and_uploads_go_once_past_their_expiry(alice: AppServer) -> None:
    runtime = alice.runtime
    _, asset = upload_asset(alice, png("white"), content_type="image/png", file_path="w.png", expires_in="60")
    assert asset["expires_at"] is not None
    _, job = submit_v2(alice, copy_graph(asset_ref(asset), "v2/expire"))
    job = finished(alice, job["id"])
    output = job["outputs"][0]
    blob = alice.data_dir / "input" / "users" / "alice" / "assets" / (asset["hash"][7:] + ".png")
    assert blob.exists()
    now = time.time()
    expire(runtime, now + 30)  # neither is due yet
    assert alice.json("GET", f"/api/v2/assets/{asset['id']}")[0] == 200
    assert alice.json("GET", f"/api/v2/jobs/{job['id']}")[0] == 200
    jobs, assets = expire(runtime, now + runtime.settings.job_retention_s + 3600)
    assert jobs >= 1 and assets >= 1
    assert alice.json("GET", f"/api/v2/assets/{asset['id']}")[0] == 404 and not blob.exists()
    assert alice.json("GET", f"/api/v2/jobs/{job['id']}")[0] == 404
    assert alice.json("GET", f"/api/v2/assets/{output['id']}")[0] == 404  # its job's output, gone with it
    assert job["id"] not in alice.json("GET", "/history")[1]


def test_comfyuis_own_routes_under_api_v2_keep_comfyuis_shapes(alice: AppServer) -> None:
    status, tree = alice.json("GET", "/api/v2/userdata?path=")
    assert status == 200 and isinstance(tree, list)
    status, answer = alice.json("GET", "/api/v2/nothing-here")
    assert (status == 404 and "error" not in answer) or not isinstance(answer.get("error"), dict)


def test_hostile_values_get_a_4xx_and_reads_of_bytes_are_audited(alice: AppServer) -> None:
    ref = {"__type": "core/ASSET", "info": {"id": str(uuid.uuid4())}}
    status, answer = submit_v2(alice, {"1": {"class_type": "LoadImage", "inputs": {"image": ref}}, "2": 5})
    assert status == 422 and code(answer) in ("missing_asset", "invalid_workflow")
    assert alice.json("GET", "/api/v2/jobs?limit=²")[0] == 422
    deep = base64.urlsafe_b64encode(b"[" * 5000).decode()
    assert code(alice.json("GET", f"/api/v2/jobs?cursor={deep}")[1]) == "invalid_cursor"
    huge = base64.urlsafe_b64encode(json.dumps({"offset": 10**20}).encode()).decode()
    assert code(alice.json("GET", f"/api/v2/jobs?cursor={huge}")[1]) == "invalid_cursor"
    status, answer = upload_asset(alice, png("gray"), content_type="image/png", file_path="g.png", expires_in="²")
    assert status == 422 and code(answer) == "invalid_request"
    _, asset = upload_asset(alice, png("gray"), content_type="image/png", file_path="g.png")
    assert alice.request("GET", asset["url"])[0] == 200
    wait_until(
        lambda: any(
            r.get("asset_id") == asset["id"] and r["method"] == "GET"
            for r in records(alice.data_dir / "audit")
            if r.get("kind") == "request"
        )
    )


def test_the_word_filter_quotas_and_rate_limits_apply_to_v2_as_to_prompt(tmp_path: Path) -> None:
    rules = tmp_path / "rules.txt"
    rules.write_text("R-BAN: banned\n", "utf-8")
    data = tmp_path / "data"
    tokens = make_tokens(data, alice={"images_per_day": 1, "rpm": 3})
    with serving(data, auth="on", security={"blocklist": (rules,)}, preload=False) as server:
        alice = server.as_token(tokens["user"])
        blocked = small_job("v2/blocked")
        blocked["6"]["inputs"]["text"] = "a b.a.n.n.e.d circle"
        key = str(uuid.uuid4())
        status, answer = submit_v2(alice, blocked, key)
        assert status == 422 and code(answer) == "prompt_blocked" and "R-BAN" in answer["error"]["message"]
        assert "banned" not in json.dumps(answer).lower()
        assert any(r.get("outcome") == "blocked" for r in records(data / "audit") if r.get("kind") == "request")
        status, job = submit_v2(alice, small_job("v2/first"), key)  # a refused submission left the key free
        assert status == 201, job
        status, answer = submit_v2(alice, small_job("v2/second", seed=1))  # one image a day
        assert status == 429 and code(answer) == "quota_exceeded" and answer["error"]["details"]["quota"]
        status, _, body = alice.request("POST", "/api/v2/jobs", {"workflow": small_job("v2/third")})
        assert status == 429 and code(json.loads(body)) == "rate_limited"  # the fourth change this minute


def test_a_revoked_users_event_streams_end(tmp_path: Path) -> None:
    data = tmp_path / "data"
    tokens = make_tokens(data)
    with serving(data, auth="on", preload=False, shutdown_grace_s=0) as server:
        alice, admin = server.as_token(tokens["user"]), server.as_token(tokens["admin"])
        submit_v2(alice, slow_job("v2/revoked-blocker"))  # the worker busy: the job waits
        _, job = submit_v2(alice, small_job("v2/revoked"))
        seen = []
        with alice.client.stream("GET", f"/api/v2/jobs/{job['id']}/events", headers=alice.headers) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    seen.append(json.loads(line[6:]))
                    if len(seen) == 1:
                        assert admin.request("DELETE", "/api/zimage/tokens/alice")[0] == 200
        assert len(seen) == 1 and seen[0]["status"] == "queued"  # then the stream ended, no more
