"""What the ComfyUI frontend calls: user data, settings, the jobs API, caching, the offline API docs, and
completion events that always find their history entry."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.app import AppServer, serving
from tests.support.jobs import next_event, ready, settle, slow_job, small_job, submit, wait_until
from tests.support.tokens import make_tokens
from tests.support.watch import calls_on_the_loop

JOB_KEYS = {"id", "status", "priority", "create_time", "outputs_count"}


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppServer]:
    with serving(tmp_path_factory.mktemp("frontend") / "data") as running:
        ready(running)  # its model loaded now, not while another test's server loads one (tests/support/jobs.py)
        yield running


@pytest.fixture()
def server(shared: AppServer) -> AppServer:
    """The shared server, with nothing left queued or running by the test before."""
    settle(shared)
    return shared


def test_completion_events_always_find_the_history_entry(server: AppServer) -> None:
    """The frontend refreshes its panels on execution_success: the entry must be there by then."""
    with server.websocket("/ws?clientId=panels") as socket:
        next_event(socket)
        jobs = [submit(server, small_job("events", seed=i), client_id="panels") for i in range(15)]
        seen: dict[str, str] = {}
        while len(seen) < len(jobs):
            message = next_event(socket)
            if message["type"] in ("execution_success", "execution_error", "execution_interrupted"):
                prompt_id = message["data"]["prompt_id"]
                entry = server.json("GET", f"/history/{prompt_id}")[1]
                seen[prompt_id] = "found" if prompt_id in entry else "missing"
        assert set(seen.values()) == {"found"}, seen


def test_user_data_crud_with_encoded_paths_and_moves(server: AppServer) -> None:
    status, files = server.json("GET", "/api/userdata?dir=workflows&recurse=true&split=false&full_info=true")
    assert status == 200 and files == []  # the folder is there from the first visit
    body = json.dumps({"nodes": [], "links": []}).encode()
    status, _, answer = server.request(
        "POST", "/api/userdata/workflows%2Fmine.json?overwrite=false&full_info=true", raw=body
    )
    info = json.loads(answer)
    assert status == 200 and info["path"] == "workflows/mine.json" and info["size"] == len(body)
    assert server.request("POST", "/api/userdata/workflows%2Fmine.json?overwrite=false", raw=body)[0] == 409
    assert server.request("GET", "/api/userdata/workflows%2Fmine.json")[2] == body
    listed = server.json("GET", "/api/userdata?dir=workflows&recurse=true&split=false&full_info=true")[1]
    assert [f["path"] for f in listed] == ["mine.json"] and {"size", "modified", "created"} <= set(listed[0])
    assert server.json("GET", "/api/userdata?dir=workflows&split=true")[1] == [["mine.json", "mine.json"]]
    status, moved = server.json("POST", "/api/userdata/workflows%2Fmine.json/move/workflows%2Fsub%2Fours.json")
    assert status == 200 and moved == "workflows/sub/ours.json"
    assert server.request("GET", "/api/userdata/workflows%2Fmine.json")[0] == 404
    tree = server.json("GET", "/api/v2/userdata?path=workflows")[1]
    assert tree[0] == {"name": "sub", "path": "workflows/sub", "type": "directory"}
    assert server.request("DELETE", "/api/userdata/workflows%2Fsub%2Fours.json")[0] == 204
    for escape in ("..%2F..%2Fqueue.sqlite3", "%2Fetc%2Fpasswd"):
        assert server.request("GET", f"/api/userdata/{escape}")[0] in (400, 403)
    assert server.request("GET", "/api/userdata?dir=..%2F..")[0] == 403
    assert server.request("GET", "/api/userdata")[0] == 400
    assert server.request("GET", "/api/userdata/user.css")[0] == 200  # an empty stylesheet until one is saved


def test_settings_persist_across_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with serving(data, preload=False) as first:
        assert first.request("POST", "/api/settings", {"Comfy.Locale": "zh", "Comfy.X": 1})[0] == 200
        assert first.request("POST", "/api/settings/Comfy.Y", [1, 2])[0] == 200
        assert first.request("POST", "/api/settings", raw=b"[1]")[0] == 400
        assert first.request("POST", "/api/userdata/workflows%2Fkept.json", raw=b"{}")[0] == 200
    with serving(data, preload=False) as again:
        assert again.json("GET", "/api/settings")[1] == {"Comfy.Locale": "zh", "Comfy.X": 1, "Comfy.Y": [1, 2]}
        assert again.json("GET", "/api/settings/Comfy.Y")[1] == [1, 2]
        assert again.json("GET", "/api/settings/Comfy.Nothing")[1] is None
        assert again.request("GET", "/api/userdata/workflows%2Fkept.json")[2] == b"{}"


def test_the_jobs_api_lists_queue_and_history_in_the_frontends_shapes(server: AppServer) -> None:
    blocker = submit(server, slow_job("jobs-blocker"))
    wait_until(lambda: server.json("GET", f"/api/jobs/{blocker}")[1]["status"] == "in_progress")
    waiting = submit(server, small_job("jobs-waiting"), extra_data={"extra_pnginfo": {"workflow": {"id": "wf-1"}}})
    queue = server.json("GET", "/api/jobs?status=in_progress,pending&limit=200&offset=0")[1]
    assert [j["id"] for j in queue["jobs"]] == [waiting, blocker]  # newest first
    assert all(set(j) >= JOB_KEYS and j["outputs_count"] == 0 for j in queue["jobs"])
    assert queue["pagination"] == {"offset": 0, "limit": 200, "total": 2, "has_more": False}
    assert server.json("GET", "/api/jobs?workflow_id=wf-1")[1]["jobs"][0]["id"] == waiting
    assert server.json("POST", f"/api/jobs/{blocker}/cancel")[1] == {"cancelled": True}
    wait_until(lambda: server.json("GET", f"/api/jobs/{waiting}")[1]["status"] == "completed")
    history = server.json("GET", "/api/jobs?status=completed,failed,cancelled&limit=1&offset=0")[1]
    assert history["pagination"]["has_more"] and history["jobs"][0]["id"] == waiting
    done = server.json("GET", f"/api/jobs/{waiting}")[1]
    assert done["outputs_count"] == 1 and done["preview_output"]["mediaType"] == "images"
    assert done["preview_output"]["nodeId"] == "9" and done["execution_status"]["completed"]
    assert done["execution_end_time"] >= done["execution_start_time"] and done["workflow"]["prompt"]["9"]
    assert server.json("GET", f"/api/jobs/{blocker}")[1]["status"] == "cancelled"
    assert server.json("GET", "/api/jobs/nothing") == (404, {"error": "Job not found"})
    assert server.json("POST", "/api/jobs/cancel", {"job_ids": ["nothing"]})[1] == {"cancelled": False}
    for bad in ("status=done", "limit=0", "limit=x", "sort_by=size", "sort_order=up"):
        assert server.request("GET", f"/api/jobs?{bad}")[0] == 400, bad
    assert server.request("POST", "/api/jobs/cancel", {"job_ids": "x"})[0] == 400


def test_assets_are_cached_and_index_is_not(server: AppServer) -> None:
    from zimage_serve.server.routes_frontend import frontend_root

    asset = next((frontend_root() / "assets").glob("index-*.js")).name
    status, headers, _ = server.request("GET", f"/assets/{asset}")
    assert status == 200 and "immutable" in headers["cache-control"] and "javascript" in headers["content-type"]
    status, headers, body = server.request("GET", "/")
    assert status == 200 and "no-cache" in headers["cache-control"] and b'<div id="vue-app">' in body
    index = server.json("GET", "/templates/index.json")[1]
    names = [t["name"] for t in index[0]["templates"]]
    assert names[:3] == ["zimage-nano", "01_get_started_text_to_image", "z-image-turbo"] and len(names) == 7
    assert (
        server.json("GET", "/templates/index.zh.json")[1] == index
        and server.json("GET", "/templates/index_logo.json")[1] == {}
    )
    template = server.json("GET", "/templates/zimage-nano.json")[1]
    assert {n["type"] for n in template["nodes"]} >= {"KSampler", "SaveImage"}
    status, headers, _ = server.request("GET", "/templates/zimage-nano-1.webp")
    assert status == 200 and headers["content-type"] == "image/webp"
    # ComfyUI's own templates are served as they are published, with the picture of their model
    from zimage_serve.workflows.templates import COMFY_ORG

    published = json.loads((COMFY_ORG / "image_z_image_int8.json").read_text())
    assert server.json("GET", "/templates/image_z_image_int8.json")[1] == published
    assert server.request("GET", "/templates/image_z_image_int8-1.webp")[0] == 200
    assert server.request("GET", "/templates/nothing.json")[0] == 404
    assert server.json("GET", "/api/system_stats")[1]["system"]["required_frontend_version"] == "1.58.1"


def test_the_api_docs_work_offline(server: AppServer) -> None:
    status, _, page = server.request("GET", "/docs")
    assert status == 200 and b"cdn" not in page.lower()
    for asset in (b"/zimage/docs-static/swagger-ui-bundle.js", b"/zimage/docs-static/swagger-ui.css"):
        assert asset in page
        assert server.request("GET", asset.decode())[0] == 200
    schema = server.json("GET", "/openapi.json")[1]
    assert "post" in schema["paths"]["/prompt"]


def test_with_authentication_each_user_has_their_own_settings_and_workflows(tmp_path: Path) -> None:
    data = tmp_path / "data"
    tokens = make_tokens(data)
    with serving(data, auth="on", preload=False) as server:
        alice, bob = server.as_token(tokens["user"]), server.as_token(tokens["other"])
        assert alice.request("POST", "/api/settings", {"Comfy.Locale": "zh"})[0] == 200
        assert alice.request("POST", "/api/userdata/workflows%2Fmine.json", raw=b"{}")[0] == 200
        assert bob.json("GET", "/api/settings")[1] == {}
        assert bob.request("GET", "/api/userdata/workflows%2Fmine.json")[0] == 404
        assert bob.json("GET", "/api/userdata?dir=workflows")[1] == []
        assert alice.json("GET", "/api/userdata?dir=workflows")[1] == ["mine.json"]
        assert (data / "userdata" / "alice" / "workflows" / "mine.json").is_file()
        assert server.request("GET", "/api/settings")[0] == 401


def test_userdata_is_downloaded_unless_it_is_a_raster_image(tmp_path: Path) -> None:
    """A user's .html or .svg shown inline would run as this server's page for whoever opens the link."""
    with serving(tmp_path / "data", preload=False) as server:
        png = b"\x89PNG\r\n\x1a\n"  # the signature is enough: the server serves bytes, it does not decode them
        for name, body in (("page.html", b"<script>alert(1)</script>"), ("pic.svg", b"<svg/>"), ("a.png", png)):
            assert server.request("POST", f"/api/userdata/{name}", raw=body)[0] == 200
        for name, disposition in (("page.html", "attachment"), ("pic.svg", "attachment"), ("a.png", "inline")):
            status, headers, _ = server.request("GET", f"/api/userdata/{name}")
            assert status == 200 and headers["content-disposition"].startswith(disposition), (name, headers)
            assert headers["x-content-type-options"] == "nosniff"


def test_each_user_has_a_quota_of_userdata_files_bytes_and_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from zimage_serve.server import routes_userdata

    monkeypatch.setattr(routes_userdata, "USERDATA_FILES", 3)
    monkeypatch.setattr(routes_userdata, "USERDATA_BYTES", 10_000)
    monkeypatch.setattr(routes_userdata, "SETTINGS_BYTES", 1_000)
    data = tmp_path / "data"
    tokens = make_tokens(data)
    with serving(data, auth="on", preload=False) as server:
        alice, bob = server.as_token(tokens["user"]), server.as_token(tokens["other"])
        for name in ("a", "b", "c"):
            assert alice.request("POST", f"/api/userdata/workflows%2F{name}.json", raw=b"{}")[0] == 200
        status, _, body = alice.request("POST", "/api/userdata/workflows%2Fd.json", raw=b"{}")
        assert status == 413 and b"3 files" in body
        assert alice.request("POST", "/api/userdata/workflows%2Fa.json", raw=b"x" * 9_000)[0] == 200  # replaced
        status, _, body = alice.request("POST", "/api/userdata/workflows%2Fb.json", raw=b"x" * 2_000)
        assert status == 413 and b"bytes used" in body
        # The settings object has a bound of its own, and a refused change leaves the old settings.
        assert alice.request("POST", "/api/settings", {"Comfy.Locale": "zh"})[0] == 200
        status, _, body = alice.request("POST", "/api/settings/Comfy.Huge", "y" * 2_000)
        assert status == 413 and b"settings" in body
        assert alice.json("GET", "/api/settings")[1] == {"Comfy.Locale": "zh"}
        # Bob's share is his own.
        assert bob.request("POST", "/api/userdata/workflows%2Fa.json", raw=b"x" * 9_000)[0] == 200
        # Room is made by deleting (her settings file counts among her files too).
        assert alice.request("POST", "/api/userdata/workflows%2Fd.json", raw=b"{}")[0] == 413
        for name in ("a", "b"):
            assert alice.request("DELETE", f"/api/userdata/workflows%2F{name}.json")[0] == 204
        assert alice.request("POST", "/api/userdata/workflows%2Fd.json", raw=b"{}")[0] == 200


def test_the_jobs_list_is_built_off_the_event_loop(server: AppServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Summarising, sorting and paging thousands of entries takes most of a second: never on the loop that
    answers every other user."""
    from zimage_serve.server import routes_jobs

    on_the_loop: list[bool] = []
    monkeypatch.setattr(routes_jobs, "job_summary", calls_on_the_loop(routes_jobs.job_summary, on_the_loop))
    done_job = submit(server, small_job("listed"))
    wait_until(lambda: server.json("GET", f"/api/jobs/{done_job}")[1]["status"] == "completed")
    on_the_loop.clear()  # one job's own page summarises that job alone
    assert server.json("GET", "/api/jobs?limit=5")[0] == 200
    assert on_the_loop and not any(on_the_loop)


def test_a_page_of_jobs_reads_that_page_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """F15: the store pages; 2,000 history entries are neither read nor summarised for a page of 10."""
    from zimage_serve.queue.jobs import Job, NewJob
    from zimage_serve.queue.sqlite_queue import SQLiteQueue
    from zimage_serve.server import routes_jobs

    data = tmp_path / "data"
    data.mkdir()
    store = SQLiteQueue(data / "queue.sqlite3")
    store.enqueue_many([NewJob.of(Job(f"old{i:04}", i, {}, {}, [])) for i in range(2000)])
    claimed = store.claim()
    while claimed is not None:
        claimed = store.finish(claimed.id, "error" if claimed.number % 4 == 0 else "success", {}, claim_next=True)
    store.close()
    summarised: list[str] = []
    summarise = routes_jobs.job_summary

    def counted(job: Job, *args: Any) -> dict[str, Any]:
        summarised.append(job.id)
        return summarise(job, *args)

    monkeypatch.setattr(routes_jobs, "job_summary", counted)
    with serving(data, preload=False) as server:
        status, page = server.json("GET", "/api/jobs?limit=10&offset=20")
        assert status == 200 and [job["id"] for job in page["jobs"]] == [f"old{i:04}" for i in range(1979, 1969, -1)]
        assert page["pagination"] == {"offset": 20, "limit": 10, "total": 2000, "has_more": True}
        assert len(summarised) == 10
        status, page = server.json("GET", "/api/jobs?status=failed&limit=3&sort_order=asc")
        assert [job["id"] for job in page["jobs"]] == ["old0000", "old0004", "old0008"]
        assert {job["status"] for job in page["jobs"]} == {"failed"} and page["pagination"]["total"] == 500
