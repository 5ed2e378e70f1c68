"""How soon `zimage serve` answers, is ready, and delivers its first nano image, from the command's start.

    .venv/bin/python benchmarks/cold_start.py [--runs 5]

    .venv/bin/python benchmarks/cold_start.py --runs 3 --no-preload --model-free

Each run starts `zimage serve --device cpu` on a new data dir and, from the moment the process is
spawned, measures: the first answer to GET /health (any status), the first 200 of GET /health (the
worker has loaded the default model), and the first nano image (the shipped workflow at its 128² size,
submitted as soon as the server answers, until its history entry exists). Goals: an answer within 2 s,
the first image within 5 s. After the image it reads the worker process's memory from /proc: its
resident set (VmRSS) and the most it held (VmHWM), and the server's resident set beside it.

`--no-preload` starts the server with `--no-preload`; `--model-free` submits a graph without a model
(EmptyImage → SaveImage, 128²) instead of the nano image: together, what a worker holds that has run
no model.
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


MODEL_FREE = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 128, "height": 128, "batch_size": 1, "color": 0x3366CC}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "cold-start"}},
}


def memory_mib(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of a process, in MiB (Linux)."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0]) / 1024
    return found


def worker_pid(server_pid: int) -> int | None:
    """The server's worker process: its child started by multiprocessing's spawn (the resource tracker, also
    a child, runs another command)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parent = int(stat.rpartition(")")[2].split()[1])
        if parent == server_pid and b"spawn_main" in command:
            return int(entry.name)
    return None


def one_run(work: Path, preload: bool = True, model_free: bool = False) -> dict[str, float]:
    port = free_port()
    command = [str(Path(sys.executable).with_name("zimage")), "serve", "--port", str(port), "--device", "cpu"]
    command += ["--data-dir", str(work / "data")]
    if not preload:
        command.append("--no-preload")
    graph = MODEL_FREE if model_free else workflows.load(workflows.NANO)
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
                status, body = call(port, "POST", "/prompt", {"prompt": graph})
                prompt_id = json.loads(body)["prompt_id"]
            status, body = call(port, "GET", f"/history/{prompt_id}")
            if json.loads(body):
                found["image"] = time.monotonic() - started
            time.sleep(0.01)
        worker = worker_pid(process.pid)
        if worker is not None:
            memory = memory_mib(worker)
            found["worker_rss"], found["worker_hwm"] = memory["VmRSS"], memory["VmHWM"]
        found["server_rss"] = memory_mib(process.pid)["VmRSS"]
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
        log.close()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-preload", action="store_true", help="start the server with --no-preload")
    parser.add_argument("--model-free", action="store_true", help="submit EmptyImage → SaveImage, not nano")
    args = parser.parse_args()
    results = []
    for index in range(args.runs):
        with tempfile.TemporaryDirectory() as work:
            result = one_run(Path(work), preload=not args.no_preload, model_free=args.model_free)
        results.append(result)
        shown = ", ".join(f"{k} {v:.2f} {'MiB' if k.endswith(('rss', 'hwm')) else 's'}" for k, v in result.items())
        print(f"run {index + 1}: {shown}", flush=True)
    for key in ("answer", "ready", "image"):
        values = [r[key] for r in results if key in r]
        print(f"{key:>6}: median {statistics.median(values):.2f} s, range {min(values):.2f}-{max(values):.2f} s")
    for key, label in (("worker_rss", "worker VmRSS"), ("worker_hwm", "worker VmHWM"), ("server_rss", "server VmRSS")):
        values = [r[key] for r in results if key in r]
        if values:
            print(f"{label}: median {statistics.median(values):.0f} MiB, range {min(values):.0f}-{max(values):.0f} MiB")
    print(f"({os.cpu_count()} cores; times from the spawn of `zimage serve` to each event; memory after the image)")


if __name__ == "__main__":
    main()
