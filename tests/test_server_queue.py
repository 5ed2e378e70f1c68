"""The server's queue over loopback: priorities, deletion, interrupt, limits, timeouts, and crashes."""

from __future__ import annotations

import io
import json
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

from PIL import Image
from websockets.sync.client import connect

from tests.server import Server, process_state, running_server, worker_processes
from tests.workflows import nano_prompt


def small_job(prefix: str, *, seed: int = 0, size: int = 64, steps: int = 1) -> dict[str, Any]:
    prompt = nano_prompt()
    prompt["13"]["inputs"].update(width=size, height=size)
    prompt["3"]["inputs"].update(seed=seed, steps=steps)
    prompt["9"]["inputs"]["filename_prefix"] = prefix
    return prompt


def slow_job(prefix: str) -> dict[str, Any]:
    return small_job(prefix, size=1024, steps=30)


def wait_until(condition: Any, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def history(server: Server) -> dict[str, Any]:
    return server.json("GET", "/history")[1]


def running_ids(server: Server) -> list[str]:
    return [item[1] for item in server.json("GET", "/queue")[1]["queue_running"]]


def submit(server: Server, prompt: dict[str, Any], **extra: Any) -> str:
    status, answer = server.json("POST", "/prompt", {"prompt": prompt, **extra})
    assert status == 200, answer
    return str(answer["prompt_id"])


def test_queue_order_delete_and_interrupt(tmp_path: Path) -> None:
    with running_server(tmp_path / "data") as server:
        blocker = submit(server, slow_job("blocker"))
        wait_until(lambda: running_ids(server) == [blocker])
        later = submit(server, small_job("later"))
        gone = submit(server, small_job("gone", seed=1))
        first = submit(server, small_job("first", seed=2), front=True)
        pending = server.json("GET", "/queue")[1]["queue_pending"]
        assert {item[1] for item in pending} == {later, gone, first}
        assert min(pending)[1] == first  # the lowest number runs first
        assert server.request("POST", "/queue", {"delete": [gone]})[0] == 200
        assert server.request("POST", "/interrupt", {"prompt_id": "not-running"})[0] == 200
        assert running_ids(server) == [blocker]
        assert server.request("POST", "/interrupt", {"prompt_id": blocker})[0] == 200
        wait_until(lambda: later in history(server))
        done = history(server)
        assert done[blocker]["status"]["status_str"] == "error"
        assert done[blocker]["status"]["messages"][-1][0] == "execution_interrupted"
        assert list(done)[-2:] == [first, later] and gone not in done
        assert server.request("POST", "/history", {"delete": [first]})[0] == 200
        assert first not in history(server)
        assert server.json("GET", f"/history/{first}") == (200, {})


def test_a_full_queue_answers_429_with_retry_after(tmp_path: Path) -> None:
    with running_server(tmp_path / "data", "--max-queue", "2") as server:
        blocker = submit(server, slow_job("blocker"))
        wait_until(lambda: running_ids(server) == [blocker])
        submit(server, small_job("a"))
        submit(server, small_job("b", seed=1))
        status, headers, content = server.request("POST", "/prompt", {"prompt": small_job("c", seed=2)})
        assert status == 429 and headers["retry-after"].isdigit()
        assert json.loads(content)["error"]["type"] == "queue_full"
        server.request("POST", "/queue", {"clear": True})
        server.request("POST", "/interrupt")


def test_the_concurrency_cap_runs_that_many_at_once_and_interrupt_picks_one(tmp_path: Path) -> None:
    with running_server(tmp_path / "data", "--concurrency", "2") as server:
        first, second, third = (submit(server, slow_job(name)) for name in ("first", "second", "third"))
        wait_until(lambda: sorted(running_ids(server)) == sorted([first, second]))
        assert [item[1] for item in server.json("GET", "/queue")[1]["queue_pending"]] == [third]
        assert server.request("POST", "/interrupt", {"prompt_id": first})[0] == 200
        wait_until(lambda: first in history(server))
        wait_until(lambda: sorted(running_ids(server)) == sorted([second, third]))
        assert server.json("GET", "/prompt")[1] == {"exec_info": {"queue_remaining": 2}}
        assert server.request("POST", "/interrupt")[0] == 200  # no prompt_id: every running prompt
        wait_until(lambda: {second, third} <= history(server).keys())
        done = history(server)
        assert all(done[i]["status"]["messages"][-1][0] == "execution_interrupted" for i in (first, second, third))


def test_a_job_past_its_time_limit_is_stopped_and_recorded(tmp_path: Path) -> None:
    with running_server(tmp_path / "data", "--job-timeout", "3") as server:
        slow = submit(server, slow_job("slow"))
        quick = submit(server, small_job("quick"))
        wait_until(lambda: quick in history(server))
        entry = history(server)[slow]
        assert entry["status"]["status_str"] == "error"
        kind, data = entry["status"]["messages"][-1]
        assert kind == "execution_error" and data["exception_type"] == "Timeout"
        assert "3 s limit" in data["exception_message"]
        assert history(server)[quick]["status"]["status_str"] == "success"


def test_sigkill_with_50_queued_loses_nothing_and_writes_nothing_twice(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with running_server(data) as server:
        blocker = submit(server, slow_job("blocker"))
        wait_until(lambda: running_ids(server) == [blocker])
        queued = [submit(server, small_job(f"job{i}", seed=i)) for i in range(50)]
        earlier = history(server)
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(30)
    with running_server(data) as server:
        wait_until(lambda: len(history(server)) == 51, timeout=300)
        done = history(server)
        assert set(done) == {blocker, *queued} and earlier.keys() <= done.keys()
        assert all(entry["status"]["status_str"] == "success" for entry in done.values())
        outputs = sorted(p.name for p in (data / "output").glob("*.png"))
        assert outputs == sorted(["blocker_00001_.png", *[f"job{i}_00001_.png" for i in range(50)]])


def test_a_killed_worker_process_is_replaced_and_its_job_run_again(tmp_path: Path) -> None:
    with running_server(tmp_path / "data") as server:
        job = submit(server, slow_job("victim"))
        wait_until(lambda: running_ids(server) == [job])
        (worker,) = worker_processes(server.process.pid)
        os.kill(worker, signal.SIGKILL)
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


def test_prompts_also_run_in_the_server_process_when_asked(tmp_path: Path) -> None:
    with running_server(tmp_path / "data", "--no-worker-process") as server:
        assert worker_processes(server.process.pid) == []
        blocker = submit(server, slow_job("blocker"))
        wait_until(lambda: running_ids(server) == [blocker])
        quick = submit(server, small_job("quick"))
        assert server.request("POST", "/interrupt", {"prompt_id": blocker})[0] == 200
        wait_until(lambda: quick in history(server))
        assert history(server)[quick]["status"]["status_str"] == "success"


def test_sigterm_lets_the_running_job_finish(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with running_server(data) as server:
        job = submit(server, small_job("last", size=512, steps=8))
        wait_until(lambda: running_ids(server) == [job])
        server.process.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal so the exit status tells why it stopped.
        assert server.process.wait(120) in (0, -signal.SIGTERM)
    with running_server(data) as server:
        entry = server.json("GET", f"/history/{job}")[1][job]
        assert entry["status"]["status_str"] == "success"
        assert (data / "output" / "last_00001_.png").is_file()


def upload(
    server: Server, content: bytes, filename: str = "photo.png", path: str = "/upload/image", **fields: str
) -> tuple[int, Any]:
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n".encode()
        + content
        + b"\r\n"
    )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    status, _, answer = server.request(
        "POST", path, raw=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    return status, json.loads(answer)


def png(size: tuple[int, int] = (16, 16), colour: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_uploads_are_checked_and_never_overwrite_unless_asked(tmp_path: Path) -> None:
    with running_server(tmp_path / "data") as server:
        assert upload(server, png()) == (200, {"name": "photo.png", "subfolder": "", "type": "input"})
        assert upload(server, png())[1]["name"] == "photo.png"  # the same bytes: reused
        assert upload(server, png(colour="blue"))[1]["name"] == "photo (1).png"
        assert upload(server, png(colour="green"), overwrite="true")[1]["name"] == "photo.png"
        assert upload(server, png(), subfolder="pasted")[1] == {
            "name": "photo.png",
            "subfolder": "pasted",
            "type": "input",
        }
        assert upload(server, b"not an image")[0] == 400
        assert upload(server, b"")[0] == 400
        assert upload(server, png(), subfolder="../..")[0] == 400
        assert upload(server, png(), type="secret")[0] == 400
        assert upload(server, png(), filename="../../escape.png")[1]["name"] == "escape.png"
        bomb = io.BytesIO()
        Image.new("1", (10000, 10000)).save(bomb, format="PNG")  # 100 MP in a few kB
        status, answer = upload(server, bomb.getvalue(), filename="bomb.png")
        assert status == 413 and "pixels" in answer["error"]
        assert sorted(p.name for p in (server.data_dir / "input").iterdir()) == [
            "escape.png",
            "pasted",
            "photo (1).png",
            "photo.png",
        ]
        prompt = nano_prompt()
        prompt["20"] = {"class_type": "LoadImage", "inputs": {"image": "photo.png"}}
        prompt["21"] = {"class_type": "PreviewImage", "inputs": {"images": ["20", 0]}}
        status, answer = server.json("POST", "/prompt", {"prompt": prompt})
        assert status == 200 and answer["node_errors"] == {}


def test_a_socket_that_connects_while_its_prompt_runs_gets_its_node_and_the_events_after(tmp_path: Path) -> None:
    """No socket is connected when the prompt starts, so the worker process sends no events; the one that
    connects mid-run is told the node being run (as ComfyUI tells a reconnecting frontend) and gets the
    events from then on."""
    with running_server(tmp_path / "data") as server:
        warm = submit(server, small_job("warm"))  # loads the models and encodes the prompt: cached from now on
        wait_until(lambda: warm in history(server))
        client_id = uuid.uuid4().hex
        prompt_id = submit(server, slow_job("late"), client_id=client_id)
        wait_until(lambda: prompt_id in running_ids(server))
        time.sleep(1.0)  # well into sampling (node 3), which takes many seconds at 1024²
        with connect(f"{server.ws_url}?clientId={client_id}") as socket:
            messages = [json.loads(socket.recv(timeout=60))]
            assert messages[0]["type"] == "status"
            seen = {"progress", "executing"}  # in either order: events flow while the child is asked
            while not seen <= {m["type"] for m in messages}:
                messages.append(json.loads(socket.recv(timeout=60)))
            nodes = [m["data"]["node"] for m in messages if m["type"] == "executing"]
            assert nodes[:1] == ["3"]  # the node it was on when the socket connected: KSampler
            assert all(m["data"]["prompt_id"] == prompt_id for m in messages if m["type"] == "progress")
            server.request("POST", "/interrupt", {"prompt_id": prompt_id})
            while not (messages[-1]["type"] == "executing" and messages[-1]["data"]["node"] is None):
                messages.append(json.loads(socket.recv(timeout=60)))
            assert "execution_interrupted" in [m["type"] for m in messages]
