"""`zimage batch`: rows to images here and on a server, stopped with SIGINT and resumed, bad rows kept apart."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.server import Listening
from tests.support.cli import run
from tests.support.jobs import wait_until
from tests.support.threaded import threaded_server

COLOURS = ("red", "blue", "green", "yellow", "white")
SHAPES = ("circle", "square", "triangle")
BAD_SEED_ROW, EMPTY_PROMPT_ROW = 5, 12


def zimage_batch(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "zimage_serve.cli", "batch", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=300)


def write_rows(path: Path) -> Path:
    """20 products; row 5 has a seed that is not a number, row 12 an empty prompt."""
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["sku", "prompt", "seed", "price"])
        for row in range(1, 21):
            prompt = "" if row == EMPTY_PROMPT_ROW else f"a {COLOURS[row % 5]} {SHAPES[row % 3]} on a black background"
            seed = "abc" if row == BAD_SEED_ROW else str(100 + row)
            writer.writerow([f"SKU{row:03d}", prompt, seed, f"{row}.99"])
    return path


def manifest(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]


def images(out: Path) -> list[Path]:
    """The PNGs under `out`; a running batch makes and removes its work folder per row, so the walk skips a
    folder that is gone by the time it is read, where `rglob` would raise."""
    return sorted(Path(root) / name for root, _, names in os.walk(out) for name in names if name.endswith(".png"))


def interrupted_then_resumed(tmp_path: Path, capsys: pytest.CaptureFixture[str], *server: str) -> None:
    """The first run is a process stopped by SIGINT; the second, which resumes, runs in this process."""
    rows = write_rows(tmp_path / "products.csv")
    out = tmp_path / "out"
    args = [str(rows), "--template", "zimage-nano", "--out", str(out), "--name", "{sku}_{seed}", "--set", "steps=6"]
    log = tmp_path / "first.log"
    with open(log, "w") as output:
        command = [sys.executable, "-m", "zimage_serve.cli", "batch", *args, *server]
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, cwd=tmp_path)
    deadline = time.monotonic() + 240
    while len([p for p in images(out) if not p.name.startswith(".")]) < 6:
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    assert process.wait(120) == 130, log.read_text()
    first = log.read_text()
    assert "Traceback" not in first and "stopping" in first
    assert not [p for p in out.rglob("*") if ".zimage-part" in p.name or ".zimage-work" in str(p)]
    done_first = [r for r in manifest(out) if r["status"] == "ok"]
    assert 6 <= len(done_first) < 18, first
    stamps = {f: (out / f).stat().st_ino for r in done_first for f in r["files"]}

    code, _, errors = run(["batch", *args, *server], capsys)
    assert code == 1, errors  # two rows failed
    assert f"resuming: {len(done_first)} of 20 rows finished earlier are skipped" in errors
    assert "Traceback" not in errors

    records = manifest(out)
    assert [r["row"] for r in records] == list(range(1, 21))
    failed = {r["row"]: r["error"] for r in records if r["status"] == "failed"}
    assert failed == {
        BAD_SEED_ROW: "seed: 'abc' is not a whole number",
        EMPTY_PROMPT_ROW: "prompt: must not be empty",
    }
    by_row = {r["row"]: r for r in records}
    # a failed product is found by its own columns, and carries the name the pattern gives it
    assert by_row[BAD_SEED_ROW]["fields"]["sku"] == "SKU005" and by_row[BAD_SEED_ROW]["name"] == "SKU005_abc"
    assert by_row[EMPTY_PROMPT_ROW]["fields"] == {"sku": "SKU012", "prompt": "", "seed": "112", "price": "12.99"}
    assert by_row[EMPTY_PROMPT_ROW]["name"] == "SKU012_112"
    assert by_row[1]["fields"]["price"] == "1.99"  # the finished rows too
    made = images(out)
    assert len(made) == 18 and not [p for p in out.iterdir() if p.name.startswith(".")]
    assert sorted(out / f for r in records for f in r["files"]) == made
    for record in records:
        if record["status"] == "ok":
            assert record["files"] == [f"SKU{record['row']:03d}_{100 + record['row']}.png"]
            assert record["seed"] == 100 + record["row"] and record["seconds"] > 0 and record["version"] == 1
    # The finished rows of the first run were not made again: their files are the same files.
    assert {f: (out / f).stat().st_ino for f in stamps} == stamps


def test_a_batch_here_stopped_with_sigint_resumes_to_18_images_and_20_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    interrupted_then_resumed(tmp_path, capsys)


def test_the_same_batch_on_a_server_with_concurrency_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with threaded_server(tmp_path / "data") as server:
        interrupted_then_resumed(tmp_path, capsys, "--server", server.url, "--concurrency", "2")
        jobs = server.json("GET", "/history")[1]
        done = [j for j in jobs.values() if j["status"]["status_str"] == "success"]
        assert len(done) >= 18  # rows in flight at the SIGINT may have finished there too, unrecorded here
        queue = server.json("GET", "/queue")[1]
        assert queue["queue_pending"] == [] and queue["queue_running"] == []  # nothing left behind


# -- edge cases, on a server (the batch command then loads no engine) -----------------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Listening]:
    with threaded_server(tmp_path_factory.mktemp("batch") / "data") as server:
        yield server


def run_jsonl(tmp_path: Path, server: Listening, rows: list[Any], *args: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return zimage_batch(
        str(path), "-t", "zimage-nano", "--out", str(tmp_path / "out"), "--server", server.url, *args, cwd=tmp_path
    )


def test_jsonl_rows_explicit_params_patterns_and_bad_lines(tmp_path: Path, served: Listening) -> None:
    rows = [
        {"prompt": "a red circle", "seed": 1, "sku": "A1", "category": "shoes"},
        {"prompt": "a blue square", "params": {"stepz": 3}, "sku": "A2", "category": "shoes"},
        "{not json",
        "[1, 2]",
        {"prompt": "a green triangle", "sku": "A1", "category": "shoes"},
        {"prompt": "a red square", "sku": "../escape", "category": "bags"},
        {"prompt": "a white circle", "params": {"steps": 2, "seed": "random"}, "sku": "B7", "category": "bags"},
        {"prompt": "a yellow circle", "sku": "C1"},
    ]
    result = run_jsonl(tmp_path, served, rows, "--name", "{category}/{sku}")
    assert result.returncode == 1
    records = {r["row"]: r for r in manifest(tmp_path / "out")}
    assert records[1]["status"] == "ok" and records[1]["files"] == ["shoes/A1.png"]
    assert records[2]["error"].startswith("stepz: no such parameter; zimage-nano has prompt")
    assert records[2]["name"] == "shoes/A2" and records[2]["fields"] == {
        "prompt": "a blue square", "sku": "A2", "category": "shoes", "params": {"stepz": 3}
    }  # fmt: skip
    assert records[3]["error"].startswith("not JSON")
    assert records[4]["error"] == "a row is a JSON object"
    assert records[5]["error"] == "the name 'shoes/A1' is row 1's too"
    assert "'..' part" in records[6]["error"]
    assert records[7]["status"] == "ok" and isinstance(records[7]["seed"], int)  # a drawn seed, recorded
    assert records[8]["error"] == "--name '{category}/{sku}': no column or parameter 'category'"
    assert records[8]["name"] == "" and records[8]["fields"]["sku"] == "C1"
    assert {p.relative_to(tmp_path / "out").as_posix() for p in images(tmp_path / "out")} == {
        "shoes/A1.png",
        "bags/B7.png",
    }


def test_a_file_already_there_is_never_replaced(tmp_path: Path, served: Listening) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "0001.png").write_bytes(b"someone else's file")
    result = run_jsonl(tmp_path, served, [{"prompt": "a red circle"}, {"prompt": "a blue circle"}])
    assert result.returncode == 1
    [first, second] = manifest(tmp_path / "out")
    assert first["status"] == "failed" and "0001.png exists already (not from this row)" in first["error"]
    assert second["status"] == "ok" and second["files"] == ["0002.png"]
    assert (tmp_path / "out" / "0001.png").read_bytes() == b"someone else's file"


def test_a_run_cut_after_a_rows_manifest_line_finishes_its_file_next_time(tmp_path: Path, served: Listening) -> None:
    out = tmp_path / "out"
    assert run_jsonl(tmp_path, served, [{"prompt": "a red circle"}]).returncode == 0
    # As if the process died between the manifest line and the link: the part file is all that is there.
    (out / "0001.png").rename(out / ".0001.zimage-part.png")
    again = run_jsonl(tmp_path, served, [{"prompt": "a red circle"}])
    assert again.returncode == 0 and "1 of 1 rows finished earlier are skipped" in again.stderr
    assert [p.name for p in out.iterdir() if p.suffix == ".png"] == ["0001.png"]
    # A finished row whose image was removed is made again.
    (out / "0001.png").unlink()
    third = run_jsonl(tmp_path, served, [{"prompt": "a red circle"}])
    assert third.returncode == 0 and "1 done (1 images)" in third.stderr and (out / "0001.png").is_file()


def test_wrong_options_are_refused_before_any_row_runs(tmp_path: Path, served: Listening) -> None:
    unknown = run_jsonl(tmp_path, served, [{"prompt": "x"}], "--set", "stepz=3")
    assert unknown.returncode == 1 and "--set: 'stepz' is not a parameter of zimage-nano" in unknown.stderr
    shape = run_jsonl(tmp_path, served, [{"prompt": "x"}], "--set", "steps")
    assert shape.returncode == 1 and "must look like NAME=VALUE" in shape.stderr
    pattern = run_jsonl(tmp_path, served, [{"prompt": "x"}], "--name", "{sku")
    assert pattern.returncode == 1 and "--name: '{sku'" in pattern.stderr
    template = run_jsonl(tmp_path, served, [{"prompt": "x"}], "--template", "nope")
    assert template.returncode == 1 and "template 'nope' does not exist" in template.stderr
    missing = zimage_batch("nothing.csv", "-t", "zimage-nano", "--server", served.url, cwd=tmp_path)
    assert missing.returncode == 1 and "nothing.csv: file not found" in missing.stderr
    assert not (tmp_path / "out" / "manifest.jsonl").exists()
    for result in (unknown, shape, pattern, template, missing):
        assert "Traceback" not in result.stderr


def test_a_size_the_nano_model_never_saw_is_warned_about(
    tmp_path: Path, served: Listening, caplog: pytest.LogCaptureFixture
) -> None:
    result = run_jsonl(tmp_path, served, [{"prompt": "a red circle", "width": 256, "steps": 1}])
    assert result.returncode == 0
    assert "warning: zimage-nano was trained at 128×128 only; at 256×128 it draws a pattern" in result.stderr
    # The server's log says it too.
    wait_until(lambda: any("trained at 128×128 only" in record.getMessage() for record in caplog.records), 30)


def test_a_batch_on_a_server_never_imports_torch(tmp_path: Path, served: Listening) -> None:
    rows = tmp_path / "rows.csv"
    rows.write_text("prompt\na red circle\n", encoding="utf-8")
    code = (
        "import sys\nfrom zimage_serve.cli import main\ncode = 0\n"
        f"try:\n    main(['batch', {str(rows)!r}, '-t', 'zimage-nano', '--server', {served.url!r}, "
        f"'--out', {str(tmp_path / 'out')!r}])\nexcept SystemExit as exit:\n    code = exit.code\n"
        "print(code, sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'diffusers', 'transformers', 'numpy'}))"
    )
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert found.stdout.strip().splitlines()[-1] == "0 []", found.stdout + found.stderr
    assert (tmp_path / "out" / "0001.png").is_file()
