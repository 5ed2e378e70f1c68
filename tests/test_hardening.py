"""Issue 16's findings, one named regression test each, against real server processes.

Each hostile request must get a clear 4xx that names the field or the limit, the listings must stay
strict JSON after it, no other user's job may suffer, and a normal job must still run at the end.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.server import Server, running_server, worker_processes
from tests.support.jobs import history, listings_are_strict, png, running_ids, small_job, submit, upload, wait_until
from tests.workflows import nano_prompt
from zimage_serve import strict_json
from zimage_serve.queue.jobs import Job
from zimage_serve.queue.store import JobStore


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data = tmp_path_factory.mktemp("hardening") / "data"
    outside = data.parent / "outside.png"
    Image.new("RGB", (8, 8), "blue").save(outside)
    (data / "input").mkdir(parents=True)
    (data / "input" / "planted.png").symlink_to(outside)
    Image.new("RGB", (8, 8), "red").save(data / "input" / "red.png")
    frames = [Image.new("P", (2048, 2048), i % 2) for i in range(40)]
    frames[0].save(data / "input" / "frames.gif", save_all=True, append_images=frames[1:])
    (data / "output").mkdir()
    (data / "output" / "drawing.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"><script>1</script></svg>')
    (data / "output" / "paper.pdf").write_bytes(b"%PDF-1.4\n")
    with running_server(data) as running:
        yield running
    log = running.log.read_text()
    assert "Traceback" not in log and " 500 " not in log, log[-3000:]


def post_prompt(server: Server, body: bytes) -> tuple[int, dict[str, Any]]:
    status, _, content = server.request("POST", "/prompt", raw=body)
    return status, json.loads(content)


def with_inputs(**changes: Any) -> dict[str, Any]:
    prompt = small_job("hardening")
    for key, value in changes.items():
        node, name = key.split("__")
        prompt[node]["inputs"][name] = value
    return prompt


def text_of(body: dict[str, Any]) -> str:
    """Everything an error answer says, as one text to look for names in."""
    return json.dumps(body, ensure_ascii=False)


NON_FINITE_BODIES = [
    ("number Infinity", '{"prompt": %s, "number": Infinity}', "number"),
    ("number NaN", '{"prompt": %s, "number": NaN}', "number"),
    ("NaN in an undeclared input", None, "prompt.3.inputs.undeclared"),
    ("Infinity in extra_data", '{"prompt": %s, "extra_data": {"deep": {"x": -Infinity}}}', "extra_data.deep.x"),
    ("NaN in cfg", None, "prompt.3.inputs.cfg"),
    ("Infinity in denoise", None, "prompt.3.inputs.denoise"),
    ("number of 400 digits", '{"prompt": %s, "number": ' + "9" * 400 + "}", "number"),
    ("a float that overflows", '{"prompt": %s, "extra_data": {"f": 1e999}}', "extra_data.f"),
    ("an integer beyond 64 bits", '{"prompt": %s, "extra_data": {"i": 18446744073709551616}}', "extra_data.i"),
    ("a lone surrogate", '{"prompt": %s, "extra_data": {"s": "\\ud800"}}', "extra_data.s"),
    ("a repeated key", '{"prompt": %s, "client_id": "a", "client_id": "b"}', "client_id"),
    ("extra_data nested 950 deep", '{"prompt": %s, "extra_data": ' + "[" * 950 + "]" * 950 + "}", "nested"),
]


def non_finite_body(name: str, template: str | None) -> bytes:
    prompt = json.dumps(small_job("nonfinite"))
    if template is not None:
        return (template % prompt).encode()
    marker = {"NaN in an undeclared input": ("undeclared", "NaN"), "NaN in cfg": ("cfg", "NaN")}.get(
        name, ("denoise", "Infinity")
    )
    graph = small_job("nonfinite")
    graph["3"]["inputs"][marker[0]] = "__MARK__"
    return json.dumps({"prompt": graph}).replace('"__MARK__"', marker[1]).encode()


@pytest.mark.parametrize(
    ("template", "named"), [c[1:] for c in NON_FINITE_BODIES], ids=[c[0] for c in NON_FINITE_BODIES]
)
def test_non_finite_and_oversized_numbers_are_refused_with_the_field_named(
    server: Server, template: str | None, named: str, request: pytest.FixtureRequest
) -> None:
    name = request.node.callspec.id
    status, answer = post_prompt(server, non_finite_body(name, template))
    assert status == 400, answer
    assert answer["error"]["type"] == "invalid_prompt" and named in text_of(answer), answer
    listings_are_strict(server)


def test_number_nan_is_a_400_not_a_409_and_nothing_disappears(server: Server) -> None:
    prompt_id = str(uuid.uuid4())
    body = json.dumps({"prompt": small_job("nan"), "prompt_id": prompt_id})[:-1] + ', "number": NaN}'
    status, answer = post_prompt(server, body.encode())
    assert status == 400 and "number" in text_of(answer)
    assert server.json("POST", "/prompt", {"prompt": small_job("nan"), "prompt_id": prompt_id})[0] == 200


def test_an_infinite_number_stored_by_an_older_version_cannot_stop_the_server(tmp_path: Path) -> None:
    """Rows the old code let in (a number of Infinity, NaN in extra_data, JSON nested 950 deep) are
    quarantined when the file is first opened; the server starts, lists strict JSON and runs jobs."""
    data = tmp_path / "data"
    store = JobStore(data / "queue.sqlite3")
    store.close()
    db = sqlite3.connect(data / "queue.sqlite3")
    db.execute("PRAGMA user_version=1")  # as the older version left it
    prompt = json.dumps(small_job("old"))
    rows = [
        ("inf", float("inf"), prompt, "{}"),
        ("nan-extra", 1.0, prompt, '{"x": NaN}'),
        ("deep", 2.0, prompt, '{"x": ' + "[" * 950 + "]" * 950 + "}"),
        ("fine", 3.0, prompt, "{}"),
    ]
    for job_id, number, text, extra in rows:
        db.execute(
            "INSERT INTO jobs (id, number, prompt, extra_data, outputs, state, created) "
            "VALUES (?, ?, ?, ?, '[\"9\"]', 'pending', 0)",
            (job_id, number, text, extra),
        )
    db.commit()
    db.close()
    with running_server(data) as server:
        wait_until(lambda: "fine" in history(server))
        listings_are_strict(server)
        assert set(history(server)) == {"fine"}
        assert "quarantined" in server.log.read_text()
    quarantined = {row["id"] for row in JobStore(data / "queue.sqlite3").quarantined()}
    assert quarantined == {"inf", "nan-extra", "deep"}


def test_a_row_the_worker_cannot_read_is_quarantined_not_crash_looped_on(tmp_path: Path) -> None:
    with running_server(tmp_path / "data") as server:
        db = sqlite3.connect(tmp_path / "data" / "queue.sqlite3")
        db.execute(
            "INSERT INTO jobs (id, number, prompt, extra_data, outputs, state, created) "
            "VALUES ('broken', -5, '{not json', '{}', '[]', 'pending', 0)"
        )
        db.commit()
        db.close()
        after = submit(server, small_job("after"))
        wait_until(lambda: after in history(server))
        listings_are_strict(server)
        assert len(worker_processes(server.process.pid)) == 1
        log = server.log.read_text()
        assert "broken" in log and "quarantined" in log and "starting it again" not in log


def test_a_job_that_kills_the_worker_twice_is_failed_with_the_reason(tmp_path: Path) -> None:
    with running_server(tmp_path / "data") as server:
        victim = submit(server, small_job("victim", size=512, steps=200))
        for _ in range(2):
            wait_until(lambda: running_ids(server) == [victim])
            workers = worker_processes(server.process.pid)
            assert len(workers) == 1
            os.kill(workers[0], signal.SIGKILL)
            wait_until(lambda w=workers[0]: worker_processes(server.process.pid) not in ([], [w]))
        wait_until(lambda: victim in history(server))
        error = history(server)[victim]["status"]["messages"][-1][1]
        assert "worker process died" in error["exception_message"] and "2 times" in error["exception_message"]
        after = submit(server, small_job("after"))
        wait_until(lambda: after in history(server))
        assert history(server)[after]["status"]["completed"]


def test_restart_delays_are_short_and_capped() -> None:
    from zimage_serve.queue.worker_process import MAX_RESTART_DELAY_S, restart_delay

    delays = [restart_delay(n) for n in range(1, 10)]
    assert delays[0] == 0.0 and delays == sorted(delays) and max(delays) == MAX_RESTART_DELAY_S <= 5.0


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/history?offset=100000000000000000000", 400),
        ("/history?max_items=99999999999999999999999", 400),
        ("/queue?limit=-1", 400),
        ("/view?filename=a.png&subfolder=x%00y", 400),
        ("/view?filename=" + "a" * 300 + ".png", 400),
        ("/view?filename=a%0d%0aSet-Cookie:x.png", 400),
    ],
    ids=[
        "history offset 10^20",
        "history max_items huge",
        "queue limit negative",
        "view NUL in subfolder",
        "view 300-byte filename",
        "view CR/LF in filename",
    ],
)
def test_hostile_queries_get_a_4xx(server: Server, path: str, status: int) -> None:
    code, _, content = server.request("GET", path)
    assert code == status, content[:300]


def gif_bomb(frames: int = 40, side: int = 2048) -> bytes:
    images = [Image.new("P", (side, side), i % 2) for i in range(frames)]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:])
    return buffer.getvalue()


def test_an_upload_is_counted_over_every_frame(server: Server) -> None:
    status, answer = upload(server, gif_bomb(), "frames.gif")
    assert status == 413 and "40 frames" in answer["error"] and "--max-upload-pixels" in answer["error"]
    assert upload(server, gif_bomb(frames=2, side=64), "two.gif")[0] == 200


def test_load_image_refuses_a_file_of_too_many_pixels_before_queueing(server: Server) -> None:
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "frames.gif"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "gif"}},
    }
    status, answer = server.json("POST", "/prompt", {"prompt": graph})
    assert status == 400 and "--max-upload-pixels" in text_of(answer), answer


LIMIT_CASES = [
    ("batch_size 4096", {"13__batch_size": 4096}, "--max-batch"),
    ("16384 squared", {"13__width": 16384, "13__height": 16384}, "--max-pixels"),
    ("steps 10000", {"3__steps": 10000}, "--max-steps"),
    ("a 1 MB prompt", {"6__text": "猫" * 350_000}, "--max-prompt-bytes"),
    ("a prompt of too many tokens", {"6__text": "red circle " * 1400}, "--max-prompt-tokens"),
]


@pytest.mark.parametrize(("changes", "flag"), [c[1:] for c in LIMIT_CASES], ids=[c[0] for c in LIMIT_CASES])
def test_limits_are_checked_before_queueing_and_named(server: Server, changes: dict[str, Any], flag: str) -> None:
    status, answer = server.json("POST", "/prompt", {"prompt": with_inputs(**changes)})
    assert status == 400 and answer["error"]["type"] == "prompt_outputs_failed_validation", answer
    assert flag in text_of(answer), answer
    [entry] = answer["node_errors"].values()
    assert entry["errors"][0]["extra_info"]["limit"] in flag.replace("-", "_")


def test_a_graph_of_too_many_nodes_is_refused(server: Server) -> None:
    graph = {str(i): {"class_type": "EmptySD3LatentImage", "inputs": {}} for i in range(501)}
    status, answer = server.json("POST", "/prompt", {"prompt": graph})
    assert status == 400 and "--max-nodes" in text_of(answer)


def test_the_openai_route_bounds_n_times_size(server: Server) -> None:
    status, _, content = server.request(
        "POST", "/v1/images/generations", {"prompt": "a red circle", "size": "2048x2048", "n": 10}
    )
    assert status == 400 and b"--max-request-pixels" in content


def test_shift_zero_and_bad_prefixes_are_refused_before_running(server: Server) -> None:
    for changes in ({"11__shift": 0}, {"9__filename_prefix": "a\r\nb"}, {"9__filename_prefix": "x\x00y"}):
        status, answer = server.json("POST", "/prompt", {"prompt": with_inputs(**changes)})
        assert status == 400 and answer["node_errors"], (changes, answer)


def test_symlinks_planted_in_input_are_not_followed(server: Server) -> None:
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "planted.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "planted"}},
    }
    status, answer = server.json("POST", "/prompt", {"prompt": graph})
    assert status == 400 and "symbolic link" in text_of(answer), answer
    mask = png((8, 8))
    reference = json.dumps({"filename": "planted.png", "type": "input"})
    status, answer = upload(server, mask, "mask.png", original_ref=reference, path="/upload/mask")
    assert status == 403, answer
    assert server.request("GET", "/view?filename=planted.png&type=input")[0] == 403


def test_view_serves_only_raster_images_inline(server: Server) -> None:
    for name in ("drawing.svg", "paper.pdf"):
        status, headers, _ = server.request("GET", f"/view?filename={name}")
        assert status == 200 and headers["content-disposition"].startswith("attachment")
        assert headers["content-type"] == "application/octet-stream"
    status, headers, _ = server.request("GET", "/view?filename=red.png&type=input")
    assert status == 200 and headers["content-disposition"].startswith("inline")
    assert headers["content-type"] == "image/png"


def test_four_large_graphs_do_not_stall_the_event_loop(server: Server) -> None:
    graph = small_job("large")
    padding = [{"id": i, "widgets_values": ["x" * 40, i, 1.5]} for i in range(60_000)]
    body = json.dumps({"prompt": graph, "extra_data": {"extra_pnginfo": {"workflow": {"nodes": padding}}}}).encode()
    assert len(body) > 4_000_000
    answers: list[int] = []

    def send() -> None:
        answers.append(server.request("POST", "/prompt", raw=body)[0])

    started = time.monotonic()
    send()
    alone = time.monotonic() - started  # what one of them takes: as long as a stalled loop would stall
    senders = [threading.Thread(target=send) for _ in range(4)]
    slowest, answered = 0.0, 0
    for sender in senders:
        sender.start()
    while any(s.is_alive() for s in senders):
        started = time.monotonic()
        assert server.request("GET", "/system_stats")[0] == 200
        slowest, answered = max(slowest, time.monotonic() - started), answered + 1
        time.sleep(0.02)
    assert answers == [200] * 5
    print(f"slowest /system_stats while four large graphs were validated: {slowest:.3f} s; one alone: {alone:.3f} s")
    # Relative, not absolute: on a loaded machine both grow together. A loop blocked by a parse keeps
    # /system_stats waiting for about as long as one large request takes, and answers it only between
    # the four (3 times longer measured so; here 0.06–0.34 s against 0.38–0.48 s alone).
    assert slowest < alone, f"/system_stats took {slowest:.2f} s while large graphs were validated"
    assert answered >= 8, f"/system_stats was answered only {answered} times while four large graphs were validated"


def test_the_server_still_serves_a_normal_job_at_the_end(server: Server) -> None:
    listings_are_strict(server)
    job = submit(server, small_job("normal"))
    wait_until(lambda: job in history(server))
    assert history(server)[job]["status"]["completed"]


def pngs(folder: Path, prefix: str) -> list[str]:
    return sorted(p.name for p in folder.glob(f"{prefix}_*.png"))


def two_outputs() -> dict[str, Any]:
    """A quick first output, then a slow second one: a kill lands after the first PNG, before the end."""
    graph = small_job("first")
    slow = small_job("second", size=512, steps=200)
    shared = ("28", "30", "29", "11")
    for node_id, node in slow.items():
        if node_id in shared:
            continue
        inputs = {
            name: [value[0] if value[0] in shared else f"s{value[0]}", value[1]] if isinstance(value, list) else value
            for name, value in node["inputs"].items()
        }
        graph[f"s{node_id}"] = {**node, "inputs": inputs}
    return graph


def test_a_job_rerun_after_a_crash_writes_each_file_once(tmp_path: Path) -> None:
    """The worker is killed right after the first SaveImage's PNG appears: the re-run removes what the
    first run wrote and writes it again, so each output has one file (twice, on the same data dir)."""
    data = tmp_path / "data"
    output = data / "output"
    for attempt in (1, 2):
        with running_server(data) as server:
            job = submit(server, two_outputs())
            wait_until(lambda n=attempt: len(pngs(output, "first")) == n, timeout=60)
            [worker] = worker_processes(server.process.pid)
            os.kill(worker, signal.SIGKILL)
            wait_until(lambda j=job: j in history(server), timeout=300)
            entry = history(server)[job]
            assert entry["status"]["completed"], entry
            saved = sorted(i["filename"] for ui in entry["outputs"].values() for i in ui["images"])
            assert len(pngs(output, "first")) == attempt and len(pngs(output, "second")) == attempt
            assert saved == [pngs(output, "first")[-1], pngs(output, "second")[-1]]
            assert not list(output.glob(".*.part")) and not list((data / "runs").glob("*"))


def test_sigterm_queues_a_job_cut_off_by_the_grace_again(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with running_server(data, "--shutdown-grace", "1") as server:
        long_job = submit(server, small_job("long", size=512, steps=200))
        wait_until(lambda: running_ids(server) == [long_job])
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(90)
    log = server.log.read_text()
    assert f"prompt {long_job} did not finish within the 1.0 s grace" in log, log[-2000:]
    assert f"prompt {long_job} was stopped by the shutdown and is queued again" in log
    [job] = JobStore(data / "queue.sqlite3").pending()
    assert job.id == long_job and job.attempts == 0
    with running_server(data) as again:
        wait_until(lambda: long_job in history(again), timeout=300)
        assert history(again)[long_job]["status"]["completed"]
        assert len(pngs(data / "output", "long")) == 1


def test_queue_pages_stay_fast_with_10000_waiting(tmp_path: Path) -> None:
    data = tmp_path / "data"
    store = JobStore(data / "queue.sqlite3")
    blocker = small_job("blocker", size=512, steps=200)
    waiting = nano_prompt()
    store.enqueue("blocker", -1.0, blocker, {}, ["9"])
    for start in range(0, 10_000, 1000):
        store.enqueue_many(
            [Job(f"w{i}", float(i), waiting, {"client_id": "c"}, ["9"]) for i in range(start, start + 1000)]
        )
    store.close()
    with running_server(data) as server:
        wait_until(lambda: running_ids(server) == ["blocker"])
        started = time.monotonic()
        status, page = server.json("GET", "/queue?limit=100&offset=200")
        paged = time.monotonic() - started
        assert status == 200 and len(page["queue_pending"]) == 100 and page["pagination"]["total"] >= 9_000
        assert page["queue_pending"][0][1] == "w200" and paged < 0.5, paged
        status, _, content = server.request("GET", "/queue")
        assert status == 200 and len(strict_json.loads(content)["queue_pending"]) >= 9_000


def test_a_client_that_leaves_the_openai_route_cancels_its_prompt(tmp_path: Path) -> None:
    with running_server(tmp_path / "data") as server:
        body = json.dumps({"prompt": "a red circle", "size": "1024x1024", "n": 4}).encode()
        head = "POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        client = socket.create_connection(("127.0.0.1", server.port))
        client.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        wait_until(lambda: len(running_ids(server)) == 1)
        [job] = running_ids(server)
        client.close()
        wait_until(lambda: job in history(server), timeout=60)
        messages = [event for event, _ in history(server)[job]["status"]["messages"]]
        assert "execution_interrupted" in messages
        after = submit(server, small_job("after"))
        wait_until(lambda: after in history(server))
