"""Instructions per job, counted by valgrind's callgrind: the steady measure on a shared, noisy machine.

    .venv/bin/python benchmarks/instructions.py [--jobs 100] [--part worker|server|both]

Times on these 2-core VMs move by ±10–30 % from run to run (other tenants, stolen time); instruction counts
do not, so a change to the per-job path can be judged by one run of each side. Two parts, both on the
model-free graph of `server_throughput.py` (LoadImage → SaveImage, a new prefix per job):

- worker: the device worker's loop in one process (`Worker._run`: executor, PNG, queue file), counted
  over `--jobs` jobs after a warm-up;
- server: a real `zimage serve` under callgrind with its worker process stopped, counted over `--jobs`
  POST /prompt requests from 8 keep-alive clients (parse, validate, group commit, answer).

Counting is switched on and off with `callgrind_control` around the measured part only (start-up, imports
and warm-up are not counted). Needs valgrind (`apt-get install valgrind`); each part takes about a minute.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from server_throughput import get_json, graph, submit_all
from tests.server import free_port, worker_processes

WARM_UP = 30


def counting(pid: int, state: str, busy: object = None) -> None:
    """Switch callgrind's counting in process `pid`; it reads the command only while running code, so
    keep it busy (`busy()`, or a spin here when it is this process) until the command is taken."""
    control = subprocess.Popen(
        ["callgrind_control", "-i", state, str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    while control.poll() is None:
        if callable(busy):
            busy()


def worker_inside(jobs: int) -> None:
    """Run under callgrind: the worker loop over `jobs` jobs, counted."""
    from zimage_serve.engine.placement import Placement
    from zimage_serve.queue.jobs import Job, NewJob
    from zimage_serve.queue.sqlite_queue import SQLiteQueue
    from zimage_serve.worker.loop import OTHER_JOB_TIMEOUT_S, Worker
    from zimage_serve.workflow.execute import Executor
    from zimage_serve.workflow.folders import Folders, builtin_models
    from zimage_serve.workflow.nodes import NODES
    from zimage_serve.workflow.output_journal import OutputJournal

    class Quiet:
        def job_event(self, *args: object) -> None:
            pass

        def queue_changed(self) -> None:
            pass

        def listening(self) -> bool:
            return False

    scratch = tempfile.TemporaryDirectory(prefix="zimage-bench-")  # removed with the object, when this returns
    data = Path(scratch.name)
    for sub in ("input", "output", "temp", "models"):
        (data / sub).mkdir()
    Image.new("RGB", (64, 64), "red").save(data / "input" / "bench.png")
    folders = Folders([data / "models"], data / "input", data / "output", data / "temp", builtin_models())
    store = SQLiteQueue(data / "queue.db", max_pending=WARM_UP + jobs + 1)
    store.enqueue_many(
        [
            NewJob.of(Job(str(uuid.uuid4()), i, graph(f"bench/{i}"), {"client_id": "c"}, ["2"]))
            for i in range(WARM_UP + jobs + 1)
        ]
    )
    # As the server's worker process runs: the output journal on, the CPU's default time limit.
    executor = Executor(NODES, folders, Placement.choose("cpu"), journal=OutputJournal(data / "runs"))
    worker = Worker(store, executor, Quiet(), job_timeout=OTHER_JOB_TIMEOUT_S)
    job = store.claim(worker.id, worker.lease_s)  # as the worker's loop claims: its own, leased
    for _ in range(WARM_UP):
        job = worker._run(job)  # type: ignore[arg-type]
    counting(os.getpid(), "on")
    for _ in range(jobs):
        job = worker._run(job)  # type: ignore[arg-type]
    counting(os.getpid(), "off")


def callgrind(command: list[str], out: Path) -> list[str]:
    return ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}", *command]


def total_instructions(log: str) -> int:
    found = re.findall(r"Collected : (\d+)", log)
    if not found:
        raise SystemExit(f"callgrind reported no count:\n{log[-2000:]}")
    return int(found[-1])


def measure_worker(jobs: int, work: Path) -> float:
    command = [sys.executable, __file__, "--inside-worker", str(jobs)]
    done = subprocess.run(callgrind(command, work / "worker.out"), capture_output=True, text=True, check=False)
    return total_instructions(done.stderr) / jobs


def measure_server(jobs: int, work: Path) -> float:
    data = work / "data"
    (data / "input").mkdir(parents=True)
    Image.new("RGB", (64, 64), "red").save(data / "input" / "bench.png")
    port = free_port()
    command = [sys.executable, "-m", "zimage_serve.cli", "serve", "--port", str(port), "--data-dir", str(data)]
    command += ["--device", "cpu", "--max-queue", str(jobs + 100)]
    log = work / "server.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(callgrind(command, work / "server.out"), stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                get_json(port, "/prompt")
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit(f"the server did not start:\n{log.read_text()[-2000:]}") from None
                time.sleep(1)
        submit_all(port, ["warm-up"], 1)
        while get_json(port, "/prompt")["exec_info"]["queue_remaining"] > 0:
            time.sleep(0.1)
        for child in worker_processes(server.pid):  # the worker runs natively; stopped, it takes no job
            os.kill(child, signal.SIGSTOP)
        submit_all(port, [f"warm/{i}" for i in range(WARM_UP)], 8)
        # Polls while switching are counted too; a few dozen, against `jobs` submissions.
        counting(server.pid, "on", lambda: get_json(port, "/prompt"))
        submit_all(port, [f"bench/{i}" for i in range(jobs)], 8)
        counting(server.pid, "off", lambda: get_json(port, "/prompt"))
    finally:
        server.send_signal(signal.SIGTERM)
        for child in worker_processes(server.pid):
            os.kill(child, signal.SIGCONT)
        server.wait(300)
    return total_instructions(log.read_text()) / jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--part", choices=["worker", "server", "both"], default="both")
    parser.add_argument("--inside-worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside_worker:
        worker_inside(args.inside_worker)
        return
    scratch = tempfile.TemporaryDirectory(prefix="zimage-bench-")  # removed with the object, at the end
    work = Path(scratch.name)
    parts = ["worker", "server"] if args.part == "both" else [args.part]
    for part in parts:
        per_job = measure_worker(args.jobs, work) if part == "worker" else measure_server(args.jobs, work)
        label = "worker loop, per job" if part == "worker" else "server, per POST /prompt"
        print(f"{label:28} {per_job / 1e6:8.3f} M instructions  ({args.jobs} jobs, LoadImage -> SaveImage)")


if __name__ == "__main__":
    main()
