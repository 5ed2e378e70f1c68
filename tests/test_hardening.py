"""Hostile requests, one named regression test each: a clear 4xx that names the field or the limit, strict
JSON listings after it, no other user's job harmed, and a normal job still running afterwards.

The routes are called in this process (one server for the table, checked at its end whatever order the
tests ran in); real processes stay for what only they show: a killed or crash-looping worker process, a
SIGTERM's grace, a client that drops its socket.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import signal
import socket
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.server import running_server, worker_processes
from tests.support.app import AppServer, serving
from tests.support.jobs import (
    Caller,
    done,
    history,
    listings_are_strict,
    png,
    ready,
    running_ids,
    small_job,
    submit,
    upload,
    wait_until,
)
from tests.support.queues import enqueue
from tests.support.threaded import threaded_server
from tests.support.watch import no_server_errors
from tests.workflows import nano_prompt
from zimage_serve import strict_json
from zimage_serve.queue.jobs import Job, NewJob
from zimage_serve.queue.sqlite_queue import SQLiteQueue
from zimage_serve.server import routes_queue


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppServer]:
    """The server every hostile request below is sent to. Each test's request must leave it as it was, so
    its end is checked once all of them have run, in whatever order: no 5xx and no traceback logged
    meanwhile, strict listings, and a normal job that runs."""
    data = tmp_path_factory.mktemp("hardening") / "data"
    outside = data.parent / "outside.png"
    Image.new("RGB", (8, 8), "blue").save(outside)
    (data / "input").mkdir(parents=True)
    (data / "input" / "planted.png").symlink_to(outside)
    Image.new("RGB", (8, 8), "red").save(data / "input" / "red.png")
    (data / "input" / "frames.gif").write_bytes(gif_bomb())
    (data / "output").mkdir()
    (data / "output" / "drawing.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"><script>1</script></svg>')
    (data / "output" / "paper.pdf").write_bytes(b"%PDF-1.4\n")
    with serving(data) as running:
        ready(running)  # its model loaded now, not while another test's server loads one (tests/support/jobs.py)
        with no_server_errors(running):
            yield running
            listings_are_strict(running)
            assert done(running, submit(running, small_job("normal")))["status"]["completed"]


def post_prompt(server: Caller, body: bytes) -> tuple[int, dict[str, Any]]:
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
    server: AppServer, template: str | None, named: str, request: pytest.FixtureRequest
) -> None:
    name = request.node.callspec.id
    status, answer = post_prompt(server, non_finite_body(name, template))
    assert status == 400, answer
    assert answer["error"]["type"] == "invalid_prompt" and named in text_of(answer), answer
    listings_are_strict(server)


def test_number_nan_is_a_400_not_a_409_and_nothing_disappears(server: AppServer) -> None:
    prompt_id = str(uuid.uuid4())
    body = json.dumps({"prompt": small_job("nan"), "prompt_id": prompt_id})[:-1] + ', "number": NaN}'
    status, answer = post_prompt(server, body.encode())
    assert status == 400 and "number" in text_of(answer)
    assert submit(server, small_job("nan"), prompt_id=prompt_id) == prompt_id
    assert done(server, prompt_id)["status"]["completed"]  # (and no job of this server runs past the test)


def test_an_infinite_number_stored_by_an_older_version_cannot_stop_the_server(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Rows the old code let in (a number of Infinity, NaN in extra_data, JSON nested 950 deep) are
    quarantined when the file is first opened; the server starts, lists strict JSON and runs jobs."""
    data = tmp_path / "data"
    store = SQLiteQueue(data / "queue.sqlite3")
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
    with caplog.at_level(logging.ERROR), serving(data) as server:
        wait_until(lambda: "fine" in history(server))
        listings_are_strict(server)
        assert set(history(server)) == {"fine"}
        assert "quarantined" in caplog.text
    quarantined = {row["id"] for row in SQLiteQueue(data / "queue.sqlite3").quarantined()}
    assert quarantined == {"inf", "nan-extra", "deep"}


def test_a_row_the_worker_cannot_read_is_quarantined_not_crash_looped_on(tmp_path: Path) -> None:
    """The worker process reads the row: it must not die of it and be started again, over and over."""
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
    from zimage_serve.worker.process import MAX_RESTART_DELAY_S, restart_delay

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
def test_hostile_queries_get_a_4xx(server: AppServer, path: str, status: int) -> None:
    code, _, content = server.request("GET", path)
    assert code == status, content[:300]


@functools.cache
def gif_bomb(frames: int = 40, side: int = 1024) -> bytes:
    """An animated GIF whose frames are each well within --max-upload-pixels, and far beyond it together."""
    images = [Image.new("P", (side, side), i % 2) for i in range(frames)]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:])
    return buffer.getvalue()


def test_an_upload_is_counted_over_every_frame(server: AppServer) -> None:
    status, answer = upload(server, gif_bomb(), "frames.gif")
    assert status == 413 and "40 frames" in answer["error"] and "--max-upload-pixels" in answer["error"]
    assert upload(server, gif_bomb(frames=2, side=64), "two.gif")[0] == 200


def test_load_image_refuses_a_file_of_too_many_pixels_before_queueing(server: AppServer) -> None:
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
def test_limits_are_checked_before_queueing_and_named(server: AppServer, changes: dict[str, Any], flag: str) -> None:
    status, answer = server.json("POST", "/prompt", {"prompt": with_inputs(**changes)})
    assert status == 400 and answer["error"]["type"] == "prompt_outputs_failed_validation", answer
    assert flag in text_of(answer), answer
    [entry] = answer["node_errors"].values()
    assert entry["errors"][0]["extra_info"]["limit"] in flag.replace("-", "_")


def test_a_graph_of_too_many_nodes_is_refused(server: AppServer) -> None:
    graph = {str(i): {"class_type": "EmptySD3LatentImage", "inputs": {}} for i in range(501)}
    status, answer = server.json("POST", "/prompt", {"prompt": graph})
    assert status == 400 and "--max-nodes" in text_of(answer)


def test_the_openai_route_bounds_n_times_size(server: AppServer) -> None:
    status, _, content = server.request(
        "POST", "/v1/images/generations", {"prompt": "a red circle", "size": "2048x2048", "n": 10}
    )
    assert status == 400 and b"--max-request-pixels" in content


def test_shift_zero_and_bad_prefixes_are_refused_before_running(server: AppServer) -> None:
    for changes in ({"11__shift": 0}, {"9__filename_prefix": "a\r\nb"}, {"9__filename_prefix": "x\x00y"}):
        status, answer = server.json("POST", "/prompt", {"prompt": with_inputs(**changes)})
        assert status == 400 and answer["node_errors"], (changes, answer)


def test_symlinks_planted_in_input_are_not_followed(server: AppServer) -> None:
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


def test_view_serves_only_raster_images_inline(server: AppServer) -> None:
    for name in ("drawing.svg", "paper.pdf"):
        status, headers, _ = server.request("GET", f"/view?filename={name}")
        assert status == 200 and headers["content-disposition"].startswith("attachment")
        assert headers["content-type"] == "application/octet-stream"
    status, headers, _ = server.request("GET", "/view?filename=red.png&type=input")
    assert status == 200 and headers["content-disposition"].startswith("inline")
    assert headers["content-type"] == "image/png"


def large_body() -> bytes:
    """A normal job carrying a 4 MB workflow in extra_pnginfo, as a big frontend graph does."""
    graph = small_job("large")
    padding = [{"id": i, "widgets_values": ["x" * 40, i, 1.5]} for i in range(60_000)]
    body = json.dumps({"prompt": graph, "extra_data": {"extra_pnginfo": {"workflow": {"nodes": padding}}}}).encode()
    assert len(body) > 4_000_000
    return body


def test_four_large_graphs_are_parsed_off_the_event_loop_one_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a large body is being parsed, /system_stats is answered: the parse is held until it is,
    which a parse on the event loop would never see (it would wait out its 60 s). Four at once are parsed
    one at a time, and all are queued. How long the loop stalls, in seconds: benchmarks/event_loop_stall.py."""
    body = large_body()
    parse = routes_queue._parse_large
    release = threading.Event()
    lock = threading.Lock()
    parsing, most, waited_out = 0, 0, []

    def held_parse(raw: bytes) -> Any:
        nonlocal parsing, most
        with lock:
            parsing += 1
            most = max(most, parsing)
        try:
            waited_out.append(not release.wait(60))
            return parse(raw)
        finally:
            with lock:
                parsing -= 1

    monkeypatch.setattr(routes_queue, "_parse_large", held_parse)
    answers: list[tuple[int, Any]] = []
    # Its own server: the 16 MB of workflows it queues and runs go with it.
    with serving(tmp_path / "data", preload=False) as server, no_server_errors(server):

        def send() -> None:
            status, _, content = server.request("POST", "/prompt", raw=body)
            answers.append((status, json.loads(content)))

        senders = [threading.Thread(target=send) for _ in range(4)]
        for sender in senders:
            sender.start()
        wait_until(lambda: parsing == 1)
        assert server.request("GET", "/system_stats")[0] == 200  # while the parse waits for this very answer
        release.set()
        for sender in senders:
            sender.join(120)
        assert [status for status, _ in answers] == [200] * 4 and waited_out == [False] * 4, answers
        assert most == 1, f"{most} large bodies were parsed at once"
        # Asked cheaply: each history entry now carries its 4 MB workflow.
        wait_until(lambda: server.json("GET", "/prompt")[1]["exec_info"]["queue_remaining"] == 0)
        for _, answer in answers:
            entry = server.json("GET", f"/history/{answer['prompt_id']}")[1][answer["prompt_id"]]
            assert entry["status"]["completed"], entry["status"]


def pngs(folder: Path, prefix: str) -> list[str]:
    return sorted(p.name for p in folder.glob(f"{prefix}_*.png"))


def two_outputs(seed: int = 0) -> dict[str, Any]:
    """A quick first output, then a slower second one: a kill lands after the first PNG, before the end.
    (Seconds of sampling at 512² leave the kill room enough; the re-run pays for all of them again.)"""
    graph = small_job("first", seed=seed)
    slow = small_job("second", size=512, steps=12, seed=seed)
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
    first run wrote and writes it again, so each output has one file (twice: the second job's files are
    numbered after the first's)."""
    data = tmp_path / "data"
    output = data / "output"
    with running_server(data) as server:
        for attempt in (1, 2):
            job = submit(server, two_outputs(seed=attempt))  # another seed: nothing cached from the first
            wait_until(lambda n=attempt: len(pngs(output, "first")) == n)
            [worker] = worker_processes(server.process.pid)
            os.kill(worker, signal.SIGKILL)
            wait_until(lambda j=job: j in history(server), timeout=300)
            entry = history(server)[job]
            assert entry["status"]["completed"], entry
            saved = sorted(i["filename"] for ui in entry["outputs"].values() for i in ui["images"])
            assert len(pngs(output, "first")) == attempt and len(pngs(output, "second")) == attempt
            assert saved == [pngs(output, "first")[-1], pngs(output, "second")[-1]]
            assert not list(output.glob(".*.part")) and not list((data / "runs").glob("*.outputs"))


def test_sigterm_queues_a_job_cut_off_by_the_grace_again(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with running_server(data, "--shutdown-grace", "1") as server:
        long_job = submit(server, small_job("long", size=512, steps=12))  # seconds: longer than the 1 s grace
        wait_until(lambda: running_ids(server) == [long_job])
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(90)
    log = server.log.read_text()
    assert f"prompt {long_job} did not finish within the 1.0 s grace" in log, log[-2000:]
    assert f"prompt {long_job} was stopped by the shutdown and is queued again" in log
    [job] = SQLiteQueue(data / "queue.sqlite3").pending()
    assert job.id == long_job and job.attempts == 0
    with serving(data) as again:  # the next start, in this process: it runs the job queued again
        assert done(again, long_job, timeout=300)["status"]["completed"]
        assert len(pngs(data / "output", "long")) == 1


def test_queue_pages_are_read_from_the_store_a_page_at_a_time_with_10000_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page of the queue costs its own rows, not the whole queue's: the store is asked for 100 rows (one
    SQL page), not for 10,000 to be cut down. The whole queue still lists as strict JSON."""
    data = tmp_path / "data"
    store = SQLiteQueue(data / "queue.sqlite3")
    blocker = small_job("blocker", size=512, steps=200)
    waiting = nano_prompt()
    enqueue(store, "blocker", -1.0, blocker, {}, ["9"])
    for start in range(0, 10_000, 1000):
        store.enqueue_many(
            [NewJob.of(Job(f"w{i}", float(i), waiting, {"client_id": "c"}, ["9"])) for i in range(start, start + 1000)]
        )
    store.close()
    with serving(data, preload=False, shutdown_grace_s=0) as server:
        wait_until(lambda: running_ids(server) == ["blocker"])
        # Sampling, which the stop at the end interrupts at once (a model load it would wait for).
        wait_until(lambda: [e.node for e in server.runtime.service.executing()] == ["3"])
        queue = server.runtime.store
        read = queue.queue_items_json
        rows: list[tuple[str, int]] = []

        def counted(state: str, *args: Any, **kwargs: Any) -> list[str]:
            items = read(state, *args, **kwargs)
            rows.append((state, len(items)))
            return items

        monkeypatch.setattr(queue, "queue_items_json", counted)
        status, page = server.json("GET", "/queue?limit=100&offset=200")
        assert status == 200 and len(page["queue_pending"]) == 100 and page["pagination"]["total"] >= 9_000
        assert page["queue_pending"][0][1] == "w200"
        assert rows == [("running", 1), ("pending", 100)]
        status, _, content = server.request("GET", "/queue")
        assert status == 200 and len(strict_json.loads(content)["queue_pending"]) >= 9_000


def test_a_client_that_leaves_the_openai_route_cancels_its_prompt(tmp_path: Path) -> None:
    """A real socket closed by the client while its images are drawn (uvicorn tells the route)."""
    with threaded_server(tmp_path / "data") as server:
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
