"""The server as processes: SIGKILL and SIGTERM of the server, a killed worker process, restarts."""

from __future__ import annotations

import json
import os
import signal
import uuid
from pathlib import Path

from websockets.sync.client import connect

from tests.server import next_message, process_state, running_server, worker_processes
from tests.support.jobs import (
    history,
    png,
    running_ids,
    running_job,
    slow_job,
    small_job,
    submit,
    upload_asset,
    wait_until,
)
from tests.support.listeners import Quiet
from zimage_serve.queue.sqlite_queue import SQLiteQueue
from zimage_serve.worker.build import RunSettings, WorkerConfig
from zimage_serve.worker.process import WorkerProcess


def test_sigkill_with_50_queued_loses_nothing_and_writes_nothing_twice(tmp_path: Path) -> None:
    data = tmp_path / "data"
    key = str(uuid.uuid4())
    with running_server(data) as server:
        blocker = submit(server, running_job("blocker"))
        wait_until(lambda: running_ids(server) == [blocker])
        queued = [submit(server, small_job(f"job{i}", seed=i)) for i in range(50)]
        # Comfy API v2's records too: an uploaded asset, and a job queued with an idempotency key.
        status, asset = upload_asset(server, png((24, 24), "blue"), content_type="image/png", file_path="k.png")
        assert status == 201, asset
        copy = {
            "1": {
                "class_type": "LoadImage",
                "inputs": {"image": {"__type": "core/ASSET", "info": {"id": asset["id"]}}},
            },
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "v2copy"}},
        }
        status, _, answer = server.request("POST", "/api/v2/jobs", {"workflow": copy}, headers={"Idempotency-Key": key})
        assert status == 201, answer
        v2_job = json.loads(answer)["id"]
        earlier = history(server)
        assert blocker not in earlier  # killed while it runs
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(30)
    with running_server(data) as server:
        wait_until(lambda: len(history(server)) == 52, timeout=300)
        done = history(server)
        assert set(done) == {blocker, v2_job, *queued} and earlier.keys() <= done.keys()
        assert all(entry["status"]["status_str"] == "success" for entry in done.values())
        outputs = sorted(p.name for p in (data / "output").glob("*.png"))
        expected = ["blocker_00001_.png", "v2copy_00001_.png", *[f"job{i}_00001_.png" for i in range(50)]]
        assert outputs == sorted(expected)
        assert server.json("GET", f"/api/v2/assets/{asset['id']}")[0] == 200
        status, _, answer = server.request("POST", "/api/v2/jobs", {"workflow": copy}, headers={"Idempotency-Key": key})
        assert status == 422 and json.loads(answer)["error"]["code"] == "idempotency_key_reuse"


def test_a_killed_worker_process_is_replaced_and_its_job_run_again(tmp_path: Path) -> None:
    with running_server(tmp_path / "data") as server:
        job = submit(server, running_job("victim"))
        wait_until(lambda: running_ids(server) == [job])
        (worker,) = worker_processes(server.process.pid)
        os.kill(worker, signal.SIGKILL)
        assert job not in history(server)
        later = submit(server, small_job("later"))
        wait_until(lambda: {job, later} <= history(server).keys(), timeout=300)
        done = history(server)
        assert done[job]["status"]["status_str"] == "success" and done[later]["status"]["status_str"] == "success"
        assert server.process.poll() is None and worker_processes(server.process.pid) != [worker]
        assert sorted(p.name for p in (server.data_dir / "output").glob("*.png")) == [
            "later_00001_.png",
            "victim_00001_.png",
        ]


def test_the_worker_process_dies_with_the_server(tmp_path: Path) -> None:
    with running_server(tmp_path / "data") as server:
        wait_until(lambda: len(worker_processes(server.process.pid)) == 1)
        (worker,) = worker_processes(server.process.pid)
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(30)
        wait_until(lambda: process_state(worker) in (None, "Z"), timeout=30)


def test_sigterm_lets_the_running_job_finish(tmp_path: Path) -> None:
    data = tmp_path / "data"
    # A job of seconds, so that it is still running when seen and signalled on a busy machine (a shorter one
    # could finish between two looks at the queue), and a grace long enough for it.
    with running_server(data, "--shutdown-grace", "240") as server:
        job = submit(server, running_job("last"))
        wait_until(lambda: running_ids(server) == [job])
        server.process.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal so the exit status tells why it stopped.
        assert server.process.wait(300) in (0, -signal.SIGTERM)
    finished = SQLiteQueue(data / "queue.sqlite3").get(job)  # what the next start would serve as its history
    assert finished is not None and finished.state == "success", finished
    assert (data / "output" / "last_00001_.png").is_file()


def test_a_worker_process_still_loading_is_stopped_without_waiting_for_its_model(tmp_path: Path) -> None:
    store = SQLiteQueue(tmp_path / "queue.sqlite3")
    folders = [tmp_path / name for name in ("models", "input", "output", "temp")]
    config = WorkerConfig([folders[0]], *folders[1:], RunSettings(device="cpu"), queue=str(tmp_path / "queue.sqlite3"))
    worker = WorkerProcess(config, Quiet(), store)
    worker.start()
    process = worker._process
    assert worker.stop(timeout=60) is True
    # Killed while importing torch, instead of told to stop once it had loaded its model.
    assert process is not None and process.exitcode == -signal.SIGKILL
    assert store.count("running") == 0 and store.count("pending") == 0


def test_the_worker_process_reports_its_node_sends_events_and_takes_interrupts_and_free(tmp_path: Path) -> None:
    """Over the pipe to a real worker process: no socket is connected when the prompt starts, so the child
    sends no events; the one that connects mid-run is told the node the child runs (asked over the pipe)
    and gets the events from then on; an interrupt and a free reach the child."""
    with running_server(tmp_path / "data") as server:
        warm = submit(server, small_job("warm"))  # loads the models and encodes the prompt: cached from now on
        wait_until(lambda: warm in history(server))
        client_id = uuid.uuid4().hex
        prompt_id = submit(server, slow_job("late"), client_id=client_id)
        wait_until(lambda: prompt_id in running_ids(server))
        with connect(f"{server.ws_url}?clientId={client_id}") as socket:
            messages = [next_message(socket)]
            assert messages[0]["type"] == "status"
            while not {"progress", "executing"} <= {m["type"] for m in messages}:  # in either order
                messages.append(next_message(socket))
            nodes = [m["data"]["node"] for m in messages if m["type"] == "executing"]
            assert nodes[:1] == ["3"]  # the warm run cached everything before the sampler
            assert all(m["data"]["prompt_id"] == prompt_id for m in messages if m["type"] == "progress")
            assert server.request("POST", "/interrupt", {"prompt_id": prompt_id})[0] == 200
            while not (messages[-1]["type"] == "executing" and messages[-1]["data"]["node"] is None):
                messages.append(next_message(socket))
            assert "execution_interrupted" in [m["type"] for m in messages]
        assert server.request("POST", "/free", {"unload_models": True, "free_memory": True})[0] == 200
        after = submit(server, small_job("after"))  # the models load again in the child
        wait_until(lambda: after in history(server))
        assert history(server)[after]["status"]["status_str"] == "success"
