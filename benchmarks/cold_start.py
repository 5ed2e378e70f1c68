"""How soon `zimage serve` answers, is ready, and delivers its first nano image, from the command's start.

    .venv/bin/python benchmarks/cold_start.py [--runs 5]

Each run starts `zimage serve --device cpu` on a new data dir and, from the moment the process is
spawned, measures: the first answer to GET /health (any status), the first 200 of GET /health (the
worker has loaded the default model), and the first nano image (the shipped workflow at its 128² size,
submitted as soon as the server answers, until its history entry exists). Goals (issue 16): an answer
within 2 s, the first image within 5 s.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from zimage_serve import workflows


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def call(port: int, method: str, path: str, body: object | None = None) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        data = json.dumps(body).encode() if body is not None else None
        connection.request(method, path, body=data, headers={"Content-Type": "application/json"})
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


def one_run(work: Path) -> dict[str, float]:
    port = free_port()
    command = [str(Path(sys.executable).with_name("zimage")), "serve", "--port", str(port), "--device", "cpu"]
    command += ["--data-dir", str(work / "data")]
    started = time.monotonic()
    log = open(work / "server.log", "wb")  # noqa: SIM115  # closed after the process ends
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    found: dict[str, float] = {}
    prompt_id = None
    try:
        while "image" not in found:
            if process.poll() is not None:
                raise RuntimeError((work / "server.log").read_text())
            if time.monotonic() - started > 120:
                raise RuntimeError("no image within 120 s")
            try:
                status, _ = call(port, "GET", "/health")
            except OSError:
                time.sleep(0.01)
                continue
            now = time.monotonic() - started
            found.setdefault("answer", now)
            if status == 200:
                found.setdefault("ready", now)
            if prompt_id is None:
                status, body = call(port, "POST", "/prompt", {"prompt": workflows.load(workflows.NANO)})
                prompt_id = json.loads(body)["prompt_id"]
            status, body = call(port, "GET", f"/history/{prompt_id}")
            if json.loads(body):
                found["image"] = time.monotonic() - started
            time.sleep(0.01)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
        log.close()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    results = []
    for index in range(args.runs):
        with tempfile.TemporaryDirectory() as work:
            result = one_run(Path(work))
        results.append(result)
        shown = ", ".join(f"{k} {v:.2f} s" for k, v in result.items())
        print(f"run {index + 1}: {shown}", flush=True)
    for key in ("answer", "ready", "image"):
        values = [r[key] for r in results if key in r]
        print(f"{key:>6}: median {statistics.median(values):.2f} s, range {min(values):.2f}-{max(values):.2f} s")
    print(f"({os.cpu_count()} cores; from the spawn of `zimage serve` to each event)")


if __name__ == "__main__":
    main()
