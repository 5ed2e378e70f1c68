"""A cluster on loopback: a real redis-server (AOF on), two API nodes (`zimage serve --queue redis://...
--workers 0`) and two workers (`zimage worker`), sharing one data dir, with the nano model.

A worker killed with SIGKILL mid-job, or frozen until its lease runs out, has its job finished by the
other; Redis restarted mid-queue loses nothing (and POST /prompt answers 503 with Retry-After while it
is down); a socket on one node sees the events of a job posted to the other; 1,000 jobs through both
nodes and both workers end once each, each with one file."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect

from tests.redis_server import RedisServer, running_redis
from tests.server import Server, WorkerProc, free_port, running_server, running_worker
from tests.support.metrics import samples, scrape, value
from tests.workflows import nano_prompt

LEASE = "3"  # seconds: a frozen worker loses its job after this, and heartbeats come every second


@dataclass
class Cluster:
    redis: RedisServer
    nodes: list[Server]
    workers: list[WorkerProc]
    data: Path
    stack: ExitStack

    def add_worker(self) -> WorkerProc:
        port = free_port()
        worker = self.stack.enter_context(
            running_worker(self.data, self.redis.url, "--lease", LEASE, "--metrics-port", str(port))
        )
        worker.metrics_port = port
        self.workers.append(worker)
        return worker

    def live_workers(self) -> list[dict[str, Any]]:
        status, found = self.nodes[0].json("GET", "/api/zimage/workers")
        assert status == 200 and found["queue"] == "redis"
        return [w for w in found["workers"] if w["heartbeat_age_s"] < 3 * float(LEASE)]


def wait_for(
    condition: Callable[[], Any],
    timeout: float = 60,
    what: str = "the condition",
    state: Callable[[], Any] | None = None,
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = condition()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}" + (f"; state: {state()}" if state else ""))
        time.sleep(0.1)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("cluster")
    with running_redis(base / "redis") as redis, ExitStack() as stack:
        data = base / "data"
        nodes = [
            stack.enter_context(running_server(data, "--queue", redis.url, "--workers", "0", "--lease", LEASE))
            for _ in range(2)
        ]
        found = Cluster(redis, nodes, [], data, stack)
        for _ in range(2):
            found.add_worker()
        wait_for(lambda: sum(w["state"] == "ready" for w in found.live_workers()) == 2, 120, "two ready workers")
        yield found


def long_job(tag: str) -> dict[str, Any]:
    """The nano workflow at 200 steps: a few seconds on this CPU, long enough to be caught running (a seed
    of its own, so no worker has its latents cached)."""
    prompt = nano_prompt()
    prompt["3"]["inputs"]["steps"] = 200
    prompt["3"]["inputs"]["seed"] = int(uuid.uuid4().int % 2**32)
    prompt["9"]["inputs"]["filename_prefix"] = tag
    return prompt


def quick_job(tag: str, colour: int) -> dict[str, Any]:
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": colour}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": tag}},
    }


def post(node: Server, prompt: dict[str, Any], **extra: Any) -> str:
    status, answer = node.json("POST", "/prompt", {"prompt": prompt, **extra})
    assert status == 200, answer
    return str(answer["prompt_id"])


def ended(node: Server, prompt_id: str) -> dict[str, Any] | None:
    status, history = node.json("GET", f"/history/{prompt_id}")
    if status == 503:  # the queue is away (for a second after each failed try): not yet known
        return None
    assert status == 200
    return history.get(prompt_id)


def outputs_named(cluster: Cluster, tag: str) -> list[Path]:
    return sorted((cluster.data / "output").glob(f"{tag}_*.png"))


def worker_running(cluster: Cluster, prompt_id: str, other_than: int | None = None) -> dict[str, Any] | None:
    """The worker whose last heartbeat listed `prompt_id` as running (not the one with pid `other_than`)."""
    for worker in cluster.live_workers():
        if worker["pid"] != other_than and any(r["prompt_id"] == prompt_id for r in worker["running"]):
            return worker
    return None


def test_a_socket_on_one_node_sees_the_events_of_a_job_posted_to_the_other(cluster: Cluster) -> None:
    first, second = cluster.nodes
    client_id = uuid.uuid4().hex
    with connect(f"{second.ws_url}?clientId={client_id}", open_timeout=10) as socket:
        assert json.loads(socket.recv(timeout=10))["type"] == "status"
        prompt = nano_prompt()
        prompt["9"]["inputs"]["filename_prefix"] = "across"
        prompt_id = post(first, prompt, client_id=client_id)
        kinds = []
        while True:
            message = json.loads(socket.recv(timeout=60))
            if message["data"].get("prompt_id") not in (prompt_id, None):
                continue
            kinds.append(message["type"])
            if message["type"] == "executing" and message["data"]["node"] is None:
                break
    assert kinds.count("progress") == 8 and "executed" in kinds and "execution_success" in kinds
    assert kinds.index("execution_start") < kinds.index("execution_success") < len(kinds) - 1
    entry = ended(second, prompt_id)  # the history is the cluster's: the other node has it too
    assert entry is not None and entry["status"]["completed"]


def test_a_worker_killed_mid_job_has_its_job_finished_by_the_other(cluster: Cluster) -> None:
    node = cluster.nodes[0]
    prompt_id = post(node, long_job("killed"))
    holder = wait_for(lambda: worker_running(cluster, prompt_id), 60, "the job to start", cluster.live_workers)
    time.sleep(0.5)  # well into its steps
    killed_at = time.monotonic()
    os.kill(holder["pid"], signal.SIGKILL)
    wait_for(lambda: worker_running(cluster, prompt_id, other_than=holder["pid"]), 30, "the job to run again")
    print(f"SIGKILL to running again: {time.monotonic() - killed_at:.2f} s")
    entry = wait_for(lambda: ended(node, prompt_id), 120, "the job to end")
    assert entry["status"]["completed"] and entry["status"]["status_str"] == "success"
    [image] = entry["outputs"]["9"]["images"]
    assert [p.name for p in outputs_named(cluster, "killed")] == [image["filename"]]  # one file, not two
    cluster.workers = [w for w in cluster.workers if w.pid != holder["pid"]]
    cluster.add_worker()
    wait_for(lambda: sum(w["state"] == "ready" for w in cluster.live_workers()) >= 2, 120, "a new worker")


def test_a_frozen_worker_loses_its_job_when_its_lease_runs_out(cluster: Cluster) -> None:
    node = cluster.nodes[1]
    prompt_id = post(node, long_job("frozen"))
    holder = wait_for(lambda: worker_running(cluster, prompt_id), 60, "the job to start", cluster.live_workers)
    os.kill(holder["pid"], signal.SIGSTOP)  # alive, but no heartbeat: only its lease can free the job
    try:
        stopped_at = time.monotonic()
        wait_for(lambda: worker_running(cluster, prompt_id, other_than=holder["pid"]), 30, "the re-run")
        assert time.monotonic() - stopped_at >= float(LEASE) - 1.5  # not before the lease ran out
        entry = wait_for(lambda: ended(node, prompt_id), 120, "the job to end")
        assert entry["status"]["completed"]
    finally:
        os.kill(holder["pid"], signal.SIGKILL)
    assert len(outputs_named(cluster, "frozen")) == 1
    cluster.workers = [w for w in cluster.workers if w.pid != holder["pid"]]
    cluster.add_worker()
    wait_for(lambda: sum(w["state"] == "ready" for w in cluster.live_workers()) >= 2, 120, "a new worker")


def test_redis_restarted_mid_queue_loses_nothing(cluster: Cluster) -> None:
    first, second = cluster.nodes
    ids = [post((first, second)[i % 2], quick_job("restart", i)) for i in range(40)]
    cluster.redis.stop()
    asked = time.monotonic()
    status, headers, body = first.request("POST", "/prompt", {"prompt": quick_job("refused", 1)})
    assert status == 503 and int(headers["retry-after"]) >= 1, body
    assert time.monotonic() - asked < 3  # not a hang
    assert first.request("GET", "/system_stats")[0] == 200  # what needs no queue still answers
    assert json.loads(body)["error"]["type"] == "queue_unavailable"
    assert first.request("GET", "/queue")[0] == 503
    time.sleep(1.5)  # workers and nodes find Redis gone
    cluster.redis.start()
    wait_for(lambda: all(ended(second, i) for i in ids), 120, "every job to end")
    assert all(ended(first, i)["status"]["completed"] for i in ids)  # type: ignore[index]
    assert len(outputs_named(cluster, "restart")) == 40 and outputs_named(cluster, "refused") == []
    post(second, quick_job("after", 7))  # the nodes reconnected by themselves


def test_a_thousand_jobs_through_two_nodes_and_two_workers_end_once_each(cluster: Cluster) -> None:
    ids: list[str] = []
    lock = threading.Lock()

    def send(node: Server, start: int) -> None:
        for i in range(start, 1000, 4):
            prompt_id = post(node, quick_job("load", i))
            with lock:
                ids.append(prompt_id)

    senders = [threading.Thread(target=send, args=(cluster.nodes[i % 2], i)) for i in range(4)]
    started = time.monotonic()
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    assert len(set(ids)) == 1000

    def finished() -> bool:
        status, history = cluster.nodes[1].json("GET", "/history?max_items=2000")
        return status == 200 and len(set(ids) & set(history)) == 1000

    wait_for(finished, 300, "a thousand jobs")
    print(f"1,000 jobs through 2 nodes and 2 workers: {time.monotonic() - started:.1f} s")
    status, queue = cluster.nodes[0].json("GET", "/queue")
    assert status == 200 and queue == {"queue_running": [], "queue_pending": []}
    assert len(outputs_named(cluster, "load")) == 1000  # none run twice to completion, none lost
    status, history = cluster.nodes[0].json("GET", "/history?max_items=2000")
    assert all(history[i]["status"]["completed"] for i in ids)


def test_metrics_show_every_worker_and_each_workers_jobs(cluster: Cluster) -> None:
    found = scrape(cluster.nodes[1])
    live = {w["id"] for w in cluster.live_workers()}
    beats = {
        dict(labels)["worker"]: v
        for (name, labels), v in found.items()
        if name == "zimage_worker_heartbeat_age_seconds"
    }
    assert live <= set(beats) and all(beats[w] < 3 * float(LEASE) for w in live)
    assert value(found, "zimage_queue_jobs", state="pending") == 0 and value(found, "zimage_queue_up") == 1
    ended = 0.0
    for worker in cluster.workers:
        assert worker.metrics_port is not None
        with urllib.request.urlopen(f"http://127.0.0.1:{worker.metrics_port}/metrics", timeout=10) as answer:
            ended += value(samples(answer.read().decode()), "zimage_jobs_ended_total", outcome="success")
    assert ended >= 1000  # the load test's jobs, counted where they ran


def test_each_job_end_is_in_one_api_nodes_audit_log_and_each_log_verifies(cluster: Cluster) -> None:
    prompt_id = post(cluster.nodes[0], quick_job("audited", 99))
    wait_for(lambda: ended(cluster.nodes[0], prompt_id), 60, "the job to end")
    command = [sys.executable, "-m", "zimage_serve.cli", "audit"]
    # each node's log, under its default name (HOST-PORT)
    places = [["--data-dir", str(cluster.data), "--node", f"{socket.gethostname()}-{n.port}"] for n in cluster.nodes]

    def logged() -> list[str]:
        found = []
        for where in places:
            exported = subprocess.run([*command, "export", *where], capture_output=True, text=True, timeout=60)
            found += [r["job_id"] for r in map(json.loads, exported.stdout.splitlines()) if r["kind"] == "generation"]
        return found

    ends = wait_for(lambda: (found := logged()) and prompt_id in found and found, 30, "the end in a log")
    assert ends.count(prompt_id) == 1  # in one node's log, once
    assert len(ends) == len(set(ends)) and len(ends) >= 1000  # the load test's too, none twice
    for where in places:
        checked = subprocess.run([*command, "verify", *where], capture_output=True, text=True, timeout=60)
        assert checked.returncode == 0 and "intact" in checked.stderr, checked.stderr
