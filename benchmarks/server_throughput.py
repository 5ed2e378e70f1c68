"""Jobs per second through a real `zimage serve` process on a model-free graph, and GET /queue latency.

    .venv/bin/python benchmarks/server_throughput.py [--jobs 2000] [--clients 8] [--waiting 500] [--mode both]
        [--auth off|on|both] [--rounds 1]

The graph is LoadImage → SaveImage with a new filename prefix per job (so nothing is served from the
cache), submitted over loopback HTTP by `--clients` threads with keep-alive connections. Measures:
submissions/s (all POST /prompt answered), completed jobs/s (until the last history entry exists),
the server's per-job overhead (wall time per completed job), and p50/p99 of GET /queue while
`--waiting` jobs wait behind a busy worker. By default both worker modes are measured one after the
other: prompts in a worker process (the default) and in threads of the server process. Goal (issue 5)
on 2 cores with the queue persisted: 1,000 submissions/s and 1,000 completed jobs/s.

`--auth both` measures the worker-process mode with authentication off and on (a user's Bearer token on
every request, the audit log written in both), alternating `--rounds` times in one run: issue 17 asks
that completed jobs/s with authentication on stay at 85 % or more of the figure with it off.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.server import proc_stat, running_server, worker_processes

from zimage_serve import workflows
from zimage_serve.security.tokens import TokenStore

AUTH: dict[str, str] = {}  # the header lines every request sends (a Bearer token, when measuring with auth)


class Scratch:
    """Where one benchmark run keeps its files: a temporary folder, a new data folder in it for each
    measurement, all removed together once the run is over. Not removed between measurements: on ext4
    without a journal, deleting a measurement's thousand images would slow the next one's file creation for
    minutes. Kept, and its path printed, when the run fails: the server logs are in it."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="zimage-bench-"))
        self._numbers = itertools.count()

    def data(self) -> Path:
        """A new data folder, not made yet (its parent is, for the server's log)."""
        run = self.root / f"run-{next(self._numbers)}"
        run.mkdir()
        return run / "data"

    def __enter__(self) -> Scratch:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if kind is None:
            shutil.rmtree(self.root, ignore_errors=True)
        else:
            print(f"the run's files, its server logs among them, are kept in {self.root}", file=sys.stderr)


def graph(prefix: str) -> dict[str, object]:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "bench.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


def post_prompts(port: int, bodies: list[bytes], errors: list[str]) -> None:
    """POST each body to /prompt over one keep-alive connection, one request at a time.

    A load generator in the manner of wrk: requests are plain bytes and responses are read by their
    Content-Length, so the client spends little of the two cores the server and worker share with it
    (http.client spent ~0.4 ms per request here, a fifth of the budget for 1,000 jobs/s)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as connection:
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stream = connection.makefile("rb")
        for body in bodies:
            head = "POST /prompt HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n" + "".join(
                f"{name}: {value}\r\n" for name, value in AUTH.items()
            )
            connection.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
            status, payload = read_response(stream)
            if not status.startswith(b"HTTP/1.1 200"):
                errors.append((status + payload).decode(errors="replace")[:200])


def read_response(stream: BinaryIO) -> tuple[bytes, bytes]:
    """One HTTP/1.1 response from a keep-alive connection: its status line and its body (by Content-Length)."""
    status = stream.readline()
    length = 0
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    return status, stream.read(length)


def submit_all(port: int, prefixes: list[str], clients: int) -> float:
    bodies = [json.dumps({"prompt": graph(prefix)}).encode() for prefix in prefixes]
    chunks = [bodies[i::clients] for i in range(clients)]
    errors: list[str] = []
    started = time.perf_counter()
    threads = [threading.Thread(target=post_prompts, args=(port, chunk, errors)) for chunk in chunks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise SystemExit(f"{len(errors)} submissions failed, e.g. {errors[0]}")
    return time.perf_counter() - started


def get_json(port: int, path: str) -> Any:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("GET", path, headers=AUTH)
    answer = json.loads(connection.getresponse().read())
    connection.close()
    return answer


def drained(port: int) -> None:
    """Wait until the server's queue is empty (nothing waiting or running)."""
    while get_json(port, "/prompt")["exec_info"]["queue_remaining"] > 0:
        time.sleep(0.01)


def per_job(jobs: int, seconds: float, cpu_before: dict[str, float], cpu_after: dict[str, float]) -> dict[str, float]:
    """Completed jobs/s, and the server's and worker's CPU per job, over a burst of `jobs`."""
    found = {"completed jobs/s": jobs / seconds}
    for role in ("server", "worker"):
        found[f"{role} CPU ms per job"] = 1000 * (cpu_after[role] - cpu_before[role]) / jobs
    return found


def print_medians(title: str, results: dict[str, list[dict[str, float]]], width: int = 36) -> None:
    """Each variant's figures, the median of its rounds."""
    print(title)
    for name, rounds in results.items():
        if not rounds:
            continue
        print(f"  {name}")
        for key in rounds[0]:
            print(f"    {key:<{width}} {statistics.median(r[key] for r in rounds):9.2f}")


def cpu_seconds(pid: int) -> dict[str, float]:
    """CPU time (user + system) used so far by the server process and by its worker process.

    CPU per job is steadier than jobs per second on a shared, noisy machine."""
    tick = os.sysconf("SC_CLK_TCK")

    def used(one: int) -> float:
        fields = proc_stat(one)
        return (int(fields[11]) + int(fields[12])) / tick if fields else 0.0

    return {"server": used(pid), "worker": sum(used(child) for child in worker_processes(pid))}


def measure(data: Path, args: argparse.Namespace, *server_args: str, auth: bool = False) -> dict[str, float]:
    inputs = data / "input" / "users" / "bench" if auth else data / "input"  # a user's uploads are their own
    inputs.mkdir(parents=True)
    Image.new("RGB", (64, 64), "red").save(inputs / "bench.png")
    AUTH.clear()
    if auth:
        store = TokenStore(data / "auth.sqlite3")
        AUTH["Authorization"] = "Bearer " + store.create("bench", "user")[0]
        store.close()
        server_args = ("--auth", "on", *server_args)
    found: dict[str, float] = {}
    with running_server(data, "--max-queue", str(args.jobs + args.waiting + 10), *server_args) as plain:
        server = plain.as_token(AUTH["Authorization"].split()[1]) if auth else plain
        # Steady state: one job through first, so the worker is up and the caches are warm.
        submit_all(server.port, ["warm-up"], 1)
        while get_json(server.port, "/prompt")["exec_info"]["queue_remaining"] > 0:
            time.sleep(0.01)
        started = time.perf_counter()
        cpu_before = cpu_seconds(server.process.pid)
        submit_seconds = submit_all(server.port, [f"bench/{i}" for i in range(args.jobs)], args.clients)
        left = get_json(server.port, "/prompt")["exec_info"]["queue_remaining"]
        drain_started = time.perf_counter()
        # Poll the cheap GET /prompt (a full GET /history of thousands of entries would load the server).
        while get_json(server.port, "/prompt")["exec_info"]["queue_remaining"] > 0:
            time.sleep(0.01)
        total_seconds = time.perf_counter() - started
        cpu_after = cpu_seconds(server.process.pid)
        drain_seconds = time.perf_counter() - drain_started
        finished = get_json(server.port, "/history")
        succeeded = sum(entry["status"]["status_str"] == "success" for entry in finished.values())
        if succeeded != args.jobs + 1:
            raise SystemExit(f"only {succeeded - 1} of {args.jobs} jobs succeeded")
        found["submissions/s"] = args.jobs / submit_seconds
        found["completed jobs/s"] = args.jobs / total_seconds
        found["ms per completed job"] = 1000 * total_seconds / args.jobs
        found["left after the last submission"] = left
        found["then run alone, jobs/s"] = left / drain_seconds if left else float("nan")
        for role in ("server", "worker"):
            found[f"{role} process CPU ms per job"] = 1000 * (cpu_after[role] - cpu_before[role]) / args.jobs

        # GET /queue with many waiting: hold the worker on one slow zimage-nano job, then fill the queue.
        blocker = workflows.load(workflows.NANO)
        blocker["13"]["inputs"].update(width=1024, height=1024)
        blocker["3"]["inputs"]["steps"] = 200
        assert server.json("POST", "/prompt", {"prompt": blocker})[0] == 200
        while not server.json("GET", "/queue")[1]["queue_running"]:
            time.sleep(0.05)
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        submit_all(server.port, [f"wait/{i}" for i in range(args.waiting)], args.clients)
        latencies = []
        for _ in range(200):
            begun = time.perf_counter()
            connection.request("GET", "/queue", headers=AUTH)
            response = connection.getresponse()
            body = response.read()
            latencies.append((time.perf_counter() - begun) * 1000)
        found["jobs waiting"] = len(json.loads(body)["queue_pending"])
        latencies.sort()
        found["GET /queue p50 ms"] = statistics.median(latencies)
        found["GET /queue p99 ms"] = latencies[int(0.99 * len(latencies)) - 1]
        server.request("POST", "/queue", {"clear": True})
        server.request("POST", "/interrupt")
    return found


MODES = {"worker process": (), "threads in the server": ("--no-worker-process",)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--waiting", type=int, default=500)
    parser.add_argument("--mode", choices=["both", *MODES], default="both")
    parser.add_argument("--auth", choices=["off", "on", "both"], default="off")
    parser.add_argument("--rounds", type=int, default=1, help="with --auth both: off/on pairs, alternating")
    args = parser.parse_args()
    if args.auth == "both":
        runs = [
            (f"auth {state} #{n + 1}", "worker process", state == "on")
            for n in range(args.rounds)
            for state in ("off", "on")
        ]
    else:
        modes = list(MODES) if args.mode == "both" else [args.mode]
        runs = [(mode if args.auth == "off" else f"{mode}, auth on", mode, args.auth == "on") for mode in modes]
    with Scratch() as scratch:
        results = {label: measure(scratch.data(), args, *MODES[mode], auth=auth) for label, mode, auth in runs}
    labels = list(results)
    print(f"{args.jobs} jobs from {args.clients} client threads (LoadImage -> SaveImage), queue in SQLite (WAL)")
    print(f"{'':34}" + "".join(f"{label:>24}" for label in labels))
    for key in results[labels[0]]:
        print(f"{key:34}" + "".join(f"{results[label][key]:24.1f}" for label in labels))
    if args.auth == "both":
        off = [results[label]["completed jobs/s"] for label in labels if label.startswith("auth off")]
        on = [results[label]["completed jobs/s"] for label in labels if label.startswith("auth on")]
        print(
            f"completed jobs/s with auth on / off: {statistics.mean(on) / statistics.mean(off):.1%} (mean of {len(on)})"
        )


if __name__ == "__main__":
    main()
