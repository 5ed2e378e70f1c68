"""The server's queue through its routes: priorities, deletion, interrupt, limits, timeouts, uploads, sockets."""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path

from PIL import Image

from tests.support.app import serving
from tests.support.jobs import history, next_event, png, running_ids, slow_job, small_job, submit, upload, wait_until
from tests.workflows import nano_prompt


def test_queue_order_delete_and_interrupt(tmp_path: Path) -> None:
    with serving(tmp_path / "data") as server:
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
    with serving(tmp_path / "data", max_queue=2) as server:
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
    with serving(tmp_path / "data", concurrency=2) as server:
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
    with serving(tmp_path / "data", job_timeout=3) as server:
        slow = submit(server, slow_job("slow"))
        quick = submit(server, small_job("quick"))
        wait_until(lambda: quick in history(server))
        entry = history(server)[slow]
        assert entry["status"]["status_str"] == "error"
        kind, data = entry["status"]["messages"][-1]
        assert kind == "execution_error" and data["exception_type"] == "Timeout"
        assert "3 s limit" in data["exception_message"]
        assert history(server)[quick]["status"]["status_str"] == "success"


def test_uploads_are_checked_and_never_overwrite_unless_asked(tmp_path: Path) -> None:
    with serving(tmp_path / "data") as server:
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
    """No socket is connected when the prompt starts; the one that connects mid-run is told the node being
    run (as ComfyUI tells a reconnecting frontend) and gets the events from then on."""
    with serving(tmp_path / "data") as server:
        warm = submit(server, small_job("warm"))  # loads the models and encodes the prompt: cached from now on
        wait_until(lambda: warm in history(server))
        client_id = uuid.uuid4().hex
        prompt_id = submit(server, slow_job("late"), client_id=client_id)
        wait_until(lambda: [e.node for e in server.runtime.service.executing()] == ["3"])  # sampling, for seconds
        with server.websocket(f"/ws?clientId={client_id}") as socket:
            messages = [next_event(socket)]
            assert messages[0]["type"] == "status"
            seen = {"progress", "executing"}  # in either order: events flow while the child is asked
            while not seen <= {m["type"] for m in messages}:
                messages.append(next_event(socket))
            nodes = [m["data"]["node"] for m in messages if m["type"] == "executing"]
            assert nodes[:1] == ["3"]  # the node it was on when the socket connected: KSampler
            assert all(m["data"]["prompt_id"] == prompt_id for m in messages if m["type"] == "progress")
            server.request("POST", "/interrupt", {"prompt_id": prompt_id})
            while not (messages[-1]["type"] == "executing" and messages[-1]["data"]["node"] is None):
                messages.append(next_event(socket))
            assert "execution_interrupted" in [m["type"] for m in messages]
