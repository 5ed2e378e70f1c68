"""Jobs per second through a real `zimage serve` process on a model-free graph, and GET /queue latency.

    .venv/bin/python benchmarks/server_throughput.py [--jobs 2000] [--clients 8] [--waiting 500]

The graph is LoadImage → SaveImage with a new filename prefix per job (so nothing is served from the
cache), submitted over loopback HTTP by `--clients` threads with keep-alive connections. Measures:
submissions/s (all POST /prompt answered), completed jobs/s (until the last history entry exists),
the server's per-job overhead (wall time per completed job), and p50/p99 of GET /queue while
`--waiting` jobs wait behind a paused worker. Goal (issue 5) on 2 cores with the queue persisted:
1,000 submissions/s and 1,000 completed jobs/s.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.server import running_server

from zimage_serve import workflows


def graph(prefix: str) -> dict[str, object]:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "bench.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


def submit_all(port: int, prefixes: list[str], clients: int) -> float:
    chunks = [prefixes[i::clients] for i in range(clients)]
    errors: list[str] = []

    def worker(chunk: list[str]) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for prefix in chunk:
            body = json.dumps({"prompt": graph(prefix)})
            connection.request("POST", "/prompt", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            payload = response.read()
            if response.status != 200:
                errors.append(payload.decode()[:200])
        connection.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(c,)) for c in chunks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise SystemExit(f"{len(errors)} submissions failed, e.g. {errors[0]}")
    return time.perf_counter() - started


def get_json(port: int, path: str) -> Any:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("GET", path)
    answer = json.loads(connection.getresponse().read())
    connection.close()
    return answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--waiting", type=int, default=500)
    args = parser.parse_args()
    data = Path(tempfile.mkdtemp()) / "data"
    (data / "input").mkdir(parents=True)
    Image.new("RGB", (64, 64), "red").save(data / "input" / "bench.png")
    with running_server(data, "--max-queue", str(args.jobs + args.waiting + 10)) as server:
        # Steady state: one job through first, so the worker is up and the caches are warm.
        submit_all(server.port, ["warm-up"], 1)
        while get_json(server.port, "/prompt")["exec_info"]["queue_remaining"] > 0:
            time.sleep(0.01)
        started = time.perf_counter()
        submit_seconds = submit_all(server.port, [f"bench/{i}" for i in range(args.jobs)], args.clients)
        left_after_submitting = get_json(server.port, "/prompt")["exec_info"]["queue_remaining"]
        drain_started = time.perf_counter()
        # Poll the cheap GET /prompt (a full GET /history of thousands of entries would load the server).
        while get_json(server.port, "/prompt")["exec_info"]["queue_remaining"] > 0:
            time.sleep(0.01)
        total_seconds = time.perf_counter() - started
        drain_seconds = time.perf_counter() - drain_started
        finished = get_json(server.port, "/history")
        succeeded = sum(entry["status"]["status_str"] == "success" for entry in finished.values())
        if succeeded != args.jobs + 1:
            raise SystemExit(f"only {succeeded - 1} of {args.jobs} jobs succeeded")
        print(f"{args.jobs} jobs, {args.clients} clients")
        print(f"submissions/s   {args.jobs / submit_seconds:8.0f}")
        print(f"completed jobs/s {args.jobs / total_seconds:8.0f}  ({1000 * total_seconds / args.jobs:.2f} ms per job)")
        if left_after_submitting > 0:
            print(
                f"  after the last submission: {left_after_submitting} left, run at "
                f"{left_after_submitting / drain_seconds:.0f} jobs/s with nothing else to do"
            )

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
            connection.request("GET", "/queue")
            response = connection.getresponse()
            body = response.read()
            latencies.append((time.perf_counter() - begun) * 1000)
        pending = len(json.loads(body)["queue_pending"])
        latencies.sort()
        print(
            f"GET /queue with {pending} waiting: p50 {statistics.median(latencies):.1f} ms, "
            f"p99 {latencies[int(0.99 * len(latencies)) - 1]:.1f} ms"
        )
        server.request("POST", "/queue", {"clear": True})
        server.request("POST", "/interrupt")


if __name__ == "__main__":
    main()
