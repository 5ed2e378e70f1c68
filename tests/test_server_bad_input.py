"""Bad input of every kind gets a clear 4xx: never a 5xx, never a traceback.

One table, one server in this process: malformed and hostile JSON, unknown nodes, wrong types,
out-of-range values, broken links, traversal attempts, bad uploads, bad queries, unknown routes. Each row
names the status it must get; `/prompt` answers must also have ComfyUI's error shape. Oversized bodies,
refused before they are read, are sent over a real socket to a real server.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.app import AppServer, serving
from tests.support.jobs import done, listings_are_strict, small_job
from tests.support.threaded import threaded_server
from tests.support.watch import no_server_errors
from tests.workflows import nano_prompt

COMFY_ERROR_KEYS = {"type", "message", "details", "extra_info"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppServer]:
    """One server for the table: each row is a request that must change nothing. At the end (whatever
    the order the rows ran in): no 5xx, no traceback logged, strict listings, and a valid prompt still runs."""
    data = tmp_path_factory.mktemp("bad") / "data"
    outside = data.parent / "secret.txt"
    outside.write_text("not for clients")
    (data / "output").mkdir(parents=True)
    (data / "output" / "link.png").symlink_to(outside)
    with serving(data, preload=False) as running, no_server_errors(running):  # the model loads for that prompt
        yield running
        listings_are_strict(running)
        status, answer = running.json("POST", "/prompt", {"prompt": small_job("still-works")})
        assert status == 200 and answer["node_errors"] == {}, answer
        assert done(running, answer["prompt_id"])["status"]["status_str"] == "success"


def prompt_body(**changes: Any) -> bytes:
    """The nano workflow with `node.input=value` changes (tiny, so a valid one would run quickly)."""
    prompt = nano_prompt()
    prompt["13"]["inputs"].update(width=64, height=64)
    for key, value in changes.items():
        node, name = key.split("__")
        prompt[node]["inputs"][name] = value
    return json.dumps({"prompt": prompt}).encode()


def nodes(graph: Any) -> bytes:
    return json.dumps({"prompt": graph}).encode()


NESTED = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"

PROMPT_CASES: list[tuple[str, bytes, str]] = [
    ("truncated JSON", b'{"prompt": {"1": ', "invalid_prompt"),
    ("not UTF-8", b'{"prompt": "\xff\xfe"}', "invalid_prompt"),
    ("deeply nested", NESTED, "invalid_prompt"),
    ("a list body", b"[1, 2]", "invalid_prompt"),
    ("a string body", b'"prompt"', "invalid_prompt"),
    ("empty body", b"", "invalid_prompt"),
    ("no prompt", b'{"client_id": "x"}', "no_prompt"),
    ("an empty object", b"{}", "no_prompt"),
    ("prompt is a list", b'{"prompt": []}', "invalid_prompt"),
    ("prompt is empty", b'{"prompt": {}}', "invalid_prompt"),
    ("node is a string", nodes({"1": "SaveImage"}), "invalid_prompt"),
    ("node without class_type", nodes({"1": {"inputs": {}}}), "invalid_prompt"),
    ("class_type not a string", nodes({"1": {"class_type": 7, "inputs": {}}}), "missing_node_type"),
    ("unknown node type", nodes({"1": {"class_type": "NoSuchNode", "inputs": {}}}), "missing_node_type"),
    ("inputs not an object", nodes({"1": {"class_type": "SaveImage", "inputs": [1]}}), "invalid_prompt"),
    ("no output node", nodes({"1": {"class_type": "EmptySD3LatentImage", "inputs": {}}}), "prompt_no_outputs"),
    ("no output node but a decoder", nodes({"1": {"class_type": "VAEDecode", "inputs": {}}}), "prompt_no_outputs"),
    ("link to a missing node", prompt_body(**{"9__images": ["99", 0]}), "prompt_outputs_failed_validation"),
    ("link to a missing output", prompt_body(**{"9__images": ["8", 5]}), "prompt_outputs_failed_validation"),
    ("malformed link", prompt_body(**{"9__images": ["8"]}), "prompt_outputs_failed_validation"),
    ("link of the wrong type", prompt_body(**{"9__images": ["13", 0]}), "prompt_outputs_failed_validation"),
    ("steps not a number", prompt_body(**{"3__steps": "many"}), "prompt_outputs_failed_validation"),
    ("steps huge", prompt_body(**{"3__steps": 10**12}), "prompt_outputs_failed_validation"),
    ("steps beyond 64 bits", prompt_body(**{"3__steps": 10**30}), "invalid_prompt"),
    ("steps zero", prompt_body(**{"3__steps": 0}), "prompt_outputs_failed_validation"),
    ("negative seed", prompt_body(**{"3__seed": -1}), "prompt_outputs_failed_validation"),
    ("width beyond the maximum", prompt_body(**{"13__width": 10**6}), "prompt_outputs_failed_validation"),
    ("cfg as a list", prompt_body(**{"3__cfg": [1]}), "prompt_outputs_failed_validation"),
    ("unknown sampler", prompt_body(**{"3__sampler_name": "magic"}), "prompt_outputs_failed_validation"),
    ("unknown model file", prompt_body(**{"28__unet_name": "nope.safetensors"}), "prompt_outputs_failed_validation"),
    (
        "traversal in a model name",
        prompt_body(**{"28__unet_name": "../../etc/passwd"}),
        "prompt_outputs_failed_validation",
    ),
    ("text not a string", prompt_body(**{"6__text": {"a": 1}}), "prompt_outputs_failed_validation"),
    (
        "missing required input",
        nodes({"1": {"class_type": "SaveImage", "inputs": {}}}),
        "prompt_outputs_failed_validation",
    ),
    ("number not a number", b'{"prompt": {"1": {}}, "number": "first"}', "invalid_prompt"),
    ("extra_data a list", b'{"prompt": {"1": {}}, "extra_data": []}', "invalid_prompt"),
    ("targets not a list", b'{"prompt": {"1": {}}, "partial_execution_targets": "9"}', "invalid_prompt"),
    ("prompt_id not a uuid", b'{"prompt": {"1": {}}, "prompt_id": "../x"}', "invalid_prompt_id"),
]


@pytest.mark.parametrize(("body", "kind"), [c[1:] for c in PROMPT_CASES], ids=[c[0] for c in PROMPT_CASES])
def test_bad_prompts_get_a_comfyui_shaped_400(server: AppServer, body: bytes, kind: str) -> None:
    for path in ("/prompt", "/api/prompt"):
        status, _, content = server.request("POST", path, raw=body)
        assert status == 400, content[:300]
        answer = json.loads(content)
        assert set(answer["error"]) == COMFY_ERROR_KEYS and answer["error"]["type"] == kind, answer
        assert isinstance(answer["node_errors"], dict)
        if kind != "prompt_outputs_failed_validation":
            assert answer["node_errors"] == {}, answer
        else:
            assert answer["node_errors"], "the failing node is named"
            for entry in answer["node_errors"].values():
                assert entry["class_type"] and all(set(e) >= {"type", "message", "details"} for e in entry["errors"])


def test_an_out_of_range_value_names_the_node_and_the_input(server: AppServer) -> None:
    status, _, content = server.request("POST", "/prompt", raw=prompt_body(**{"3__steps": 0}))
    answer = json.loads(content)
    assert status == 400 and answer["error"]["type"] == "prompt_outputs_failed_validation"
    assert answer["node_errors"]["3"]["class_type"] == "KSampler"
    [error] = answer["node_errors"]["3"]["errors"]
    assert error["type"] == "value_smaller_than_min" and error["extra_info"]["input_name"] == "steps"


def test_a_reused_prompt_id_is_refused_and_a_null_one_is_chosen_by_the_server(server: AppServer) -> None:
    prompt_id = str(uuid.uuid4())
    body = json.loads(prompt_body())
    assert server.json("POST", "/prompt", {**body, "prompt_id": prompt_id})[0] == 200
    assert server.json("POST", "/prompt", {**body, "prompt_id": prompt_id}) == (
        409,
        {"error": "prompt_id already exists"},
    )
    status, answer = server.json("POST", "/prompt", {**body, "prompt_id": None})  # as newer ComfyUI accepts
    assert status == 200 and str(uuid.UUID(answer["prompt_id"])) == answer["prompt_id"] != prompt_id


REQUEST_CASES: list[tuple[str, str, str, bytes | None, dict[str, str], int]] = [
    # (name, method, path, body, headers, status)
    ("queue: not JSON", "POST", "/queue", b"{nope", {}, 400),
    ("queue: a list", "POST", "/queue", b"[]", {}, 400),
    ("history: not JSON", "POST", "/history", b"\xff", {}, 400),
    ("history: max_items not a number", "GET", "/history?max_items=ten", None, {}, 400),
    ("history: negative offset", "GET", "/history?offset=-5", None, {}, 400),
    ("free: a string", "POST", "/free", b'"all"', {}, 400),
    ("view: no filename", "GET", "/view", None, {}, 404),
    ("view: a missing file", "GET", "/view?filename=missing.png", None, {}, 404),
    ("view: parent directory", "GET", "/view?filename=../queue.sqlite3", None, {}, 400),
    ("view: encoded parent", "GET", "/view?filename=%2e%2e%2fqueue.sqlite3", None, {}, 400),
    ("view: absolute path", "GET", "/view?filename=/etc/passwd", None, {}, 400),
    ("view: backslashes", "GET", "/view?filename=..%5c..%5cqueue.sqlite3", None, {}, 400),
    ("view: null byte", "GET", "/view?filename=a.png%00.txt", None, {}, 400),
    ("view: subfolder escape", "GET", "/view?filename=passwd&subfolder=../../../../etc", None, {}, 403),
    ("view: absolute subfolder", "GET", "/view?filename=passwd&subfolder=/etc", None, {}, 403),
    ("view: symlink out of the folder", "GET", "/view?filename=link.png", None, {}, 403),
    ("view: unknown type", "GET", "/view?filename=x.png&type=models", None, {}, 400),
    ("view: annotated unknown type", "GET", "/view?filename=x.png%20%5Bsecret%5D", None, {}, 404),
    ("upload: not multipart", "POST", "/upload/image", b"{}", {}, 400),
    (
        "upload: no image field",
        "POST",
        "/upload/image",
        b'--b\r\nContent-Disposition: form-data; name="x"\r\n\r\n1\r\n--b--\r\n',
        {"Content-Type": "multipart/form-data; boundary=b"},
        400,
    ),
    (
        "upload: broken multipart",
        "POST",
        "/upload/image",
        b"--b\r\ngarbage",
        {"Content-Type": "multipart/form-data; boundary=b"},
        400,
    ),
    ("upload mask: not multipart", "POST", "/upload/mask", b"x", {}, 400),
    ("unknown route", "GET", "/no/such/route", None, {}, 404),
    ("wrong method", "DELETE", "/prompt", None, {}, 405),
    ("openai: not JSON", "POST", "/v1/images/generations", b"{", {}, 400),
    ("openai: no prompt", "POST", "/v1/images/generations", b"{}", {}, 400),
    ("openai: bad size", "POST", "/v1/images/generations", b'{"prompt": "a", "size": "big"}', {}, 400),
    ("openai: unknown model", "POST", "/v1/images/generations", b'{"prompt": "a", "model": "dall-e-9"}', {}, 404),
    ("openai: n zero", "POST", "/v1/images/generations", b'{"prompt": "a", "n": 0}', {}, 400),
    ("openai: model an object", "POST", "/v1/images/generations", b'{"prompt": "a", "model": {"x": 1}}', {}, 400),
    ("openai: model a list", "POST", "/v1/images/generations", b'{"prompt": "a", "model": ["m"]}', {}, 400),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status"), [c[1:] for c in REQUEST_CASES], ids=[c[0] for c in REQUEST_CASES]
)
def test_bad_requests_get_a_clear_4xx(
    server: AppServer, method: str, path: str, body: bytes | None, headers: dict[str, str], status: int
) -> None:
    code, answer_headers, content = server.request(method, path, raw=body, headers=headers or None)
    assert code == status, content[:300]
    if content:
        assert answer_headers["content-type"].startswith("application/json")
        answer = json.loads(content)
        assert "error" in answer or "detail" in answer, answer


def test_oversized_bodies_are_refused_before_they_are_read(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Over a real socket, as uvicorn reads it: the answer comes while the body is still being sent, for a
    declared length and for a chunked body alike."""
    with threaded_server(tmp_path / "data", preload=False) as real:
        for path in ("/prompt", "/queue", "/v1/images/generations"):
            for chunked in (False, True):
                code, content = real.oversized(path, 20 * 1024 * 1024, chunked=chunked)
                assert code == 413 and json.loads(content)["error"]["type"] == "request_too_large"
        assert real.request("GET", "/queue")[0] == 200
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
