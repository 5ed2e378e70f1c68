"""How many Comfy API v2 event streams one API node holds at once, what each costs, and whether the node
still answers meanwhile.

    .venv/bin/python benchmarks/event_streams.py [--streams 2000] [--jobs 20]

A real `zimage serve` (the worker busy with a long job, so the watched jobs wait in the queue) is sent
`--streams` GET /api/v2/jobs/{id}/events over as many connections, spread over `--jobs` waiting jobs and
over loopback source addresses (a node takes at most 256 connections from one address). Once every stream
has its first `status` event, it measures the server process's resident memory against before, and the
time of a plain `GET /api/v2/jobs/{id}` poll; then the long job is cancelled, the waiting ones run, and it
measures how long every stream takes to get its job's terminal `status`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.server_throughput import Scratch, graph
from PIL import Image
from tests.server import running_server

from zimage_serve import workflows

PER_ADDRESS = 200
WAVE = 500


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def stream(port: int, job_id: str, source: str, first: asyncio.Event, ended: list[float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    writer.write(f"GET /api/v2/jobs/{job_id}/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    await writer.drain()
    seen = False
    while True:
        line = await reader.readline()
        if not line:
            break
        if line.startswith(b"data: ") and b'"status"' in line:
            if not seen:
                seen = True
                first.set()
            if any(f'"status":"{s}"'.encode() in line for s in ("succeeded", "failed", "canceled")):
                ended.append(time.monotonic())
                break
    writer.close()


async def main_async(args: argparse.Namespace) -> None:
    with Scratch() as scratch:
        await measure(args, scratch.data())


async def measure(args: argparse.Namespace, data: Path) -> None:
    (data / "input").mkdir(parents=True)
    Image.new("RGB", (64, 64), "red").save(data / "input" / "bench.png")
    with running_server(data, "--event-streams", str(args.streams + 10), "--max-queue", "1000") as server:
        port = server.port
        slow = json.loads(workflows.NANO.read_text())
        slow["13"]["inputs"].update(width=1024, height=1024)
        slow["3"]["inputs"]["steps"] = 50
        blocker = server.json("POST", "/api/v2/jobs", {"workflow": slow})[1]["id"]
        jobs = [
            server.json("POST", "/api/v2/jobs", {"workflow": graph(f"streams/{i}")})[1]["id"] for i in range(args.jobs)
        ]
        await asyncio.sleep(0)
        before = rss_kib(server.process.pid)
        firsts: list[asyncio.Event] = []
        ended: list[float] = []
        tasks = []
        opened = time.monotonic()
        for i in range(args.streams):  # in waves, each open before the next: never past the listen backlog
            first = asyncio.Event()
            firsts.append(first)
            source = f"127.0.0.{2 + i // PER_ADDRESS}"
            tasks.append(asyncio.create_task(stream(port, jobs[i % len(jobs)], source, first, ended)))
            if i % WAVE == WAVE - 1:
                await asyncio.wait_for(asyncio.gather(*(f.wait() for f in firsts[-WAVE:])), 120)
        for first in firsts:
            await asyncio.wait_for(first.wait(), 120)
        all_open = time.monotonic() - opened
        held = rss_kib(server.process.pid)
        polls = []
        for job_id in jobs[:10]:
            started = time.perf_counter()
            status, _ = await asyncio.to_thread(server.json, "GET", f"/api/v2/jobs/{job_id}")
            polls.append((time.perf_counter() - started) * 1000)
            assert status == 200
        canceled = time.monotonic()
        server.json("POST", f"/api/v2/jobs/{blocker}/cancel")
        await asyncio.wait_for(asyncio.gather(*tasks), 300)
        print(f"{args.streams} event streams over {args.jobs} waiting jobs, one API node, 2 cores")
        print(f"  all open, each with its first status event: {all_open:.2f} s")
        print(f"  the server's resident memory: {before / 1024:.0f} MiB before, {held / 1024:.0f} MiB with them open")
        print(f"  per stream: {(held - before) / args.streams:.1f} KiB")
        print(f"  GET /api/v2/jobs/{{id}} meanwhile: median {statistics.median(polls):.1f} ms, max {max(polls):.1f} ms")
        print(f"  from the cancel of the long job to the last stream's terminal status: {max(ended) - canceled:.2f} s")


def main() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # a socket per stream, in this process too
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--jobs", type=int, default=20)
    args = parser.parse_args()
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
