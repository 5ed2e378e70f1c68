"""`zimage batch` rows per second: on the local engine, and on a server with 1 and 2 jobs in flight.

    .venv/bin/python benchmarks/batch_throughput.py [--rows 40] [--rounds 2] [--steps 8]

zimage-nano at 128², side by side in one run, rounds interleaved (this machine is shared and noisy).
Each time is the whole command, start to exit: the local one includes loading the model (a few
seconds, once per batch), the server ones do not (the server had it loaded before).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.server import free_port  # noqa: E402

COLOURS = ("red", "blue", "green", "yellow", "white")
SHAPES = ("circle", "square", "triangle")


def write_rows(path: Path, rows: int, first_seed: int) -> None:
    """Seeds never repeat between runs: the server would answer a repeated graph from its cache."""
    lines = ["prompt,seed"] + [f"a {COLOURS[i % 5]} {SHAPES[i % 3]},{first_seed + i}" for i in range(rows)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def timed_batch(rows: Path, out: Path, steps: int, *extra: str) -> float:
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "zimage_serve.cli", "batch", str(rows), "-t", "zimage-nano", "--out", str(out)]
    started = time.perf_counter()
    subprocess.run([*command, "--set", f"steps={steps}", *extra], check=True, capture_output=True)
    elapsed = time.perf_counter() - started
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert all(r["status"] == "ok" for r in records), records
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    options = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    rows = work / "rows.csv"
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "zimage_serve.cli", "serve", "--port", str(port), "--data-dir", str(work / "data"),
         "--device", "cpu"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the server did not become ready")
            time.sleep(0.2)
        ways = {
            "here (local engine)": (),
            "server, --concurrency 1": ("--server", url, "--concurrency", "1"),
            "server, --concurrency 2": ("--server", url, "--concurrency", "2"),
        }
        times: dict[str, list[float]] = {name: [] for name in ways}
        runs = 0
        for _ in range(options.rounds):
            for name, extra in ways.items():
                write_rows(rows, options.rows, runs * options.rows)
                runs += 1
                times[name].append(timed_batch(rows, work / "out", options.steps, *extra))
    finally:
        server.terminate()
        server.wait(60)
        shutil.rmtree(work, ignore_errors=True)
    print(f"{options.rows} rows, zimage-nano 128², {options.steps} steps, {options.rounds} rounds interleaved")
    print(f"{'':28}{'median s':>10}{'rows/s':>10}{'s/row':>10}")
    base = statistics.median(times["server, --concurrency 1"])
    for name, found in times.items():
        median = statistics.median(found)
        line = f"{name:28}{median:10.2f}{options.rows / median:10.1f}{median / options.rows:10.3f}"
        print(f"{line}   ({median / base:.2f}× the server at concurrency 1)")


if __name__ == "__main__":
    main()
