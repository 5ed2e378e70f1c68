"""Webhook deliveries from one API node: their rate, their cost per job, and the time to the receiver.

    .venv/bin/python benchmarks/webhooks.py [--jobs 1000] [--rounds 2]

A `zimage serve` process runs `--jobs` model-free jobs (server_throughput.py's LoadImage → SaveImage,
eight clients posting at once) twice per round, alternating: with no endpoint registered, and with one
endpoint subscribed to every event of every job (three deliveries a job: queued, started, succeeded) that a
receiver in this process
answers at once. Side by side: completed jobs/s and the server's and worker's CPU per job (what the
outbox and the deliveries cost), deliveries per second (from the first event to the last delivery), and
the time from a job's end to the receiver's 200 (the event's timestamp to its arrival; p50, p95, max) while
the burst is delivered, and for one job at a time afterwards.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.server_throughput import Scratch, cpu_seconds, drained, per_job, print_medians, submit_all
from tests.server import running_server

from zimage_serve.webhooks.store import WebhookStore


class Receiver(ThreadingHTTPServer):
    arrivals: list[tuple[float, dict[str, Any]]]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()
        self.server.arrivals.append((time.time(), json.loads(body)))  # type: ignore[attr-defined]

    def log_message(self, *args: Any) -> None:
        pass


def measure(data: Path, jobs: int, with_endpoint: bool) -> dict[str, float]:
    (data / "input").mkdir(parents=True)
    Image.new("RGB", (64, 64), "red").save(data / "input" / "bench.png")
    receiver = Receiver(("127.0.0.1", 0), Handler)
    receiver.arrivals = []
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    if with_endpoint:
        store = WebhookStore(data / "queue.sqlite3")
        store.add("bench", f"http://127.0.0.1:{receiver.server_address[1]}/hook", subscribe=True)
        store.close()
    found: dict[str, float] = {}
    expected = 3 * (jobs + 1) if with_endpoint else 0  # queued, started, succeeded
    with running_server(data, "--max-queue", str(jobs + 10), "--webhook-allow", "127.0.0.1/32") as server:
        submit_all(server.port, ["warm-up"], 1)
        drained(server.port)
        started, cpu_before = time.perf_counter(), cpu_seconds(server.process.pid)
        submit_all(server.port, [f"bench/{i}" for i in range(jobs)], 8)
        drained(server.port)
        total = time.perf_counter() - started
        deadline = time.monotonic() + 300
        while len(receiver.arrivals) < expected and time.monotonic() < deadline:
            time.sleep(0.01)
        cpu_after = cpu_seconds(server.process.pid)
        quiet: list[float] = []
        for index in range(20 if with_endpoint else 0):  # one job at a time: the delay with no backlog
            before = len(receiver.arrivals)
            submit_all(server.port, [f"quiet/{index}"], 1)
            while len(receiver.arrivals) < before + 3 and time.monotonic() < deadline + 60:
                time.sleep(0.002)
            done = [(t, b) for t, b in receiver.arrivals[before:] if b["type"] == "job.succeeded"]
            quiet += [(t - datetime.fromisoformat(b["timestamp"]).timestamp()) * 1000 for t, b in done]
    receiver.shutdown()
    found.update(per_job(jobs, total, cpu_before, cpu_after))
    if with_endpoint:
        if len(receiver.arrivals) < expected:
            raise SystemExit(f"only {len(receiver.arrivals)} of {expected} deliveries arrived")
        events = [datetime.fromisoformat(body["timestamp"]).timestamp() for _, body in receiver.arrivals]
        found["deliveries/s"] = len(events) / (max(t for t, _ in receiver.arrivals) - min(events))
        lags = sorted(
            (arrived - datetime.fromisoformat(body["timestamp"]).timestamp()) * 1000
            for arrived, body in receiver.arrivals
            if body["type"] == "job.succeeded"
        )
        found["job end → receiver p50 ms"] = statistics.median(lags)
        found["job end → receiver p95 ms"] = lags[int(len(lags) * 0.95) - 1]
        found["job end → receiver max ms"] = lags[-1]
        found["one job alone: end → receiver p50 ms"] = statistics.median(quiet)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    results: dict[str, list[dict[str, float]]] = {"no endpoint": [], "one endpoint, every event": []}
    with Scratch() as scratch:
        for _ in range(args.rounds):
            results["no endpoint"].append(measure(scratch.data(), args.jobs, False))
            results["one endpoint, every event"].append(measure(scratch.data(), args.jobs, True))
    print_medians(f"{args.jobs} model-free jobs, 8 clients, {args.rounds} rounds (medians)", results, 32)


if __name__ == "__main__":
    main()
