"""Outputs uploaded to an S3-compatible store from one API node: the cost per job, the rate, the delay.

    .venv/bin/python benchmarks/output_store.py [--jobs 500] [--rounds 2]

A `zimage serve` process runs `--jobs` model-free jobs (server_throughput.py's LoadImage → SaveImage, a
64×64 PNG each, eight clients posting at once) twice per round, alternating: with no output store, and with
`--output-store s3://bench/out` on moto's S3 server in this process (a real S3 protocol server on loopback;
a remote store adds its network time to the delay, not to the CPU). Side by side: completed jobs/s and the
server's and worker's CPU per job (what the outbox and the uploads cost), uploads per second (from the
first job's end to the last object stored), and, for one job at a time afterwards, the time from its end
to its history entry naming the object (polled every 5 ms).
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
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.server_throughput import (
    Scratch,
    cpu_seconds,
    drained,
    get_json,
    graph,
    per_job,
    print_medians,
    submit_all,
)
from tests.server import running_server

JSON = {"Content-Type": "application/json"}


def stored(port: int) -> float:
    """The jobs whose files the server has stored (its /metrics)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("GET", "/metrics")
    text = connection.getresponse().read().decode()
    connection.close()
    for line in text.splitlines():
        if line.startswith('zimage_output_uploads_total{outcome="stored"}'):
            return float(line.split()[-1])
    return 0.0


def measure(data: Path, jobs: int, store: str | None) -> dict[str, float]:
    (data / "input").mkdir(parents=True)
    Image.new("RGB", (64, 64), "red").save(data / "input" / "bench.png")
    options = ["--max-queue", str(jobs + 10)] + (["--output-store", store] if store else [])
    found: dict[str, float] = {}
    with running_server(data, *options) as server:
        submit_all(server.port, ["warm-up"], 1)
        drained(server.port)
        while store and stored(server.port) < 1:
            time.sleep(0.01)
        started, cpu_before = time.perf_counter(), cpu_seconds(server.process.pid)
        submit_all(server.port, [f"bench/{i}" for i in range(jobs)], 8)
        drained(server.port)
        total = time.perf_counter() - started
        deadline = time.monotonic() + 300
        while store and stored(server.port) < jobs + 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        all_stored = time.perf_counter() - started
        cpu_after = cpu_seconds(server.process.pid)
        quiet: list[float] = []
        for index in range(20 if store else 0):  # one job at a time: the delay with no backlog
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
            connection.request("POST", "/prompt", json.dumps({"prompt": graph(f"q{index}")}), JSON)
            job = json.loads(connection.getresponse().read())["prompt_id"]
            connection.close()
            while True:
                entry = get_json(server.port, f"/history/{job}").get(job)
                if entry:
                    ended = next(d["timestamp"] for e, d in entry["status"]["messages"] if e == "execution_success")
                    image = entry["outputs"]["2"]["images"][0]
                    if "url" in image:
                        quiet.append(time.time() * 1000 - ended)
                        break
                time.sleep(0.005)
    found.update(per_job(jobs, total, cpu_before, cpu_after))
    if store:
        found["uploads/s (all stored)"] = jobs / all_stored
        found["one job alone: end → URL in history p50 ms"] = statistics.median(quiet)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request otherwise

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    os.environ.update({"AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})  # fmt: skip
    boto3.client("s3").create_bucket(Bucket="bench")
    results: dict[str, list[dict[str, float]]] = {"no output store": [], "--output-store (moto, loopback)": []}
    try:
        with Scratch() as scratch:
            for _ in range(args.rounds):
                results["no output store"].append(measure(scratch.data(), args.jobs, None))
                results["--output-store (moto, loopback)"].append(measure(scratch.data(), args.jobs, "s3://bench/out"))
    finally:
        moto.stop()
    print_medians(f"{args.jobs} model-free jobs, 8 clients, {args.rounds} rounds (medians)", results, 44)


if __name__ == "__main__":
    main()
