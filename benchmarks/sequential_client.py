"""One client, one request at a time: the latency a simple script sees, not the capacity of many.

    .venv/bin/python benchmarks/sequential_client.py [--jobs 300] [--auth on|off] [--comfyui URL] [--v2]

The client posts `--jobs` model-free jobs (server_throughput.py's LoadImage → SaveImage, a new prefix
each) one after another over one keep-alive connection, then polls GET /queue every 20 ms until it is
empty, as scripts written against ComfyUI do. It prints the POST /prompt round trip (median, mean, p90,
p99), the jobs still queued when the last POST was answered and how long they took (the worker's share:
a server whose worker keeps up leaves one or two, and pays one 20 ms poll), and the finished jobs per
second, from the first post until the queue is empty. With `--comfyui URL` the
same client runs against a ComfyUI there too (its input folder must hold `bench.png`), alternating with
ours, so both figures come from the same run on the same machine. With `--v2` the same client also posts
the jobs through Comfy API v2 (`POST /api/v2/jobs`, one Idempotency-Key each, as the official client sends),
alternating with `/prompt` on the same server.

Every saved image creates a file. On ext4 without a journal that takes 100–200 µs instead of ~10 µs for a few
minutes after many files nearby were deleted (a test suite's temporary folders, an earlier run's data
folder, which this one removes at its end too), and our worker, at well under a millisecond a job, feels it
far more than ComfyUI does. So the client first waits, up to 6 minutes, until creating a file in its data
folder is quick again (`--no-settle`: start at once), and prints what it cost.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.server_throughput import Scratch, graph, print_medians, read_response
from tests.server import running_server

from zimage_serve.security.tokens import TokenStore

SLOW_CREATION_US = 50  # above this, the file system is looking through recently freed inodes
SETTLE_S = 360.0  # how long that can last after the deletions: 60 s, 360 s while their inodes are unwritten
SETTLE_STEP_S = 15.0


def run_client(
    host: str, port: int, jobs: int, headers: dict[str, str], tag: str, v2: bool = False
) -> dict[str, float]:
    """Post the jobs one by one, then wait for an empty queue; the round trips and the jobs per second."""
    trips: list[float] = []
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    path, expected = ("/api/v2/jobs", b"HTTP/1.1 201") if v2 else ("/prompt", b"HTTP/1.1 200")
    started = time.perf_counter()
    with socket.create_connection((host, port), timeout=60) as connection:
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stream = connection.makefile("rb")
        for i in range(jobs):
            workflow = graph(f"seq-{tag}/{i}")
            body = json.dumps({"workflow": workflow} if v2 else {"prompt": workflow}).encode()
            key = f"Idempotency-Key: {uuid.uuid4()}\r\n" if v2 else ""
            head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{extra}{key}"
            sent = time.perf_counter()
            connection.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
            status, payload = read_response(stream)
            trips.append(time.perf_counter() - sent)
            if not status.startswith(expected):
                raise SystemExit(f"job {i} refused: {(status + payload).decode(errors='replace')[:200]}")
    posted = time.perf_counter()
    poll = http.client.HTTPConnection(host, port, timeout=60)
    left: int | None = None
    while True:
        poll.request("GET", "/queue", headers=headers)
        queue = json.loads(poll.getresponse().read())
        if left is None:  # behind the posts: the worker's share of the time, beside the server's answers
            left = len(queue["queue_running"]) + len(queue["queue_pending"])
        if not queue["queue_running"] and not queue["queue_pending"]:
            break
        time.sleep(0.02)
    poll.close()
    elapsed = time.perf_counter() - started
    mean = statistics.fmean(trips)
    trips.sort()
    return {
        "POST round trip median ms": statistics.median(trips) * 1000,
        "POST round trip mean ms": mean * 1000,
        "POST round trip p90 ms": trips[int(len(trips) * 0.9)] * 1000,
        "POST round trip p99 ms": trips[int(len(trips) * 0.99)] * 1000,
        "jobs left after the last POST": float(left),
        "ms from the last POST to an empty queue": (time.perf_counter() - posted) * 1000,
        "jobs/s until the queue is empty": jobs / elapsed,
    }


def file_creation_us(folder: Path, files: int = 200) -> float:
    """How long creating one empty file takes in `folder`, in microseconds: every saved image pays it. On ext4
    without a journal it grows from ~10 µs to 100–200 µs for a few minutes after many files nearby were
    deleted (a test suite's temporary folders, say), since each new file then looks at every recently freed
    inode first. The files stay (removed with the data folder at the end): deleting them now would cause just that."""
    folder.mkdir(parents=True)
    started = time.perf_counter()
    for i in range(files):
        os.close(os.open(folder / str(i), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    return (time.perf_counter() - started) / files * 1e6


def settled(folder: Path, wait: bool) -> float:
    """File creation in `folder` (beside the folders the jobs' images go to), in µs, once it is fast again, or
    after SETTLE_S: the deletions of an earlier run (its data folder removed at its end, ComfyUI's emptied
    output folder) or of a test suite would otherwise slow this one, and our side more than ComfyUI's."""
    waited, probe = 0.0, 0
    creation_us = file_creation_us(folder / f".probe-{probe}")
    while wait and creation_us > SLOW_CREATION_US and waited < SETTLE_S:
        print(f"creating a file in the data folder takes {creation_us:.0f} µs: waiting for it to pass", file=sys.stderr)
        time.sleep(SETTLE_STEP_S)
        waited, probe = waited + SETTLE_STEP_S, probe + 1
        creation_us = file_creation_us(folder / f".probe-{probe}")
    return creation_us


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--auth", choices=("on", "off"), default="on")
    parser.add_argument("--comfyui", help="a ComfyUI to measure beside ours, e.g. http://127.0.0.1:8189")
    parser.add_argument("--v2", action="store_true", help="also submit through Comfy API v2, alternating")
    parser.add_argument(
        "--no-settle",
        dest="settle",
        action="store_false",
        help="start at once even while creating a file in the data folder is slow (see file_creation_us)",
    )
    args = parser.parse_args()
    with Scratch() as scratch:
        results, creation_us = measure(args, scratch.data())
    title = f"{args.jobs} model-free jobs, one at a time, authentication {args.auth}, {args.rounds} rounds"
    print_medians(f"{title}; creating a file in our data folder took {creation_us:.0f} µs", results)
    if creation_us > SLOW_CREATION_US:
        print(
            f"  (more than {SLOW_CREATION_US} µs: the file system is looking through recently freed inodes, and each"
            " image we save pays it; the figures are lower than usual until that passes, a few minutes)"
        )


def measure(args: argparse.Namespace, data: Path) -> tuple[dict[str, list[dict[str, float]]], float]:
    """Each variant's rounds, taking turns on one server (and the ComfyUI, if given), and the file creation
    time in the data folder just before."""
    headers: dict[str, str] = {}
    server_args: tuple[str, ...] = ()
    inputs = data / "input"
    if args.auth == "on":
        store = TokenStore(data / "auth.sqlite3")
        headers["Authorization"] = "Bearer " + store.create("bench", "user")[0]
        store.close()
        inputs, server_args = data / "input" / "users" / "bench", ("--auth", "on")
    inputs.mkdir(parents=True)
    Image.new("RGB", (64, 64), "red").save(inputs / "bench.png")
    results: dict[str, list[dict[str, float]]] = {"zimage-serve": [], "zimage-serve, Comfy API v2": [], "ComfyUI": []}
    queued = args.jobs * (args.rounds + 1) * 2 + 10
    outputs = data / "output" / "users" / "bench" if args.auth == "on" else data / "output"
    creation_us = settled(outputs, args.settle)
    with running_server(data, "--max-queue", str(queued), *server_args) as server:
        run_client("127.0.0.1", server.port, 5, headers, "warm-up")
        for round_ in range(args.rounds):
            results["zimage-serve"].append(run_client("127.0.0.1", server.port, args.jobs, headers, f"z{round_}"))
            if args.v2:
                results["zimage-serve, Comfy API v2"].append(
                    run_client("127.0.0.1", server.port, args.jobs, headers, f"v{round_}", v2=True)
                )
            if args.comfyui:
                url = urlsplit(args.comfyui)
                host, port = url.hostname or "127.0.0.1", url.port or 80
                results["ComfyUI"].append(run_client(host, port, args.jobs, {}, f"c{round_}"))
    return results, creation_us


if __name__ == "__main__":
    main()
