"""The audit log: complete (every image traces to a user), hash-chained (each kind of tampering found),
verified and exported by the CLI, rotated by size, and kept across a SIGKILL."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.server import running_server
from tests.support.app import serving
from tests.support.cli import run
from tests.support.jobs import done, png, small_job, submit, upload, view_query, wait_until
from tests.support.tokens import make_tokens
from zimage_serve.security.audit_files import audit_files
from zimage_serve.security.audit_verify import records, verify


def audited_run(data: Path) -> dict[str, Any]:
    """A server with two users who queue, upload, read and delete; what they did, for the checks."""
    tokens = make_tokens(data)
    with serving(data, auth="on") as server:
        alice, bob = server.as_token(tokens["user"]), server.as_token(tokens["other"])
        jobs = {"alice": [], "bob": []}
        for seed in range(2):
            prompt = small_job("audited", seed=seed)
            prompt["6"]["inputs"]["text"] = f"a red circle number {seed}"
            jobs["alice"].append(submit(alice, prompt))
        jobs["bob"].append(submit(bob, small_job("bobs")))
        images = [done(alice, j) for j in jobs["alice"]]
        done(bob, jobs["bob"][0])
        assert upload(alice, png(), "in.png")[0] == 200
        assert alice.request("GET", view_query(images[0]["outputs"]["9"]["images"][0]))[0] == 200
        assert server.request("POST", "/queue", {"clear": True})[0] == 401
        assert alice.request("POST", "/history", {"delete": [jobs["alice"][1]]})[0] == 200
    return {"jobs": jobs}


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    data = tmp_path_factory.mktemp("audited") / "data"
    return data, audited_run(data)


def test_every_request_generation_and_read_is_recorded(audited: tuple[Path, dict[str, Any]]) -> None:
    data, run = audited
    found = list(records(data / "audit"))
    submitted = {r["job_id"]: r for r in found if r.get("route") == "/prompt" and r["outcome"] == "ok"}
    assert set(submitted) == set(run["jobs"]["alice"] + run["jobs"]["bob"])
    first = submitted[run["jobs"]["alice"][0]]
    assert first["user"] == "alice" and first["address"] == "127.0.0.1" and first["status"] == 200
    assert first["prompt"] == "a red circle number 0"
    assert first["parameters"]["3"]["seed"] == 0 and first["parameters"]["3"]["class_type"] == "KSampler"
    assert first["duration_ms"] >= 0 and first["time"].endswith("Z")
    generations = {r["job_id"]: r for r in found if r["kind"] == "generation"}
    assert set(generations) == set(submitted)
    assert all(g["outcome"] == "ok" and g["files"] for g in generations.values())
    assert generations[run["jobs"]["bob"][0]]["user"] == "bob"
    kinds = {(r["method"], r["route"], r["outcome"]) for r in found if r["kind"] == "request"}
    assert ("POST", "/upload/image", "ok") in kinds
    assert ("GET", "/view", "ok") in kinds
    refusals = [r for r in found if r["kind"] == "refusals"]  # no token: counted, not one record each
    assert any(r["status"] == 401 and "POST /queue" in r["routes"] and r["count"] >= 1 for r in refusals)
    assert ("POST", "/history", "ok") in kinds
    assert not any("zis_" in json.dumps(r) for r in found)  # no token ever reaches the log


def test_every_image_traces_to_a_user(audited: tuple[Path, dict[str, Any]]) -> None:
    data, _ = audited
    owners: dict[str, str] = {}
    for record in records(data / "audit"):
        if record["kind"] == "generation":
            for name in record["files"]:
                owners[name] = record["user"]
    images = [p for p in (data / "output").rglob("*.png")]
    assert len(images) == 3
    for image in images:
        relative = image.relative_to(data / "output").as_posix()
        user = relative.split("/")[1]
        assert owners.get("output/" + relative.removeprefix(f"users/{user}/")) == user, relative


def test_verify_passes_on_an_untouched_log(
    audited: tuple[Path, dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    data, _ = audited
    checked, problem = verify(data / "audit", data / "queue.sqlite3")
    assert problem is None and checked >= 10
    code, _, err = run(["audit", "verify", "--data-dir", str(data)], capsys)
    assert code == 0 and f"{checked} records" in err


def _tampered(data: Path, tmp: Path, change: Any, capsys: pytest.CaptureFixture[str]) -> str:
    copy = tmp / "copy"
    shutil.copytree(data, copy)
    [log] = audit_files(copy / "audit")
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(b"".join(change(lines)))
    code, _, err = run(["audit", "verify", "--data-dir", str(copy)], capsys)
    assert code == 1, err
    return err


def _edit(lines: list[bytes]) -> list[bytes]:
    record = json.loads(lines[2])
    record["user"] = "mallory"
    return [*lines[:2], json.dumps(record).encode() + b"\n", *lines[3:]]


def _rehash(lines: list[bytes]) -> list[bytes]:
    """An edit whose own hash is made again: the next record's prev then gives it away."""
    from zimage_serve.security.audit import canonical

    record = json.loads(lines[2])
    record["user"] = "mallory"
    record.pop("hash")
    record["hash"] = hashlib.sha256(canonical(record)).hexdigest()
    return [*lines[:2], json.dumps(record).encode() + b"\n", *lines[3:]]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (_edit, "record 3: its content was changed"),
        (_rehash, "record 4: does not follow the record before it"),
        (lambda lines: lines[:3] + lines[4:], "record 5: expected record 4: records are missing"),
        (lambda lines: [*lines[:3], lines[4], lines[3], *lines[5:]], "record 5: expected record 4"),
        (lambda lines: lines[:-1], "records were cut from the end"),
        (lambda lines: [*lines[:3], b"not json\n", *lines[4:]], "not a record"),
        (lambda lines: lines[1:], "record 2: expected record 1"),
    ],
    ids=["edit", "edit-and-rehash", "deletion", "reordering", "cut-at-the-end", "garbage", "first-removed"],
)
def test_tampering_of_each_kind_is_found(
    audited: tuple[Path, dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str], change: Any, expected: str
) -> None:
    data, _ = audited
    message = _tampered(data, tmp_path, change, capsys)
    assert expected in message and "audit-000001.jsonl:" in message


def test_export_as_jsonl_and_csv_by_user_and_date(
    audited: tuple[Path, dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    data, done_by = audited
    code, out, _ = run(["audit", "export", "--format", "jsonl", "--user", "bob", "--data-dir", str(data)], capsys)
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert rows and all(r["user"] == "bob" for r in rows)
    assert {r.get("job_id") for r in rows} >= set(done_by["jobs"]["bob"])
    code, out, _ = run(["audit", "export", "--format", "csv", "--data-dir", str(data)], capsys)
    table = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and len(table) == len(list(records(data / "audit")))
    assert {"seq", "user", "route", "outcome", "hash"} <= set(table[0])
    assert run(["audit", "export", "--since", "2999-01-01", "--data-dir", str(data)], capsys)[:2] == (0, "")
    assert run(["audit", "export", "--since", "yesterday", "--data-dir", str(data)], capsys)[0] == 2
    assert run(["audit", "export", "--format", "xml", "--data-dir", str(data)], capsys)[0] == 2


def test_hashed_prompts_keep_no_text(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with serving(data, security={"audit_prompts": "hash"}) as server:
        prompt = small_job("hashed")
        prompt["6"]["inputs"]["text"] = "a red circle number 0"
        job = submit(server, prompt)
        done(server, job)
    found = [r for r in records(data / "audit") if r.get("route") == "/prompt" and r["outcome"] == "ok"]
    assert [r["job_id"] for r in found] == [job]
    assert all("prompt" not in r and len(r["prompt_sha256"]) == 64 for r in found)
    assert any(r["kind"] == "generation" and r["job_id"] == job for r in records(data / "audit"))
    assert b"red circle number" not in b"".join(p.read_bytes() for p in audit_files(data / "audit"))


def test_nothing_is_lost_on_sigkill(tmp_path: Path) -> None:
    data = tmp_path / "data"
    tokens = make_tokens(data)
    with running_server(data, "--auth", "on", "--no-worker-process") as server:  # one process to kill
        alice = server.as_token(tokens["user"])
        jobs = [submit(alice, small_job("killed", seed=i)) for i in range(3)]
        wait_until(lambda: all(j in alice.json("GET", "/history")[1] for j in jobs))
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
    with serving(data, auth="on", preload=False):  # started again on the same data dir: the outbox is read
        wait_until(lambda: sum(r["kind"] == "generation" for r in records(data / "audit")) >= len(jobs))
    found = list(records(data / "audit"))
    assert {r["job_id"] for r in found if r["kind"] == "generation"} == set(jobs)
    assert {r.get("job_id") for r in found if r.get("route") == "/prompt"} == set(jobs)
    assert verify(data / "audit", data / "queue.sqlite3")[1] is None


def test_the_log_rotates_by_size_and_the_chain_runs_across_files(tmp_path: Path) -> None:
    import asyncio

    from zimage_serve.queue.sqlite_queue import SQLiteQueue
    from zimage_serve.security.audit import AuditLog, Retention

    queue_file = tmp_path / "queue.sqlite3"
    SQLiteQueue(queue_file).close()  # the store owns the queue file's tables, the audit head among them
    log = AuditLog(tmp_path / "audit", queue_file, Retention(segment_bytes=2000))
    log.start()

    async def write_all() -> None:
        for n in range(60):
            await log.write({"kind": "request", "user": "u", "route": "/prompt", "n": n})

    asyncio.run(write_all())
    log.stop()
    files = audit_files(tmp_path / "audit")
    assert len(files) >= 5 and all(f.stat().st_size < 2000 + 400 for f in files)
    checked, problem = verify(tmp_path / "audit", queue_file)
    assert problem is None and checked == 60
    again = AuditLog(tmp_path / "audit", queue_file, Retention(segment_bytes=2000))  # a restart chains on
    again.start()
    again.add({"kind": "request", "n": 60})
    again.stop()
    assert verify(tmp_path / "audit", queue_file) == (61, None)
    files[0].unlink()  # a whole file removed
    checked, problem = verify(tmp_path / "audit", queue_file)
    assert problem is not None and "expected record 1" in str(problem)
